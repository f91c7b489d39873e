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


@flax.struct.dataclass
class LayerCache:
  """One layer's view of the stacked cache, inside the layer loop.

  It holds the whole [L, B, S, K, H] buffers and the layer's index rather than that layer's
  [B, S, K, H] slice: a layer reads only its live blocks (`attention.cached_attention`) and
  writes only its new entries, in place. Slicing a layer out and stacking it back (or scanning the
  cache as the layer scan's input and output) rewrites the whole cache on every call.
  """
  keys: jax.Array  # [L, B, S, K, H]
  values: jax.Array  # [L, B, S, K, H]
  lengths: jax.Array  # int32[B]: valid slots before this call's tokens
  layer: jax.Array  # int32[] (or a Python int in the unrolled layout)

  @property
  def max_length(self) -> int:
    return self.keys.shape[2]

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> 'LayerCache':
    """Writes this call's keys and values [B, T, K, H] at their positions int32[B, T].

    Positions past the end of the cache are dropped (the caller sizes the cache), never clamped
    onto valid slots.
    """
    rows = jnp.arange(keys.shape[0])[:, None]  # [B, 1]
    put = lambda buffer, new: buffer.at[self.layer, rows, positions].set(
        new.astype(buffer.dtype), mode='drop')
    return self.replace(keys=put(self.keys, keys), values=put(self.values, values))
