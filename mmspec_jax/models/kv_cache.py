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
from mmspec_jax.models.layout import CANONICAL, Layout

# Logical names of the stacked [L, B, S, K, H] key and value arrays, and of the heads-first
# [K, L, B, S, H] ones (`Layout.cache_heads_first`: the TPU paged kernel's order).
CACHE_AXES = (axes.CACHE_LAYERS, axes.CACHE_BATCH, axes.CACHE_SEQUENCE, axes.CACHE_KV_HEADS,
              axes.CACHE_HEAD_DIM)
HEADS_FIRST_CACHE_AXES = (axes.CACHE_KV_HEADS, axes.CACHE_LAYERS, axes.CACHE_BATCH,
                          axes.CACHE_SEQUENCE, axes.CACHE_HEAD_DIM)


def _capacity(keys: jax.Array, heads_first: bool) -> int:
  return keys.shape[3 if heads_first else 2]


@flax.struct.dataclass
class KVCache:
  keys: jax.Array  # [L, B, S, K, H], or [K, L, B, S, H] when heads_first
  values: jax.Array  # as keys
  lengths: jax.Array  # int32[B]: valid slots per row
  heads_first: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def init(cls, config: LlamaConfig, batch_size: int, max_length: int,
           dtype: str | None = None, layout: Layout = CANONICAL) -> 'KVCache':
    """An empty cache holding at least `max_length` positions per row, in `dtype` (default the
    layout's `cache_dtype`, else the compute dtype), stored as `layout` (the model's) reads it."""
    capacity = layout.cache_capacity(max_length)
    shape = (config.num_layers, batch_size, capacity, config.num_kv_heads, config.head_dim)
    if layout.cache_heads_first:
      shape = (shape[3],) + shape[:3] + shape[4:]
    dtype = resolve_dtype(dtype or layout.cache_dtype or config.dtype)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch_size,), jnp.int32), heads_first=layout.cache_heads_first)

  @classmethod
  def logical_axes(cls, heads_first: bool = False) -> 'KVCache':
    """The same pytree with each leaf replaced by its tuple of logical axis names."""
    names = HEADS_FIRST_CACHE_AXES if heads_first else CACHE_AXES
    return cls(keys=names, values=names, lengths=(axes.CACHE_BATCH,), heads_first=heads_first)

  @property
  def max_length(self) -> int:
    return _capacity(self.keys, self.heads_first)

  def with_lengths(self, lengths: jax.Array) -> 'KVCache':
    """Sets each row's valid length; a shorter length rolls the row back."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

  def move_slots(self, base: jax.Array, sources: jax.Array) -> 'KVCache':
    """Copies, in every layer and row b, slot base[b] + sources[b, j] to slot base[b] + j,
    j = 0 .. P-1 (sources int32[B, P], base int32[B]); an identity entry (sources[b, j] == j)
    leaves its slot as it is. A tree's accepted path is so moved onto consecutive slots: path
    node j sits at a flattened index >= j, and every source is read before any slot is written.
    Lengths are unchanged."""
    rows = jnp.arange(sources.shape[0])[:, None]  # [B, 1]
    source_slots = base[:, None] + sources  # [B, P]
    target_slots = base[:, None] + jnp.arange(sources.shape[1])[None, :]
    if self.heads_first:  # [K, L, B, S, H]
      move = lambda buffer: buffer.at[:, :, rows, target_slots].set(
          buffer[:, :, rows, source_slots], mode='drop')
    else:  # [L, B, S, K, H]
      move = lambda buffer: buffer.at[:, rows, target_slots].set(
          buffer[:, rows, source_slots], mode='drop')
    return self.replace(keys=move(self.keys), values=move(self.values))


@flax.struct.dataclass
class LayerCache:
  """One layer's view of the stacked cache, inside the layer loop.

  It holds the whole [L, B, S, K, H] (or heads-first [K, L, B, S, H]) buffers and the layer's
  index rather than that layer's slice: a layer reads only its live blocks
  (`attention.cached_attention`) and writes only its new entries, in place. Slicing a layer out
  and stacking it back (or scanning the cache as the layer scan's input and output) rewrites the
  whole cache on every call.
  """
  keys: jax.Array  # [L, B, S, K, H] or [K, L, B, S, H]
  values: jax.Array
  lengths: jax.Array  # int32[B]: valid slots before this call's tokens
  layer: jax.Array  # int32[] (or a Python int in the unrolled layout)
  heads_first: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def max_length(self) -> int:
    return _capacity(self.keys, self.heads_first)

  def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> 'LayerCache':
    """Writes this call's keys and values [B, T, K, H] at their positions int32[B, T].

    Positions past the end of the cache are dropped (the caller sizes the cache), never clamped
    onto valid slots.
    """
    rows = jnp.arange(keys.shape[0])[:, None]  # [B, 1]
    if self.heads_first:
      # The adjacent index arrays select [K, B, T, H] entries.
      put = lambda buffer, new: buffer.at[:, self.layer, rows, positions].set(
          new.transpose(2, 0, 1, 3).astype(buffer.dtype), mode='drop')
    else:
      put = lambda buffer, new: buffer.at[self.layer, rows, positions].set(
          new.astype(buffer.dtype), mode='drop')
    return self.replace(keys=put(self.keys, keys), values=put(self.values, values))

  def window(self, size: int):
    """Keys and values [B, W, K, H] of each row's slots [lengths[b], lengths[b] + W): the slots
    a tree-attention call wrote past the row's committed prefix."""
    return self.gather(self.lengths[:, None] + jnp.arange(size)[None, :])

  def gather(self, slots: jax.Array):
    """Keys and values [B, M, K, H] of each row's slots int32[B, M]."""
    rows = jnp.arange(slots.shape[0])[:, None]  # [B, 1]
    if self.heads_first:  # The adjacent index arrays give [K, B, M, H].
      take = lambda buffer: buffer[:, self.layer, rows, slots].transpose(1, 2, 0, 3)
    else:
      take = lambda buffer: buffer[self.layer, rows, slots]
    return take(self.keys), take(self.values)

  def block(self, start, size: int):
    """Keys and values [B, C, K, H] of slots [start, start + size) of this layer."""
    if self.heads_first:
      window = (0, self.layer, 0, start, 0)
      shape = (self.keys.shape[0], 1, self.keys.shape[2], size, self.keys.shape[4])
      take = lambda buffer: jax.lax.dynamic_slice(buffer, window, shape)[:, 0].transpose(
          1, 2, 0, 3)
    else:
      window = (self.layer, 0, start, 0, 0)
      shape = (1, self.keys.shape[1], size) + self.keys.shape[3:]
      take = lambda buffer: jax.lax.dynamic_slice(buffer, window, shape)[0]
    return take(self.keys), take(self.values)
