r"""The adapter draft, stage 2: train adapter and language model on instruction data with images.

LLaVA-1.5's own stage 2, scaled down: starts from stage 1's export; the target's CLIP tower stays
frozen.

  python train.py --config=configs/adapter_stage2.py:tiny --workdir=/tmp/adapter_stage2 \
      --config.init_from=/tmp/adapter_stage1/export --config.target=TARGET_DIR \
      --config.data.data_dir=DATA --config.data.prepare.builder=llava_conversations \
      --config.data.prepare.json_files=llava_instruct.json --config.data.prepare.image_folder=IMAGES
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (the 115M draft on a TPU slice)."""
  return stage_config('adapter_stage2', scale)
