r"""Stage 1 of the language-only draft: next-token pretraining on text, packed sequences.

  python train.py --config=configs/draft_pretrain.py:tiny --workdir=/tmp/draft_pretrain \
      --config.tokenizer=TARGET_DIR --config.data.data_dir=DATA \
      --config.data.prepare.builder=text_corpus --config.data.prepare.files='corpus/*.txt'

  # The paper's 115M draft on a TPU slice, on a prepared TFDS dataset (e.g. c4/en):
  python train.py --config=configs/draft_pretrain.py:paper --workdir=gs://BUCKET/draft_pretrain \
      --config.tokenizer=llava-1.5-7b-hf --config.data.data_dir=gs://BUCKET/tfds \
      --config.data.name=c4/en --config.multihost=True
"""

from mmspec_jax.models import presets
from mmspec_jax.training.defaults import base_config


def get_config(scale: str = 'tiny'):
  config = base_config()
  config.stage = 'draft_pretrain'
  config.task = 'lm'
  config.data.kind = 'pretrain'
  if scale == 'tiny':
    config.model = presets.as_config_dict(presets.get('tiny_llama'))
    config.data.seq_len = 64
    config.batch_size = 8
    config.num_train_steps = 200
    config.learning_rate = 3e-3
    config.warmup_steps = 20
    config.data.prepare.validation_fraction = 0.1
  elif scale == 'paper':
    config.model = presets.as_config_dict(presets.get('draft_115m'))
    config.data.seq_len = 2048
    config.batch_size = 256
    config.num_train_steps = 100_000
    config.learning_rate = 3e-4
    config.warmup_steps = 2000
    config.dtype = 'bfloat16'
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    config.mesh.data, config.mesh.fsdp = 1, -1
  else:
    raise ValueError(f"unknown scale {scale!r}; expected 'tiny' or 'paper'")
  return config
