"""Flax models: the LLaMA decoder, the CLIP vision tower and LLaVA, with an explicit KV cache."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax.models.config import (AdapterDraftConfig, FeatureDraftConfig, LlamaConfig,
                                      LlavaConfig, ModelConfig, VisionConfig,
                                      default_feature_layers, model_type)
from mmspec_jax.models.draft import AdapterDraft
from mmspec_jax.models.feature_draft import FeatureDraft
from mmspec_jax.models.attention import TreeAttention
from mmspec_jax.models.kv_cache import KVCache
from mmspec_jax.models.llama import Llama
from mmspec_jax.models import layout as _layout
from mmspec_jax.models.layout import CANONICAL, Layout
from mmspec_jax.models.llava import Llava

__all__ = ['AdapterDraft', 'AdapterDraftConfig', 'FeatureDraft', 'FeatureDraftConfig', 'KVCache',
           'Layout', 'Llama', 'LlamaConfig', 'Llava', 'LlavaConfig', 'ModelConfig', 'TreeAttention',
           'VisionConfig', 'abstract_params', 'arrange_params', 'build', 'default_feature_layers',
           'init_inputs', 'init_params', 'initialize', 'model_type', 'parameter_count',
           'text_config']


def build(config: ModelConfig, layout: Layout = CANONICAL) -> nn.Module:
  """The Flax module for a config, its language model's layers arranged as `layout` says."""
  if isinstance(config, LlavaConfig):
    return Llava(config, layout)
  if isinstance(config, LlamaConfig):
    return Llama(config, layout)
  if isinstance(config, AdapterDraftConfig):
    return AdapterDraft(config, layout)
  if isinstance(config, FeatureDraftConfig):
    return FeatureDraft(config, layout)
  raise TypeError(f'not a model config: {type(config).__name__}')


def text_config(config: ModelConfig) -> LlamaConfig:
  """The language model's config (what sizes the KV cache)."""
  return config if isinstance(config, LlamaConfig) else config.text


def init_inputs(config: ModelConfig):
  """The smallest inputs that touch every parameter (an image for LLaVA)."""
  if isinstance(config, LlavaConfig):
    size = config.vision.image_size
    tokens = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    return (tokens, jnp.zeros((1, size, size, config.vision.num_channels), jnp.float32))
  if isinstance(config, AdapterDraftConfig):
    tokens = jnp.array([[1, config.image_token_index]], jnp.int32)
    return (tokens, jnp.zeros((1, 1, config.vision_hidden_size), jnp.float32))
  if isinstance(config, FeatureDraftConfig):
    features = (1, 1, len(config.feature_layers), config.target_hidden_size)
    return (jnp.zeros((1, 1), jnp.int32), jnp.zeros(features, jnp.float32))
  return (jnp.zeros((1, 1), jnp.int32),)


def initialize(config: ModelConfig, rng: jax.Array, layout: Layout = CANONICAL):
  """Random parameters, boxed with their logical axis names (trace under jit or eval_shape)."""
  return build(config, layout).init(rng, *init_inputs(config))['params']


def abstract_params(config: ModelConfig, layout: Layout = CANONICAL):
  """Parameter shapes and dtypes (boxed with their logical axis names), allocating nothing.
  Traced once per (config, layout): tracing a model's init takes 0.1-0.7 s, and loading,
  placement, training and the plan all ask. Each call gets its own containers."""
  return jax.tree.map(lambda leaf: leaf, _traced_abstract_params(config, layout))


@functools.lru_cache(maxsize=64)
def _traced_abstract_params(config: ModelConfig, layout: Layout):
  shapes = jax.eval_shape(functools.partial(initialize, config, layout=layout),
                          jax.random.key(0))
  # Shape and dtype only: no sharding from whatever mesh was active at the first call.
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), shapes)


def init_params(config: ModelConfig, rng: jax.Array):
  """Randomly initialized parameters (plain arrays)."""
  return nn.unbox(jax.jit(initialize, static_argnums=0)(config, rng))


def parameter_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def arrange_params(config: ModelConfig, params, layout: Layout, shardings=None):
  """Canonical params (as loaded or trained) with the language model's layers arranged as
  `layout` says (see models/layout.py); the vision tower, run once per image, stays scanned.
  shardings: the arranged params' shardings (e.g. from `abstract_params(config, layout)`)."""
  kv_heads = text_config(config).num_kv_heads
  if isinstance(config, LlamaConfig):
    return _layout.arrange_params(params, layout, kv_heads, shardings)
  language_shardings = None if shardings is None else shardings['language_model']
  return {**params, 'language_model': _layout.arrange_params(
      params['language_model'], layout, kv_heads, language_shardings)}
