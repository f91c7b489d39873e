"""Building blocks shared by the LLaMA decoder and the CLIP vision tower.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads, G query heads per
kv head (N = K * G), H head dim, D model dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax import axes
from mmspec_jax.models.config import RopeScaling


def partitioned(init: nn.initializers.Initializer, names: Sequence[str | None]):
  """An initializer whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def residual_init_scale(num_layers: int) -> float:
  """Init scale of a layer's output projection back into the residual stream (GPT-2's
  1/sqrt(2L)): the stream then grows by O(1) over all 2L branches, not O(sqrt(L))."""
  return 1.0 / np.sqrt(2 * num_layers)


class Dense(nn.Module):
  """A linear map contracting the last `num_contracted` input axes, kernel [*in, *features].

  Written out rather than nn.DenseGeneral, whose initializer builds a flattened 2-D kernel that
  clashes with rank-3 logical axis names once a mesh is active.

  Kernels start at variance init_scale^2 / fan_in (LeCun), not HF's fixed std 0.02: converted
  checkpoints never see the init, but models trained from scratch do, and at the small widths of
  tests and the offline world a fixed 0.02 shrinks the signal ~5x per matmul, which starves the
  vision tower of gradient (its features then blow up instead of learning; see configs/world.py).
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]  # Every kernel axis: the contracted inputs, then the outputs.
  num_contracted: int = 1
  use_bias: bool = False
  init_scale: float = 1.0  # residual_init_scale(L) for projections into a residual stream.
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # The matmul's accumulation and output dtype (`preferred_element_type`); None: `dtype`.
  output_dtype: jnp.dtype | None = None
  # Kernel stored [*features, *in] (a decoding layout's choice, models/layout.py): each output
  # then reads one contiguous row of weights, which XLA:CPU streams faster for a single row of x.
  output_major: bool = False

  # A matmul over fewer rows (of x flattened to [M, in]) is padded with zero rows up to this many:
  # XLA:CPU's bfloat16 kernels cost ~10x more for one or two rows than for three
  # (models/layout.py, `Layout.min_matmul_rows`). Each row's result does not depend on the others.
  min_rows: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    contracted = x.shape[-self.num_contracted:]
    num_in, num_out = self.num_contracted, len(self.features)
    inputs, outputs = tuple(range(num_in)), tuple(range(num_in, num_in + num_out))
    shape, names = contracted + self.features, self.names
    if self.output_major:
      inputs, outputs = tuple(range(num_out, num_out + num_in)), tuple(range(num_out))
      shape, names = self.features + contracted, names[num_in:] + names[:num_in]
    init = nn.initializers.variance_scaling(self.init_scale ** 2, 'fan_in', 'normal',
                                            in_axis=inputs, out_axis=outputs)
    kernel = self.param('kernel', partitioned(init, names), shape, self.param_dtype)
    y = self._matmul(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros_init(),
                                            self.names[-len(self.features):]),
                        self.features, self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y

  def _matmul(self, x, kernel):
    """x [*lead, *in] times the kernel: [*lead, *features] in `output_dtype` (default `dtype`).

    Products accumulate in float32 when the model computes in a narrower type (bfloat16 products
    are exact in float32; only the result is rounded, once)."""
    num_in = self.num_contracted
    lead, contracted = x.shape[:-num_in], x.shape[-num_in:]
    if self.output_major:  # kernel [*features, *in]: as one [out, in] matrix (XLA:CPU would
      # otherwise transpose a kernel with several output axes to input-major on every call).
      rows = x.reshape(math.prod(lead), math.prod(contracted)).astype(self.dtype)  # [M, in]
      matrix = kernel.reshape(math.prod(self.features), -1)
    else:
      # The kernel keeps its axes: merging them would merge a sharded axis into an unsharded
      # one (a fused [D, 2, F] with F split over devices), which costs an all-gather of it.
      rows = x.reshape(math.prod(lead), *contracted).astype(self.dtype)  # [M, *in]
      matrix = kernel
    out = matmul(rows, matrix, output_major=self.output_major, min_rows=self.min_rows,
                 dtype=self.output_dtype or self.dtype)
    return out.reshape(*lead, *self.features)


def matmul(rows: jax.Array, matrix: jax.Array, *, output_major: bool, min_rows: int = 1,
           dtype=None) -> jax.Array:
  """rows [M, *in] times a matrix [*in, *out] (or [out, *in] when `output_major`) -> [M, *out]
  in `dtype` (default the rows'), accumulated in float32 when that is narrower (bfloat16 products
  are exact in float32: the result is rounded once). Fewer than `min_rows` rows are padded with
  zero rows for the multiplication (`Dense.min_rows`)."""
  dtype = jnp.dtype(dtype or rows.dtype)
  num_rows, num_in = rows.shape[0], rows.ndim - 1
  if num_rows < min_rows:
    rows = jnp.pad(rows, ((0, min_rows - num_rows),) + ((0, 0),) * num_in)
  contracted = (tuple(range(matrix.ndim - num_in, matrix.ndim)) if output_major
                else tuple(range(num_in)))
  out = jax.lax.dot_general(rows, matrix, ((tuple(range(1, num_in + 1)), contracted), ((), ())),
                            preferred_element_type=jnp.promote_types(dtype, jnp.float32))
  return out[:num_rows].astype(dtype)


def dense(features: int | Sequence[int], names: Sequence[str | None], *, axis=-1,
          use_bias=False, init_scale: float = 1.0, dtype, param_dtype, name: str,
          output_dtype=None, output_major: bool = False, min_rows: int = 1) -> Dense:
  """A Dense whose kernel (and bias) carry logical axis names.

  `names` names every kernel axis: the contracted input axes first, then the output axes;
  `axis` is -1 or a tuple of trailing axes (e.g. (-2, -1) to contract heads and head_dim).
  """
  features = tuple(features) if isinstance(features, Sequence) else (features,)
  num_contracted = len(axis) if isinstance(axis, Sequence) else 1
  return Dense(features=features, names=tuple(names), num_contracted=num_contracted,
               use_bias=use_bias, init_scale=init_scale, dtype=dtype, param_dtype=param_dtype,
               output_dtype=output_dtype, output_major=output_major, min_rows=min_rows,
               name=name)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: variance in float32, normalize, cast back, then scale (as transformers)."""
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', partitioned(nn.initializers.ones_init(), (axes.NORM,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * normed


