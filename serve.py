r"""An OpenAI-compatible server: `python serve.py [--config.FIELD=VALUE ...]` (the same as
`mmspec-serve`; see mmspec_jax/commands/serve.py and docs/serving.md)."""

from mmspec_jax.commands.serve import command

if __name__ == '__main__':
  command()
