"""Export of a Flax LLaMA (our drafts) to a Hugging Face `LlamaForCausalLM` directory.

The same key table as conversion, read backwards, so a draft trained here loads in transformers,
vLLM or any engine that reads HF checkpoints.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmspec_jax.convert import hf_keys
from mmspec_jax.convert.hf_config import ConversionError, llama_config_to_hf
from mmspec_jax.convert.loading import copy_tokenizer_files
from mmspec_jax.models.config import LlamaConfig


def export_llama_to_hf(params, config: LlamaConfig, out_dir: str, *,
                       tokenizer_dir: str | None = None) -> str:
  """Writes config.json, model.safetensors and (from `tokenizer_dir`) the tokenizer files."""
  if not isinstance(config, LlamaConfig):
    raise ConversionError(f'export supports LLaMA models only, not {type(config).__name__}')
  from safetensors.flax import save_file  # Writes bfloat16, which the numpy writer cannot.
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  entries = hf_keys.entries({p: np.shape(v) for p, v in flat.items()}, hf_keys.LLAMA_ROOTS,
                            {hf_keys.TEXT: {'layers': 0}})
  tensors = {}
  for entry in entries:
    prefix = hf_keys.LLAMA_PREFIXES[entry.component][0]
    array = np.asarray(jax.device_get(flat[entry.path]))
    layers = array if entry.stacked else array[None]
    for name, layer in zip(entry.hf_names, layers):
      # Contiguous copies: safetensors writes raw buffers.
      tensors[prefix + name] = jnp.asarray(np.ascontiguousarray(hf_keys.to_hf(entry.kind, layer)))
  os.makedirs(out_dir, exist_ok=True)
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, out_dir)
  llama_config_to_hf(config).save_pretrained(out_dir)  # After the copy: ours wins.
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  return out_dir
