r"""Conversion of a Hugging Face LLaVA or LLaMA checkpoint (mmspec-convert; docs/conversion.md).

  mmspec-convert --config.hf_dir=llava-hf/llava-1.5-7b-hf --config.out_dir=llava-7b-jax \
      [--config.dtype=bfloat16]
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # The Hugging Face model: a directory, or a Hub id (org/name) in the local Hugging Face cache.
  config.hf_dir = ''
  # Where the converted checkpoint goes (new or empty).
  config.out_dir = ''
  # Parameter and compute dtype of the converted model: 'float32' | 'bfloat16' | 'float16'.
  config.dtype = 'float32'
  # Allow pickled pytorch_model*.bin weights (unpickling can run code: trusted files only).
  config.allow_pickle = False
  return config
