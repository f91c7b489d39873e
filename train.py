r"""Trains a draft: `python train.py --config=configs/draft_pretrain.py --workdir=DIR`.

Stages (configs/): draft_pretrain, draft_chat, draft_distill, adapter_stage1, adapter_stage2; each
takes `:tiny` (CPU smoke scale) or `:paper` (the 115M draft on a TPU slice). Override any field with
--config.FIELD=VALUE. Rerunning with the same --workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mmspec_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and exports.',
                               required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO.
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
