r"""The feature draft (EAGLE-3 style): trained on the frozen target's layer outputs.

The target reads each conversation with its image; its outputs of three layers at every position
(image positions included) and the next token are the draft's input; the loss pulls the draft's
next-token distribution toward the target's (TVD by default), on the assistant's tokens, at
every position and, unrolled `unroll_steps` positions past the target's features on the draft's
own hidden states (training-time test), at each of those. The features are computed on the fly by
the frozen target in the same jitted step, so nothing is cached on disk and the data pipeline is
the distillation stage's.

  python train.py --config=configs/feature_distill.py:tiny --workdir=/tmp/feature_distill \
      --config.target=TARGET_DIR --config.data.data_dir=DATA \
      --config.data.name=llava_conversations/default
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (a 7B target's feature draft on a TPU slice)."""
  return stage_config('feature_distill', scale)
