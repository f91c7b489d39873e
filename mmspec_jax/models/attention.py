"""Attention of new tokens over a KV cache: the cache's live prefix, then the new tokens.

Axis legend: B batch, T new tokens, N query heads, K kv heads, G query heads per kv head
(N = K * G), H head dim, S cache capacity, C cache slots per block, L layers.

A call appends T tokens at each row's length. Their keys and values are first written into the
cache (an in-place scatter: nothing else reads the incoming buffer), then their queries attend to
the cache block by block, only up to the longest row: new token t of row b to slots
[0, lengths[b] + t]. Blocks are combined by their softmax statistics (online softmax). In the
blockwise form a short call (a step, a verification) reads every key from the cache, each token's
last RECENT_SLOTS + 1 positions as a block of its own, so a token's attention is the same
arithmetic in a one-token step and in a verification of a chain or a tree (`_blockwise`). The
cache is only appended to and its live part read, never copied. Prefill is the case
lengths == 0.

Tree attention (`TreeAttention`): a call's tokens are nodes of a tree of candidates. They are
written at given slots past each row's length, and each attends to the row's committed prefix
[0, lengths[b]) and, under a mask, to a window of slots [lengths[b], lengths[b] + W) that holds the
tree written so far (itself included): its ancestors, never its siblings. The row's length is
not advanced; the caller moves the accepted path into place (`KVCache.move_slots`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention
from jax.sharding import PartitionSpec as P

from mmspec_jax import sharding
from mmspec_jax.models.kv_cache import HEADS_FIRST_CACHE_AXES, LayerCache
from mmspec_jax.models.layout import PAGE_SIZE, Layout

_MASKED = jnp.finfo(jnp.float32).min


@flax.struct.dataclass
class TreeAttention:
  """A tree-attention pattern for a call of T tokens (a pytree, so that it rides through the
  layer scan; its shapes are static). A static tree's pattern is the same for every row; a
  dynamic tree's (decoding/dynamic_tree.py) has a batch axis in front of positions, mask and
  path, each row its own tree.

  slots: int32[T], where token t is written, past the row's length; positions: int32[T] (or
  [B, T]), its position past the row's length (its depth in the target's call over [root, nodes];
  depth - 1 in the draft's calls, whose length already counts the root); mask: bool[T, W] (or
  [B, T, W]), the window slots it sees; path: int32[T, P] (or [B, T, P]), the window slot of the
  token at each position past the row's length on token t's path (its ancestors, then itself at
  positions[t]; P - 1 >= every position, entries past the token's own position unused).
  """
  slots: jax.Array
  positions: jax.Array
  mask: jax.Array
  path: jax.Array

  @property
  def window(self) -> int:
    return self.mask.shape[-1]

  @property
  def per_row(self) -> bool:
    """Whether each row has its own pattern (positions [B, T])."""
    return jnp.ndim(self.positions) == 2

  def row_positions(self) -> jax.Array:
    """int32[B | 1, T]: positions with a batch axis."""
    positions = jnp.asarray(self.positions)
    return positions if self.per_row else positions[None]


def _grouped(query: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, K, G, H]. Query head n = k * G + g."""
  batch, length, num_heads, head_dim = query.shape
  return query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)


def _scores(grouped, keys, per_query: bool = False):
  """float32[B, K, G, T, C] from grouped queries [B, T, K, G, H] and keys [B, C, K, H] (each
  query its own, [B, T, C, K, H], when `per_query`), scaled by 1/sqrt(H) in float32 (as
  layers.dot_product_attention)."""
  spec = 'btkgh,btckh->bkgtc' if per_query else 'btkgh,bckh->bkgtc'
  scores = jnp.einsum(spec, grouped, keys, preferred_element_type=jnp.float32)
  return scores * (keys.shape[-1] ** -0.5)


def _weighted(probs, values, per_query: bool = False):
  """float32[B, K, G, T, H] from probabilities float32[B, K, G, T, C] and values [B, C, K, H]
  (or [B, T, C, K, H] when `per_query`)."""
  spec = 'bkgtc,btckh->bkgth' if per_query else 'bkgtc,bckh->bkgth'
  return jnp.einsum(spec, probs.astype(values.dtype), values, preferred_element_type=jnp.float32)


