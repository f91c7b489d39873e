r"""The adapter draft, stage 1: train only the adapter (projector) on caption pairs.

The target's CLIP tower (frozen) gives the image features; the draft LM (from the language-only
draft, frozen here) reads them through the new projector. LLaVA-1.5's own stage 1, scaled down.
The adapter's input width and image token are taken from the target.

  python train.py --config=configs/adapter_stage1.py:tiny --workdir=/tmp/adapter_stage1 \
      --config.init_from=/tmp/draft_chat/export --config.target=TARGET_DIR \
      --config.data.data_dir=DATA --config.data.prepare.builder=llava_conversations \
      --config.data.prepare.json_files=captions.json --config.data.prepare.image_folder=IMAGES
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (the 115M draft on a TPU slice)."""
  return stage_config('adapter_stage1', scale)
