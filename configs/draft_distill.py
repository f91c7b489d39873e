r"""Optional stage 3 of the language-only draft: distillation from the target's logits.

The target reads each conversation with its image; the draft reads the same text without the
image; the loss pulls the draft's next-token distribution toward the target's (TVD by default:
1 - TVD is exactly the speculative acceptance rate), on the assistant's tokens.

  python train.py --config=configs/draft_distill.py:tiny --workdir=/tmp/draft_distill \
      --config.init_from=/tmp/draft_chat/export --config.target=TARGET_DIR \
      --config.data.data_dir=DATA --config.data.name=llava_conversations/default
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (the 115M draft on a TPU slice)."""
  return stage_config('draft_distill', scale)
