"""layout.attention='pallas': the TPU paged-attention kernel JAX ships, over the heads-first
cache, against the pure-JAX blockwise attention (the reference). Off TPU the kernel runs in
Pallas' TPU interpret mode, which simulates its DMAs and memory spaces on the CPU.

The kernel reads keys and values as bfloat16 (float32 caches too): the attention-level tests
give it bfloat16-valued inputs, so it must match the reference to float32 rounding; a decode in
that layout is tested token for token against autoregressive decoding in the same layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_fixtures as fx
from multidevice import run_check
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.tree import DraftTree
from mmspec_jax.models import Layout, build
from mmspec_jax.models.attention import PAGED_MAX_QUERIES, cached_attention
from mmspec_jax.models.kv_cache import KVCache, LayerCache

BLOCKWISE = Layout(attention='blockwise', attention_block_size=16)
# Compute blocks of 32 slots (2 pages): the rows below span 1 to 3 of them.
PALLAS = Layout(attention='pallas', attention_block_size=32)
LAYERS, ROWS, HEADS, KV_HEADS, HEAD_DIM = 3, 3, 4, 2, 16
LENGTHS = np.array([3, 37, 70], np.int32)


def bfloat16_valued(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)


def attend(layout, stored, query, keys, values, layer):
  """cached_attention at `layer` of a cache holding `stored` ([L, B, S, K, H] keys and values),
  in `layout`'s storage order. Returns (out [B, T, N, H], written keys as [L, B, S, K, H])."""
  heads_first = layout.cache_heads_first
  to_storage = (lambda a: a.transpose(3, 0, 1, 2, 4)) if heads_first else (lambda a: a)
  view = LayerCache(keys=to_storage(stored[0]), values=to_storage(stored[1]),
                    lengths=jnp.asarray(LENGTHS), layer=layer, heads_first=heads_first)
  out, written = jax.jit(lambda *a: cached_attention(*a, layout))(query, keys, values, view)
  back = written.keys.transpose(1, 2, 3, 0, 4) if heads_first else written.keys
  return np.asarray(out), np.asarray(back)


@pytest.mark.parametrize('num_tokens', [1, 6, PAGED_MAX_QUERIES + 4],
                         ids=['decode', 'verification', 'long_call_runs_blockwise'])
@pytest.mark.parametrize('layer', [0, 2])
def test_paged_kernel_matches_blockwise(num_tokens, layer):
  rng = np.random.default_rng(num_tokens + layer)
  capacity = PALLAS.cache_capacity(int(LENGTHS.max()) + num_tokens)
  assert capacity % PALLAS.attention_block_size == 0 and capacity >= 70 + num_tokens
  shape = (LAYERS, ROWS, capacity, KV_HEADS, HEAD_DIM)
  stored = (bfloat16_valued(rng, shape), bfloat16_valued(rng, shape))
  query = bfloat16_valued(rng, (ROWS, num_tokens, HEADS, HEAD_DIM))
  keys, values = (bfloat16_valued(rng, (ROWS, num_tokens, KV_HEADS, HEAD_DIM)) for _ in range(2))
  expected, expected_keys = attend(BLOCKWISE, stored, query, keys, values, layer)
  out, written_keys = attend(PALLAS, stored, query, keys, values, layer)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  np.testing.assert_array_equal(written_keys, expected_keys)
  # The other layers' slots and this layer's other keys matter: a wrong page offset or length
  # reads them. Control: attention at another layer differs.
  other, _ = attend(PALLAS, stored, query, keys, values, (layer + 1) % LAYERS)
  assert np.abs(other - expected).max() > 1e-2


