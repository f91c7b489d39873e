r"""Stage 2 of the language-only draft: fine-tuning on conversations, images dropped.

LLaVA-format JSON (LLaVA-Instruct-150K, ScienceQA converted, ...): `<image>` placeholders are
removed (the draft never sees images) and the loss covers the assistant's tokens only.

  python train.py --config=configs/draft_chat.py:tiny --workdir=/tmp/draft_chat \
      --config.init_from=/tmp/draft_pretrain/export --config.tokenizer=TARGET_DIR \
      --config.data.data_dir=DATA --config.data.prepare.builder=llava_conversations \
      --config.data.prepare.json_files=llava_instruct.json --config.data.prepare.image_folder=IMAGES
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (the 115M draft on a TPU slice)."""
  return stage_config('draft_chat', scale)
