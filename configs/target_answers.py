r"""The target answers training prompts (mmspec-target-answers; docs/training.md): the data the
drafts are distilled on.

  mmspec-target-answers --config.target=DIR --config.json_files=train.json \
      --config.image_folder=IMAGES --config.out=answers.json [--config.draft=DIR]
"""

import ml_collections

from mmspec_jax import distributed


def get_config():
  config = ml_collections.ConfigDict()
  # Target model directory (HF or converted) or Hub id.
  config.target = ''
  # LLaVA-format JSON files of the records to answer, comma-separated.
  config.json_files = ''
  # Where the records' images are.
  config.image_folder = ''
  # The LLaVA JSON file to write (resumed when it exists).
  config.out = ''
  # A draft to decode speculatively with ('' = the target alone; the answers are the same).
  config.draft = ''
  # Draft tokens per step.
  config.gamma = 5
  # 'greedy' or 'sample'.
  config.sampling = 'greedy'
  # Base PRNG seed.
  config.seed = 0
  # Tokens per answer at most.
  config.max_new_tokens = 128
  # Decode slots.
  config.batch_size = 16
  # Prompt + new tokens a slot holds; 0 = what the prompts can need.
  config.slot_capacity = 0
  # 'float32' | 'bfloat16' | 'float16'.
  config.dtype = 'float32'
  # Several processes: config.multihost and config.distributed (docs/multihost.md).
  distributed.add_config(config)
  return config