def test_tree_attention_in_every_layout_matches_blockwise():
  """A tree call in the pallas layout (blockwise over the heads-first cache, keys and values read
  as bfloat16 like the kernel) and in the xla one (the kernel over the cache, the tree window in
  pure JAX, combined by their log-sum-exps) equals the blockwise layout's, and moving a path of
  slots does the same in both storage orders."""
  tree = DraftTree((2, 2))
  pattern = tree.verification_attention()
  rng = np.random.default_rng(7)
  capacity = PALLAS.cache_capacity(int(LENGTHS.max()) + tree.num_nodes + 1)
  shape = (LAYERS, ROWS, capacity, KV_HEADS, HEAD_DIM)
  stored = (bfloat16_valued(rng, shape), bfloat16_valued(rng, shape))
  size = tree.num_nodes + 1
  query = bfloat16_valued(rng, (ROWS, size, HEADS, HEAD_DIM))
  keys, values = (bfloat16_valued(rng, (ROWS, size, KV_HEADS, HEAD_DIM)) for _ in range(2))
  outs, written = [], []
  for layout in (BLOCKWISE, PALLAS, Layout(attention='xla')):
    heads_first = layout.cache_heads_first
    to_storage = (lambda a: a.transpose(3, 0, 1, 2, 4)) if heads_first else (lambda a: a)
    view = LayerCache(keys=to_storage(stored[0]), values=to_storage(stored[1]),
                      lengths=jnp.asarray(LENGTHS), layer=1, heads_first=heads_first)
    out, view = jax.jit(lambda q, k, v, c, t, layout=layout: cached_attention(
        q, k, v, c, layout, t))(query, keys, values, view, pattern)
    outs.append(np.asarray(out))
    cache = KVCache(keys=view.keys, values=view.values, lengths=jnp.asarray(LENGTHS),
                    heads_first=heads_first)
    path = jnp.asarray([[2, 6], [1, 3], [2, 5]])  # [B, D]: each row's accepted nodes
    moved = cache.move_slots(cache.lengths + 1, path - 1).keys
    written.append(np.asarray(moved.transpose(1, 2, 3, 0, 4) if heads_first else moved))
  for out, moved in zip(outs[1:], written[1:]):
    np.testing.assert_allclose(out, outs[0], atol=1e-5)
    np.testing.assert_array_equal(moved, written[0])
  # The path landed: row 0's depth-2 node (index 6) now sits at its length + 2.
  np.testing.assert_array_equal(written[0][1, 0, LENGTHS[0] + 2], np.asarray(keys)[0, 6])


def test_cache_rounded_up_to_whole_compute_blocks_and_stored_heads_first():
  config = fx.TARGET.text
  cache = jax.eval_shape(lambda: KVCache.init(config, 2, 70, layout=PALLAS))
  assert cache.heads_first and cache.max_length == 96
  assert cache.keys.shape == (config.num_kv_heads, config.num_layers, 2, 96, config.head_dim)
  with pytest.raises(ValueError, match='multiple of 16'):
    Layout(attention='pallas', attention_block_size=24)


def test_a_cache_in_the_other_order_is_refused():
  view = LayerCache(keys=jnp.zeros((1, 1, 32, 1, 16)), values=jnp.zeros((1, 1, 32, 1, 16)),
                    lengths=jnp.zeros((1,), jnp.int32), layer=0)
  one = jnp.zeros((1, 1, 1, 16))
  with pytest.raises(ValueError, match='heads first'):
    cached_attention(one, one, one, view, PALLAS)


def test_greedy_speculative_equals_autoregressive_in_the_pallas_layout():
  target_config, target_params = fx.llava_target()
  draft_config, draft_params = fx.language_draft(target_config, target_params)
  inputs = fx.ragged_batch(target_config)
  layout = Layout(attention='pallas', attention_block_size=16)

  def decode(draft_config=None, draft_params=None, gamma=0):
    decoder = SpeculativeDecoder(build(target_config, layout),
                                 build(draft_config, layout) if draft_config else None, gamma,
                                 SamplingConfig(), 8, (-1,))
    result = decoder.generate(target_params, draft_params, *inputs, jax.random.key(0))
    rows = [np.asarray(result.tokens)[b, :int(result.num_generated[b])].tolist()
            for b in range(result.tokens.shape[0])]
    return rows, result

  autoregressive, _ = decode()
  speculative, result = decode(draft_config, draft_params, 2)
  assert speculative == autoregressive
  steps, accepted = int((result.num_target_calls - 1).sum()), int(result.num_accepted.sum())
  assert 0 < accepted < steps * 2


def test_sharded_paged_kernel_matches_one_device():
  """8 fake devices: the kernel runs per shard (shard_map) with rows over data and kv heads over
  tensor; its output equals the one-device run's."""
  result = run_check('pallas_sharded_check.py')
  assert result['meshes'] == ['8x1x1', '2x1x4']
  assert max(result['max_abs_difference'].values()) <= 1e-6
