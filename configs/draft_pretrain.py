r"""Stage 1 of the language-only draft: next-token pretraining on text, packed sequences.

  python train.py --config=configs/draft_pretrain.py:tiny --workdir=/tmp/draft_pretrain \
      --config.tokenizer=TARGET_DIR --config.data.data_dir=DATA \
      --config.data.prepare.builder=text_corpus --config.data.prepare.files='corpus/*.txt'

  # The paper's 115M draft on a TPU slice, on a prepared TFDS dataset (e.g. c4/en):
  python train.py --config=configs/draft_pretrain.py:paper --workdir=gs://BUCKET/draft_pretrain \
      --config.tokenizer=llava-1.5-7b-hf --config.data.data_dir=gs://BUCKET/tfds \
      --config.data.name=c4/en --config.multihost=True
"""

from mmspec_jax.training.defaults import stage_config


def get_config(scale: str = 'tiny'):
  """scale: 'tiny' (CPU, a minute) or 'paper' (the 115M draft on a TPU slice)."""
  return stage_config('draft_pretrain', scale)
