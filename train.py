r"""Trains a draft: `python train.py --config=configs/draft_pretrain.py:tiny --workdir=DIR`
(the same as `mmspec-train`; see mmspec_jax/commands/train.py and docs/training.md)."""

from mmspec_jax.commands.train import command

if __name__ == '__main__':
  command()