def _empty_state(batch, num_kv_heads, group, length, head_dim):
  """The online softmax's (running max, total, accumulated) before any key is seen."""
  return (jnp.full((batch, num_kv_heads, group, length), _MASKED),
          jnp.zeros((batch, num_kv_heads, group, length), jnp.float32),
          jnp.zeros((batch, num_kv_heads, group, length, head_dim), jnp.float32))


def _visit(state, grouped, block_keys, block_values, live, per_query: bool = False):
  """One online-softmax update over a block of C keys (`_scores`' forms).

  state: (running max, total, accumulated): float32 [B, K, G, T], [B, K, G, T], [B, K, G, T, H];
  live: bool, broadcastable to [B, T, C]: which keys each query sees.
  """
  running_max, total, accumulated = state
  live = live[:, None, None]  # [B | 1, 1, 1, T | 1, C]
  scores = jnp.where(live, _scores(grouped, block_keys, per_query), _MASKED)
  new_max = jnp.maximum(running_max, scores.max(axis=-1))
  rescale = jnp.exp(running_max - new_max)
  # Masked keys weigh 0 even while a query has seen nothing else (its max then is _MASKED too).
  probs = jnp.where(live, jnp.exp(scores - new_max[..., None]), 0.0)
  return (new_max, total * rescale + probs.sum(axis=-1),
          accumulated * rescale[..., None] + _weighted(probs, block_values, per_query))


def _block_start(index, block: int, length: int):
  """Where block `index` of `block` slots is read from an axis of `length` slots, and which of
  its slots are its own: the last block may overhang the axis, so it is read from
  length - block and the slots an earlier block covered are masked out."""
  start = jnp.minimum(index * block, length - block)
  slots = start + jnp.arange(block)  # [C]
  return start, slots, slots >= index * block


# A short call's token at position p reads the slots before p - RECENT_SLOTS from the cache's
# blocks, and its last RECENT_SLOTS + 1 positions [p - RECENT_SLOTS, p] as a block of its own.
# That split depends on p alone, and the recent block is gathered per token along its path, so a
# tree node (depth <= RECENT_SLOTS) is computed bit for bit as the one-token step at its position
# would: its recent block holds its ancestors where the step reads the committed tokens.
RECENT_SLOTS = 16
# Longer calls without a tree (prefills) attend among themselves from their own keys and values,
# in blocks, then to the cached slots below the row's length (`_long_call`).
SHORT_CALL_MAX_TOKENS = 32


def _rounding(read_dtype):
  if read_dtype is None:
    return lambda x: x
  return lambda x: x.astype(read_dtype).astype(x.dtype)


def _visit_cache(state, grouped, cache: LayerCache, block_size: int, seen, rounded):
  """The online softmax over the cache's blocks up to the longest row's `seen`: a query sees the
  slots below seen int32[B, T | 1] (its row's, its own)."""
  capacity = cache.max_length
  block = min(block_size, capacity)
  num_blocks = (jnp.maximum(jnp.max(seen), 0) + block - 1) // block  # Live blocks, longest row.

  def visit(index, state):
    start, slots, own = _block_start(index, block, capacity)
    block_keys, block_values = map(rounded, cache.block(start, block))  # [B, C, K, H]
    live = own[None, None, :] & (slots[None, None, :] < seen[:, :, None])  # [B, T | 1, C]
    return _visit(state, grouped, block_keys, block_values, live)

  return jax.lax.fori_loop(0, num_blocks, visit, state)


def _finish(state, batch: int, length: int, num_heads: int, head_dim: int):
  """The attention output [B, T, N, H] of the first `length` queries from the softmax state."""
  _, total, accumulated = state
  out = accumulated / total[..., None]  # [B, K, G, T', H]
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, -1, num_heads, head_dim)
  return out[:, :length]


