r"""Speculative decoding of one prompt or a JSONL file of prompts: `python decode.py --config....`
(the same as `mmspec-decode`; see mmspec_jax/commands/decode.py and docs/decoding.md)."""

from mmspec_jax.commands.decode import command

if __name__ == '__main__':
  command()
