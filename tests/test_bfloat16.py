"""bfloat16 decoding: the CPU layout's fast form, exactness, and parity with transformers.

On CPU, bfloat16 decodes with output-major kernels, float32 accumulation and matmuls padded to
three rows (models/layout.py). Greedy speculative output, chains and trees, both drafts, image
and text rows, is token-identical to bfloat16 autoregressive output: the padding keeps each row's
result independent of the others, and attention computes a token alike in every call
(models/attention.py). Logits match transformers' bfloat16 as closely as transformers' bfloat16
matches its own float32. (Sampled bfloat16 decoding: test_decoding_sampling.py.)
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import decoding_fixtures as fx
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding import placement
from mmspec_jax.decoding.placement import decoding_params
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree
from mmspec_jax.models import KVCache, Layout, LlamaConfig, build, init_params, precision
from mmspec_jax.models.layers import matmul
from mmspec_jax.models.layout import CPU_BFLOAT16_MIN_ROWS, decoding_default
from mmspec_jax.testing import tiny_hf as hf_builders

MAX_NEW_TOKENS = 24


def test_cpu_bfloat16_layout_takes_the_fast_form():
  low = decoding_default('cpu', verifies=True, dtype='bfloat16')
  assert low.output_major_kernels and low.min_matmul_rows == CPU_BFLOAT16_MIN_ROWS == 3
  assert decoding_default('cpu', dtype='bfloat16').output_major_kernels
  assert decoding_default('cpu', verifies=True).min_matmul_rows == 1  # float32: no padding.
  assert not decoding_default('cpu', verifies=True).output_major_kernels
  assert decoding_default('gpu', dtype='bfloat16').min_matmul_rows == 1
  with pytest.raises(ValueError, match='min_matmul_rows must be >= 1, got 0'):
    Layout(min_matmul_rows=0)
  # XLA:CPU has no bfloat16 scatter: a bfloat16 cache would be converted whole around each write.
  assert low.cache_dtype == 'float32' and decoding_default('cpu', verifies=True).cache_dtype == ''
  assert decoding_default('tpu', dtype='bfloat16').cache_dtype == ''
  config = dataclasses.replace(fx.TARGET.text, dtype='bfloat16', param_dtype='bfloat16')
  assert KVCache.init(config, 2, 16, layout=low).keys.dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown layout.cache_dtype 'int8'"):
    Layout(cache_dtype='int8')
  configured = placement.decoding_layout({'fused_projections': True, 'cache_dtype': ''},
                                         'cpu', dtype='bfloat16')
  assert configured == decoding_default('cpu', dtype='bfloat16')  # '' and a missing field alike.


def test_padded_rows_leave_each_row_unchanged():
  """One row padded to three is, bit for bit, that row of a three-row product (and the padding
  never reaches the result's shape)."""
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
  matrix = jnp.asarray(rng.standard_normal((384, 256)), jnp.bfloat16)  # [out, in]
  product = jax.jit(lambda x: matmul(x, matrix, output_major=True, min_rows=3))
  full = np.asarray(product(rows[:3]), np.float32)
  for count in (1, 2):
    part = product(rows[:count])
    assert part.shape == (count, 384) and part.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(part, np.float32), full[:count])
  exact = np.asarray(rows[:3], np.float32) @ np.asarray(matrix, np.float32).T
  np.testing.assert_allclose(full, exact, rtol=1e-2, atol=1e-1)  # Rounded once, to bfloat16.


def test_auto_dtype_is_named_and_checked():
  assert precision.auto_dtype('tpu') == 'bfloat16' == precision.auto_dtype('gpu')
  assert precision.resolve('auto') in ('float32', 'bfloat16')
  assert precision.resolve('auto', verifies=True) in ('float32', 'bfloat16')  # Its own probe.
  assert precision.auto_dtype.cache_info().currsize >= 3
  assert precision.resolve('float32') == 'float32'
  with pytest.raises(ValueError, match="unsupported dtype 'float64'"):
    precision.resolve('float64')


@pytest.fixture(scope='module')
def session():
  """The fixtures' LLaVA target and both drafts, in bfloat16 on this backend's layouts."""
  target_config, target_params = fx.llava_target()
  drafts = {'language': fx.language_draft(target_config, target_params),
            'adapter': fx.adapter_draft(target_config, target_params)}
  return DecodeSession.from_params(None, (target_config, target_params), drafts,
                                   dtype='bfloat16')


def _rows(session, draft, tree=None, gamma=0, threshold=0.0):
  """Greedy tokens of the fixtures' ragged batch (image and text rows) per row."""
  gamma = tree.depth if tree else gamma
  decoder = session.decoder(draft, num_draft_tokens=gamma, sampling=SamplingConfig(),
                            max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=(-1,),
                            draft_tree=tree, confidence_threshold=threshold, with_images=True)
  engine = session.engine(decoder)
  tokens, lengths, images = fx.ragged_batch(session.target_config)
  draft_length = engine.draft_prompt_length([t[:n] for t, n in zip(tokens, lengths)],
                                            tokens.shape[1], multiple=1)
  result = engine.generate(session.target_params,
                           session.draft_params[draft] if draft else None, tokens, lengths,
                           images, jax.random.key(0), draft_prompt_length=draft_length)
  rows = [np.asarray(result.tokens)[b, :int(result.num_generated[b])].tolist()
          for b in range(tokens.shape[0])]
  return rows, result