def _blockwise(query, keys, values, cache: LayerCache, block_size: int,
               tree: TreeAttention | None = None, read_dtype=None, min_rows: int = 1):
  """Pure-JAX flash-style attention of this call's tokens (keys and values [B, T, K, H], already
  written into the cache) over the cache block by block, up to the batch's longest row:
  float32[B, T, N, H].

  The token at position p of row b (p = lengths[b] + t, or + tree.positions[t]) sees positions
  [0, p]: below the row's length its cached slots, past it its tree path (`tree.path`) or,
  without a tree, the call's earlier tokens. A short call (`SHORT_CALL_MAX_TOKENS`) or a tree
  reads every key from the cache, in blocks fixed by p (`RECENT_SLOTS`), so a token's attention
  is the same arithmetic in a one-token step, a verification of a chain and of a tree: greedy
  speculative output equals autoregressive output bit for bit, in bfloat16 too.
  read_dtype: keys and values rounded to it as they are read (the paged kernel's bfloat16).
  min_rows: a short call's queries per kv head are padded to at least this many rows
  (`Layout.min_matmul_rows`: XLA:CPU's kernels for one or two rows round differently).
  """
  rounded = _rounding(read_dtype)
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = keys.shape[2]
  group = num_heads // num_kv_heads
  if tree is None and length > SHORT_CALL_MAX_TOKENS:
    return _long_call(query, rounded(keys), rounded(values), cache, block_size, rounded)
  padded = max(length, -(-min_rows // group))
  grouped = _grouped(jnp.pad(query, ((0, 0), (0, padded - length), (0, 0), (0, 0))),
                     num_kv_heads)  # [B, T', K, G, H]
  state = _empty_state(batch, num_kv_heads, group, padded, head_dim)
  offsets = jnp.arange(length)[None] if tree is None else tree.row_positions()  # [B | 1, T]
  offsets = jnp.pad(offsets, ((0, 0), (0, padded - length)), mode='edge')  # Repeats the last.
  positions = cache.lengths[:, None] + offsets  # [B, T']
  # A tree deeper than RECENT_SLOTS widens its recent block (exact, not bit for bit).
  recent = RECENT_SLOTS if tree is None else max(RECENT_SLOTS, tree.path.shape[-1] - 1)
  state = _visit_cache(state, grouped, cache, block_size, positions - recent, rounded)

  recent_positions = positions[:, :, None] - recent + jnp.arange(recent + 1)  # [B, T', R + 1]
  slots = jnp.maximum(recent_positions, 0)
  if tree is not None:  # Past the row's length, the path's window slots.
    path = jnp.asarray(tree.path)
    path = path if tree.per_row else path[None]  # [B | 1, T, P]
    path = jnp.pad(path, ((0, 0), (0, padded - length), (0, 0)), mode='edge')
    past = recent_positions - cache.lengths[:, None, None]  # [B, T', R + 1]
    on_path = jnp.take_along_axis(
        jnp.broadcast_to(path, (batch,) + path.shape[1:]),
        jnp.clip(past, 0, path.shape[-1] - 1), axis=2)  # [B, T', R + 1]
    slots = jnp.where(past >= 0, cache.lengths[:, None, None] + on_path, slots)
  recent_keys, recent_values = map(rounded, cache.gather(slots.reshape(batch, -1)))
  per_token = lambda x: x.reshape(batch, padded, recent + 1, *x.shape[2:])  # [B, T', R+1, K, H]
  state = _visit(state, grouped, per_token(recent_keys), per_token(recent_values),
                 recent_positions >= 0, per_query=True)
  return _finish(state, batch, length, num_heads, head_dim)


def _long_call(query, keys, values, cache: LayerCache, block_size: int, rounded):
  """A long call (a prefill): the new tokens causally among themselves from their own keys and
  values, in blocks (so a 2k-token prefill never builds [T, T] scores), then the cache's slots
  below each row's length."""
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = keys.shape[2]
  grouped = _grouped(query, num_kv_heads)  # [B, T, K, G, H]
  state = _empty_state(batch, num_kv_heads, num_heads // num_kv_heads, length, head_dim)
  queries = jnp.arange(length)  # [T]

  def visit_new(index, state):
    start, slots, own = _block_start(index, block_size, length)
    live = own[None, :] & (slots[None, :] <= queries[:, None])  # [T, C]
    return _visit(state, grouped, jax.lax.dynamic_slice_in_dim(keys, start, block_size, 1),
                  jax.lax.dynamic_slice_in_dim(values, start, block_size, 1), live[None])

  if length <= block_size:
    state = _visit(state, grouped, keys, values, (queries[None, :] <= queries[:, None])[None])
  else:
    state = jax.lax.fori_loop(0, -(-length // block_size), visit_new, state)
  state = _visit_cache(state, grouped, cache, block_size, cache.lengths[:, None], rounded)
  return _finish(state, batch, length, num_heads, head_dim)


def _tree_window(query, keys, values, tree_mask):
  """Attention over a tree window in pure JAX: ([B, T, N, H], log-sum-exp [B, T, N])."""
  batch, length, num_heads, head_dim = query.shape
  num_kv_heads = keys.shape[2]
  group = num_heads // num_kv_heads
  state = _empty_state(batch, num_kv_heads, group, length, head_dim)
  tree_mask = jnp.asarray(tree_mask)
  running_max, total, accumulated = _visit(state, _grouped(query, num_kv_heads), keys, values,
                                           tree_mask if tree_mask.ndim == 3 else tree_mask[None])
  out = accumulated / total[..., None]  # [B, K, G, T, H]; every token sees itself.
  to_tokens = lambda x: jnp.moveaxis(x, 3, 1).reshape(batch, length, num_heads, *x.shape[4:])
  return to_tokens(out), to_tokens(running_max + jnp.log(total))


def _fused_kernel(query, keys, values, cache: LayerCache, implementation: str, tree_mask=None):
  """jax.nn.dot_product_attention over the whole cache (masked by length) and over the new tokens
  (causal), combined by the log-sum-exp residuals the kernel returns. A tree window (tree_mask)
  is attended in pure JAX: it is a few dozen slots, and the kernels take no arbitrary mask."""
  def attend(keys, values, **kwargs):
    out, logsumexp = jax.nn.dot_product_attention(
        query, keys, values, implementation=implementation, return_residual=True, **kwargs)
    return out.astype(jnp.float32), logsumexp.astype(jnp.float32)  # [B, T, N, H], [B, T, N]

  cached, cached_lse = attend(cache.keys[cache.layer], cache.values[cache.layer],
                              key_value_seq_lengths=cache.lengths)
  if tree_mask is None:
    new, new_lse = attend(keys, values, is_causal=True)
  else:
    new, new_lse = _tree_window(query, keys, values, tree_mask)
  # A row with an empty cache (prefill) has no cached part at all.
  cached_lse = jnp.where(cache.lengths[:, None, None] > 0, cached_lse, -jnp.inf)
  combined = jnp.logaddexp(cached_lse, new_lse)
  return (cached * jnp.exp(cached_lse - combined)[..., None]
          + new * jnp.exp(new_lse - combined)[..., None])


# The paged kernel takes one query per row: a call of T new tokens runs it over B * T rows that
# share their row's pages, so it reads the live cache T times. Right for decode and verification
# (T = gamma + 1); a longer call (a prefill) runs blockwise.
PAGED_MAX_QUERIES = 16


def _paged_kernel(query, cache: LayerCache, block_size: int):
  """The TPU paged-attention kernel over the heads-first cache, which already holds the new
  tokens: new token t of row b reads the row's slots [0, lengths[b] + t]. Off TPU the kernel is
  interpreted (slow: for tests). Under a mesh it runs per shard (a Pallas kernel is not
  partitioned by XLA): rows and kv heads stay where the cache's sharding puts them."""
  def local(query, keys, values, lengths, layer):
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads, _, _, capacity, _ = keys.shape
    pages_per_row = capacity // PAGE_SIZE
    # [K, L, B, S, H] -> [K, L * B * S / P, P, H]: a reshape, not a copy. Row b of this layer
    # owns pages (layer * B + b) * S / P onwards.
    as_pages = lambda buffer: buffer.reshape(num_kv_heads, -1, PAGE_SIZE, head_dim)
    rows = jnp.repeat(jnp.arange(batch), length)  # [B * T]: each new token is its own row
    page_indices = ((layer * batch + rows)[:, None] * pages_per_row
                    + jnp.arange(pages_per_row)[None, :])  # [B * T, S / P]
    seen = lengths[:, None] + jnp.arange(1, length + 1)[None, :]  # [B, T]
    scaled = (query * head_dim ** -0.5).reshape(batch * length, num_heads, head_dim)
    run = lambda: tpu_paged_attention(
        scaled, as_pages(keys), as_pages(values), seen.reshape(-1).astype(jnp.int32),
        page_indices.astype(jnp.int32), pages_per_compute_block=block_size // PAGE_SIZE)
    if jax.default_backend() == 'tpu':
      out = run()
    else:
      with pltpu.force_tpu_interpret_mode():
        out = run()
    return out.reshape(batch, length, num_heads, head_dim)

  layer = jnp.asarray(cache.layer, jnp.int32)
  specs = sharding.active_specs([HEADS_FIRST_CACHE_AXES], [cache.keys.shape])
  if specs is None:
    return local(query, cache.keys, cache.values, cache.lengths, layer)
  cache_spec, = specs
  if any(cache_spec[i] is not None for i in (1, 3, 4)):
    raise ValueError("layout.attention='pallas' needs the cache's layers, sequence and head dim "
                     f'unsharded; the logical axis rules give {cache_spec}')
  # Query heads n = k * G + g: splitting the kv heads splits the query heads alike.
  kv_heads, _, rows = cache_spec[:3]
  query_spec = P(rows, None, kv_heads, None)
  return jax.shard_map(local, in_specs=(query_spec, cache_spec, cache_spec, P(rows), P()),
                       out_specs=query_spec, check_vma=False)(
                           query, cache.keys, cache.values, cache.lengths, layer)


def cached_attention(query: jax.Array, keys: jax.Array, values: jax.Array, cache: LayerCache,
                     layout: Layout, tree: TreeAttention | None = None):
  """New tokens' queries [B, T, N, H] over the cache's live slots and the new keys and values
  [B, T, K, H] (already rotated), which are then written into the cache: after the row's length,
  or at `tree.slots` past it, attending to the tree window under `tree.mask`.

  Returns ([B, T, N, H] in the query's dtype, the cache with the new entries).
  """
  if cache.heads_first != layout.cache_heads_first:
    raise ValueError(f'layout.attention={layout.attention!r} reads a cache stored '
                     f'{"heads first" if layout.cache_heads_first else "sequence major"}; this one '
                     'is not: build it with KVCache.init(..., layout=<the model\'s layout>)')
  # Written first, then read (the new slots lie past `lengths` and are masked there): the write
  # then consumes the incoming buffer and nothing else reads it, so XLA updates it in place. Were
  # the write after the reads, XLA could not order the two and would copy the whole cache first.
  if tree is not None:
    written = cache.write(keys, values, cache.lengths[:, None] + jnp.asarray(tree.slots)[None])
    if layout.attention in ('blockwise', 'pallas'):
      # The paged kernel returns no softmax residual to combine a tree's part with: blockwise,
      # reading keys and values as bfloat16 as the kernel does, so that a tree is verified with
      # the numerics of the layout's other calls.
      out = _blockwise(query, keys, values, written, layout.attention_block_size, tree,
                       jnp.bfloat16 if layout.attention == 'pallas' else None,
                       layout.min_matmul_rows)
    else:
      window_keys, window_values = written.window(tree.window)  # [B, W, K, H]
      out = _fused_kernel(query, window_keys, window_values, written, layout.attention, tree.mask)
    return out.astype(query.dtype), written
  written = cache.write(keys, values, cache.lengths[:, None] + jnp.arange(query.shape[1])[None, :])
  if layout.attention == 'pallas' and query.shape[1] <= PAGED_MAX_QUERIES:
    out = _paged_kernel(query, written, layout.attention_block_size)
  elif layout.attention in ('blockwise', 'pallas'):
    out = _blockwise(query, keys, values, written, layout.attention_block_size,
                     min_rows=layout.min_matmul_rows)
  else:
    out = _fused_kernel(query, keys, values, written, layout.attention)
  return out.astype(query.dtype), written
