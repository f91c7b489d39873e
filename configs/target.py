r"""A whole LLaVA (vision tower, projector, language model) trained from scratch: the offline
world's target (configs/world.py sizes it for the world). Tiny scale only: real targets are
converted from Hugging Face checkpoints, not trained here.

  python train.py --config=configs/target.py:tiny --workdir=/tmp/target \
      --config.tokenizer=PROCESSOR_DIR --config.data.data_dir=DATA \
      --config.data.prepare.builder=llava_conversations \
      --config.data.prepare.json_files=train.json --config.data.prepare.image_folder=IMAGES
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU)."""
  return stage_config('target', scale)