@pytest.fixture(scope='module')
def autoregressive(session):
  assert session.target_config.text.dtype == 'bfloat16'
  assert session.target_layout.min_matmul_rows == (3 if jax.default_backend() == 'cpu' else 1)
  return _rows(session, None)[0]


@pytest.mark.parametrize('draft, branching, threshold', [
    ('language', (1, 1, 1), 0.0),  # The chain of 3.
    ('adapter', (1, 1, 1, 1, 1), 0.0),  # The chain of 5.
    ('language', (5, 1, 1, 1, 1, 1), 0.0),  # Section 3's tree.
    ('adapter', (3, 2, 1), 0.0),
    ('language', (2, 2, 1), 0.5),  # An adaptive tree.
])
def test_greedy_bfloat16_speculation_equals_bfloat16_autoregressive(session, autoregressive,
                                                                    draft, branching, threshold):
  tree = DraftTree(branching)
  rows, result = _rows(session, draft, None if tree.is_chain else tree, tree.depth, threshold)
  assert rows == autoregressive
  steps = int((result.num_target_calls - 1).sum())
  assert 0 < int(result.num_accepted.sum()) < steps * tree.depth  # Accepts and rejects.


def _to_layout(config, params):
  layout = decoding_default(dtype='bfloat16')
  return build(config, layout), decoding_params(config, params, layout)


def test_bfloat16_logits_are_as_close_to_transformers_as_its_own_bfloat16(tmp_path):
  """Our bfloat16 logits (decoding layout) against transformers' bfloat16 on the same LLaVA
  checkpoint: within twice transformers' own bfloat16-to-float32 distance, and within 0.1."""
  hf_model = hf_builders.tiny_llava()
  hf_builders.save(hf_model, str(tmp_path))
  config, params = load_model(str(tmp_path), dtype='bfloat16')
  rng = np.random.RandomState(0)
  rows = hf_builders.llava_prompts(rng, config.num_image_tokens)
  images = rng.randn(len(rows), 3, 28, 28).astype(np.float32)
  model, arranged = _to_layout(config, params)
  ours_distance = reference_distance = 0.0
  for row, image in zip(rows, images):
    with torch.no_grad():
      reference = hf_model(input_ids=torch.tensor([row]),
                           pixel_values=torch.tensor(image[None])).logits[0].numpy()
      low = hf_model.to(torch.bfloat16)(
          input_ids=torch.tensor([row]), pixel_values=torch.tensor(image[None]).to(
              torch.bfloat16)).logits[0].float().numpy()
      hf_model.to(torch.float32)
    ours = np.asarray(model.apply({'params': arranged}, np.asarray([row], np.int32),
                                  image.transpose(1, 2, 0)[None]), np.float32)[0]
    ours_distance = max(ours_distance, np.abs(ours - low).max())
    reference_distance = max(reference_distance, np.abs(low - reference).max())
  print(f'max |logit diff|: ours vs transformers bfloat16 {ours_distance:.3f}; transformers '
        f'bfloat16 vs float32 {reference_distance:.3f}')
  assert ours_distance <= max(2 * reference_distance, 1e-3) and ours_distance <= 0.1


def test_tree_and_chain_logits_equal_one_token_steps_bit_for_bit():
  """bfloat16, this backend's verifying layout, grouped-query heads, a ragged batch whose caches
  span several attention blocks: every node of a tree call and every token of a chain call gets
  the logits, bit for bit, of one-token steps along its path (the property that makes greedy
  speculative output equal autoregressive output, checked below the token level)."""
  config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                       eos_token_id=None, bos_token_id=None, dtype='bfloat16',
                       param_dtype='bfloat16')
  layout = dataclasses.replace(decoding_default(verifies=True, dtype='bfloat16'),
                               attention_block_size=8)
  params = decoding_params(config, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                init_params(config, jax.random.key(0))), layout)
  apply = jax.jit(functools.partial(build(config, layout).apply, {'params': params}),
                  static_argnames='method')
  rng = np.random.RandomState(0)
  lengths = np.array([21, 13], np.int32)  # Three and two blocks of 8, the last partly live.
  prompt = rng.randint(0, 50, (2, 21)).astype(np.int32)
  _, cache = apply(prompt, lengths, KVCache.init(config, 2, 64, layout=layout), method='prefill')
  tree = DraftTree((2, 2, 1))
  nodes = rng.randint(0, 50, (2, tree.num_nodes + 1)).astype(np.int32)  # [root, N nodes]
  tree_logits, _ = apply(nodes, cache, tree=tree.verification_attention(), method='extend')
  chain = nodes[:, [0, 1, 3, 7]]  # The root and node 1's first descendants: a path.
  chain_logits, _ = apply(chain, cache, method='extend')

  def stepped(path_tokens):  # [B, P] -> logits [B, P, V], one one-token call at a time.
    step_cache, out = cache, []
    for t in range(path_tokens.shape[1]):
      logits, step_cache = apply(path_tokens[:, t:t + 1], step_cache, method='extend')
      out.append(np.asarray(logits[:, 0], np.float32))
    return np.stack(out, axis=1)

  np.testing.assert_array_equal(np.asarray(chain_logits, np.float32), stepped(chain))
  for node in range(tree.num_nodes + 1):
    path = np.nonzero(tree.ancestors[node])[0]  # The root .. the node.
    np.testing.assert_array_equal(np.asarray(tree_logits[:, node], np.float32),
                                  stepped(nodes[:, path])[:, -1], err_msg=f'node {node}')