def layer_norm(eps: float, dtype, param_dtype, name: str, axis_name: str) -> nn.LayerNorm:
  """A LayerNorm (scale and bias) whose parameters carry a logical axis name."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones_init(), (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros_init(), (axis_name,)))


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
  """float32[H/2] inverse frequencies, computed in float32 as transformers does."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  kind = scaling.rope_type
  if kind == 'default':
    return inv_freq
  if kind == 'linear':
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  if kind == 'llama3':
    # transformers' _compute_llama3_parameters: keep high frequencies, divide low ones by
    # `factor`, and interpolate smoothly between the two wavelength bands.
    factor = scaling.factor
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f'unsupported rope_scaling type {kind!r}; supported: default, linear, llama3 '
                   "('dynamic' rescales with the sequence length and is not supported)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE (no q/k permutation), cos/sin in float32 as transformers.

  x: [B, T, N, H]; positions: int32[B, T].
  """
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
  """Grouped-query attention with scores and softmax in float32.

  query: [B, T, N, H]; key, value: [B, S, K, H]; mask: bool[B, T, S] (True = attend) or None.
  Returns [B, T, N, H].
  """
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  grouped = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum('btkgh,bskh->bkgts', grouped, key,
                      preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)  # [B, K, G, T, S]
  out = jnp.einsum('bkgts,bskh->btkgh', probs, value)
  return out.reshape(batch, length, num_heads, head_dim)
