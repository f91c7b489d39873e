r"""The 7B-scale plan check: compile on abstract shapes, report per-device memory.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m mmspec_jax.plan --config=configs/plan.py --config.mesh.tensor=8

  # LLaVA-1.5-13B on the same 8 devices:
  ... --config.target=llava_1_5_13b
"""

import ml_collections

from mmspec_jax import sharding


def get_config():
  config = ml_collections.ConfigDict()
  # Model presets (mmspec_jax/models/presets.py): the target and the draft ('' = no draft).
  config.target = 'llava_1_5_7b'
  config.draft = 'draft_115m'
  # Decoding: rows, prompt tokens (576 of them image placeholders), new tokens, gamma.
  config.batch_size = 8
  config.prompt_length = 1024
  config.max_new_tokens = 1024  # prompt + new = 2048 positions.
  config.num_draft_tokens = 5
  config.temperature = 0.0
  # Compute and parameter dtype for decoding (the train step keeps float32 parameters).
  config.dtype = 'bfloat16'
  # The draft's train step (batch_size 0 skips it).
  config.train = ml_collections.ConfigDict(dict(batch_size=64, seq_len=2048,
                                                num_micro_batches=4))
  # Per-device memory to check against, e.g. 16 GiB for a TPU v5e chip.
  config.memory_per_device_gib = 16.0
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=-1))
  config.logical_axis_rules = sharding.DEFAULT_RULES
  return config
