"""Export to Hugging Face directories: our LLaMA drafts as `LlamaForCausalLM`, LLaVA targets as
`LlavaForConditionalGeneration`.

The same key table as conversion, read backwards, so a model trained here loads in transformers,
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
from mmspec_jax.convert.hf_config import ConversionError, llama_config_to_hf, llava_config_to_hf
from mmspec_jax.convert.loading import copy_tokenizer_files, layout
from mmspec_jax.models.config import LlamaConfig, LlavaConfig


def _hf_tensors(params, config: LlamaConfig | LlavaConfig) -> dict[str, jax.Array]:
  """Our parameters as HF tensors under the on-disk (legacy) names transformers writes."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  roots, prefixes, stacks = layout(config)
  tensors = {}
  for entry in hf_keys.entries({p: np.shape(v) for p, v in flat.items()}, roots, stacks):
    prefix = prefixes[entry.component][0]
    array = np.asarray(jax.device_get(flat[entry.path]))
    layers = array if entry.stacked else array[None]
    for name, layer in zip(entry.hf_names, layers):
      # Contiguous copies: safetensors writes raw buffers.
      tensors[prefix + name] = jnp.asarray(np.ascontiguousarray(hf_keys.to_hf(entry.kind, layer)))
  return tensors


def export_to_hf(params, config: LlamaConfig | LlavaConfig, out_dir: str, *,
                 tokenizer_dir: str | None = None) -> str:
  """Writes a `LlamaForCausalLM` or `LlavaForConditionalGeneration` directory: config.json,
  model.safetensors and (from `tokenizer_dir`) the tokenizer and processor files."""
  if not isinstance(config, (LlamaConfig, LlavaConfig)):
    raise ConversionError(f'export supports LLaMA and LLaVA models, not {type(config).__name__}')
  from safetensors.flax import save_file  # Writes bfloat16, which the numpy writer cannot.
  tensors = _hf_tensors(params, config)
  os.makedirs(out_dir, exist_ok=True)
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, out_dir)
  hf_config = (llama_config_to_hf(config) if isinstance(config, LlamaConfig)
               else llava_config_to_hf(config))
  hf_config.save_pretrained(out_dir)  # After the copy: ours wins.
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  return out_dir


def export_llama_to_hf(params, config: LlamaConfig, out_dir: str, *,
                       tokenizer_dir: str | None = None) -> str:
  """A LLaMA draft as a Hugging Face `LlamaForCausalLM` directory."""
  if not isinstance(config, LlamaConfig):
    raise ConversionError(f'export_llama_to_hf exports LLaMA models, not {type(config).__name__}')
  return export_to_hf(params, config, out_dir, tokenizer_dir=tokenizer_dir)
