"""The CLIP ViT vision tower, as LLaVA uses it: features from one hidden layer, no pooling.

Axis legend: B images, P patches (+1 with CLS), D vision width, N heads, H head dim, F MLP dim.

Only the layers up to `vision_feature_layer` run. The layers after it and `post_layernorm` are
still held as parameters (created at init, never applied) so that a converted checkpoint keeps
every tensor of the original and parameter counts match transformers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import axes, sharding
from mmspec_jax.models.config import VisionConfig, resolve_dtype
from mmspec_jax.models.layers import (dense, dot_product_attention, layer_norm, partitioned,
                                      residual_init_scale)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
  if name == 'quick_gelu':
    return quick_gelu
  if name == 'gelu':
    return lambda x: nn.gelu(x, approximate=False)  # torch's GELU is the exact erf form.
  raise ValueError(f"unsupported vision hidden_act {name!r}; expected 'quick_gelu' or 'gelu'")


class ClipAttention(nn.Module):
  """Bidirectional multi-head attention with biases."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x):  # [B, P, D] -> [B, P, D]
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    heads = (cfg.num_heads, cfg.head_dim)
    qkv_names = (axes.VISION_EMBED, axes.VISION_HEADS, axes.HEAD_DIM)
    query, key, value = (dense(heads, qkv_names, use_bias=True, name=proj, **kwargs)(x)
                         for proj in ('q_proj', 'k_proj', 'v_proj'))  # each [B, P, N, H]
    attended = dot_product_attention(query, key, value, mask=None)  # [B, P, N, H]
    return dense(cfg.hidden_size, (axes.VISION_HEADS, axes.HEAD_DIM, axes.VISION_EMBED),
                 axis=(-2, -1), use_bias=True, init_scale=residual_init_scale(cfg.num_layers),
                 name='out_proj', **kwargs)(attended)


class ClipMlp(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, x):  # [B, P, D] -> [B, P, D]
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    hidden = dense(cfg.intermediate_size, (axes.VISION_EMBED, axes.VISION_MLP), use_bias=True,
                   name='fc1', **kwargs)(x)
    hidden = activation(cfg.hidden_act)(hidden)
    return dense(cfg.hidden_size, (axes.VISION_MLP, axes.VISION_EMBED), use_bias=True,
                 init_scale=residual_init_scale(cfg.num_layers), name='fc2', **kwargs)(hidden)


class ClipEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)). Scanned over layers."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x, _):  # [B, P, D] -> [B, P, D]
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    normed = layer_norm(cfg.layer_norm_eps, name='layer_norm1', axis_name=axes.NORM, **kwargs)(x)
    x = x + ClipAttention(cfg, name='self_attn')(normed)
    normed = layer_norm(cfg.layer_norm_eps, name='layer_norm2', axis_name=axes.NORM, **kwargs)(x)
    x = x + ClipMlp(cfg, name='mlp')(normed)
    return x, None


class ClipEmbeddings(nn.Module):
  """Conv patch embedding (no bias), CLS token, learned positions."""
  config: VisionConfig

  @nn.compact
  def __call__(self, images):  # float[B, H, W, C] -> [B, P + 1, D]
    cfg = self.config
    dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    patches = nn.Conv(
        cfg.hidden_size, kernel_size=(cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size), padding='VALID', use_bias=False,
        dtype=dtype, param_dtype=param_dtype, name='patch_embedding',
        kernel_init=partitioned(nn.initializers.lecun_normal(),
                                (None, None, None, axes.VISION_EMBED)))(images.astype(dtype))
    batch, _, _, width = patches.shape  # [B, h, w, D]
    patches = patches.reshape(batch, -1, width)  # [B, P, D], row-major as CLIP flattens
    class_embedding = self.param(
        'class_embedding', partitioned(nn.initializers.normal(0.02), (axes.VISION_EMBED,)),
        (cfg.hidden_size,), param_dtype)
    position_embedding = self.param(
        'position_embedding',
        partitioned(nn.initializers.normal(0.02), (axes.VISION_POSITIONS, axes.VISION_EMBED)),
        (cfg.num_patches + 1, cfg.hidden_size), param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, width))
    return jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(dtype)


def _layer_stack(config: VisionConfig, length: int, name: str) -> nn.Module:
  stack = nn.scan(ClipEncoderLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                  length=length, metadata_params={nn.PARTITION_NAME: axes.LAYERS})
  return stack(config, name=name)


class ClipVisionTower(nn.Module):
  """images float32[B, H, W, 3] (normalized, channels last) -> features [B, P', D]."""
  config: VisionConfig
  num_layers_computed: int  # hidden_states index: 0 is the embeddings, i the output of layer i.
  drop_cls: bool  # vision_feature_select_strategy 'default' drops the CLS position.

  def setup(self):
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    self.embeddings = ClipEmbeddings(cfg)
    self.pre_layrnorm = layer_norm(cfg.layer_norm_eps, name='pre_layrnorm',
                                   axis_name=axes.NORM, **kwargs)
    num_unused = cfg.num_layers - self.num_layers_computed
    self.layers = (_layer_stack(cfg, self.num_layers_computed, 'layers')
                   if self.num_layers_computed else None)
    self.unused_layers = _layer_stack(cfg, num_unused, 'unused_layers') if num_unused else None
    self.post_layernorm = layer_norm(cfg.layer_norm_eps, name='post_layernorm',
                                     axis_name=axes.NORM, **kwargs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embeddings(images)  # [B, P + 1, D]
    x = self.pre_layrnorm(x)  # hidden_states[0]
    if self.layers is not None:
      x, _ = self.layers(x, None)  # hidden_states[num_layers_computed]
    if self.is_initializing():
      # Create the parameters that LLaVA never applies; XLA drops this dead computation.
      unused = x if self.unused_layers is None else self.unused_layers(x, None)[0]
      self.post_layernorm(unused)
    x = sharding.constrain(x, (axes.BATCH, None, axes.ACT_EMBED))
    return x[:, 1:] if self.drop_cls else x
