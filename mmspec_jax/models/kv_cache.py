"""The explicit KV cache: a pytree passed into the decoder and returned, never a Flax variable.

Slot s of a row holds the key/value of the token at position s, so a row's valid prefix is
`[0, lengths[b])`. Appending T tokens writes slots `lengths[b] .. lengths[b] + T - 1`; a query at
position p attends to slots `<= p`. Hence rolling a row back after rejected draft tokens is only
`lengths[b] -= r`: stale slots past the length are never attended and are overwritten by the next
write.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mmspec_jax import axes
from mmspec_jax.models.config import LlamaConfig, resolve_dtype

# Logical names of the stacked [L, B, S, K, H] key and value arrays.
CACHE_AXES = (axes.CACHE_LAYERS, axes.CACHE_BATCH, axes.CACHE_SEQUENCE, axes.CACHE_KV_HEADS,
              axes.CACHE_HEAD_DIM)


@flax.struct.dataclass
class KVCache:
  keys: jax.Array  # [L, B, S, K, H]
  values: jax.Array  # [L, B, S, K, H]
  lengths: jax.Array  # int32[B]: valid slots per row

  @classmethod
  def init(cls, config: LlamaConfig, batch_size: int, max_length: int,
           dtype: str | None = None) -> 'KVCache':
    """An empty cache holding up to `max_length` positions per row, in the compute dtype."""
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    dtype = resolve_dtype(dtype or config.dtype)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  @classmethod
  def logical_axes(cls) -> 'KVCache':
    """The same pytree with each leaf replaced by its tuple of logical axis names."""
    return cls(keys=CACHE_AXES, values=CACHE_AXES, lengths=(axes.CACHE_BATCH,))

  @property
  def max_length(self) -> int:
    return self.keys.shape[2]

  def with_lengths(self, lengths: jax.Array) -> 'KVCache':
    """Sets each row's valid length; a shorter length rolls the row back."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))


def write(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """Writes new entries into one layer's cache at their positions.

  cache_layer: [B, S, K, H]; new: [B, T, K, H]; positions: int32[B, T]. Positions past the end of
  the cache are dropped (the caller sizes the cache), never clamped onto valid slots.
  """
  rows = jnp.arange(new.shape[0])[:, None]  # [B, 1]
  return cache_layer.at[rows, positions].set(new.astype(cache_layer.dtype), mode='drop')


def attention_mask(positions: jax.Array, cache_length: int) -> jax.Array:
  """bool[B, T, S]: a query at position p sees cache slots 0..p."""
  slots = jnp.arange(cache_length)[None, None, :]
  return slots <= positions[:, :, None]
