"""Function-preserving widening (mmspec_jax.bench.widen): the widened model's logits equal the
original's, on the full forward and on the KV-cache path, at the larger model's parameter count."""

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmspec_jax.bench.widen import (config_for_parameters, widen, widen_to_parameters,
                                    widened_config)
from mmspec_jax.models import (KVCache, Llama, Llava, abstract_params, build, init_params,
                               parameter_count, presets)

TOLERANCE = 1e-4
WIDE = dict(hidden_size=128, num_heads=8, intermediate_size=256)  # tiny: 64, 4 (kv 2), 128
PROMPT_LENGTHS = np.array([3, 7], np.int32)


@functools.cache
def _jitted(config, method):
  model = build(config)
  return jax.jit(lambda params, *args: model.apply({'params': params}, *args, method=method))


def _apply(config, params, *args, method=None):
  return np.asarray(_jitted(config, method)(params, *args))


def _cache_path(config, params, prompts, lengths, continuation, cls, *images):
  cache = KVCache.init(config.text if cls is Llava else config, len(prompts), 64)
  last, cache = _jitted(config, cls.prefill)(params, prompts, lengths, cache, *images)
  logits, _ = _jitted(config, cls.extend)(params, continuation, cache)
  return np.asarray(last), np.asarray(logits)


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope='module')
def llama():
  config = presets.get('tiny_llama')
  params = init_params(config, jax.random.key(0))
  return (config, params) + widen(config, params, **WIDE, rng=jax.random.key(1))


@pytest.fixture(scope='module')
def llava():
  config = presets.get('tiny_llava')
  params = init_params(config, jax.random.key(2))
  return (config, params) + widen(config, params, **WIDE, rng=jax.random.key(3))


def _tokens(seed, shape=(2, 12)):
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.int32)


def test_llama_full_forward_matches(llama):
  config, params, wide_config, wide_params = llama
  tokens = _tokens(0)
  logits, wide = _apply(config, params, tokens), _apply(wide_config, wide_params, tokens)
  print(f'llama full forward: max |diff| {_max_diff(logits, wide):.2e}, std {logits.std():.3f}')
  assert logits.std() > 100 * TOLERANCE  # The comparison below is not trivially passed.
  np.testing.assert_allclose(wide, logits, atol=TOLERANCE)


def test_llama_tied_embeddings_full_forward_matches():
  config = dataclasses.replace(presets.get('tiny_llama'), tie_word_embeddings=True)
  params = init_params(config, jax.random.key(4))
  wide_config, wide_params = widen(config, params, **WIDE, rng=jax.random.key(5))
  tokens = _tokens(1)
  logits, wide = _apply(config, params, tokens), _apply(wide_config, wide_params, tokens)
  print(f'tied full forward: max |diff| {_max_diff(logits, wide):.2e}, std {logits.std():.3f}')
  assert logits.std() > 100 * TOLERANCE
  np.testing.assert_allclose(wide, logits, atol=TOLERANCE)


def test_llama_cache_path_matches(llama):
  config, params, wide_config, wide_params = llama
  sequences = _tokens(2, (2, 16))
  prompts = np.where(np.arange(7)[None] < PROMPT_LENGTHS[:, None], sequences[:, :7], 0)
  continuation = np.stack([sequences[b, n:n + 4] for b, n in enumerate(PROMPT_LENGTHS)])
  args = (prompts.astype(np.int32), PROMPT_LENGTHS, continuation, Llama)
  last, logits = _cache_path(config, params, *args)
  wide_last, wide_logits = _cache_path(wide_config, wide_params, *args)
  print(f'llama cache path: max |diff| prefill {_max_diff(last, wide_last):.2e}, '
        f'extend {_max_diff(logits, wide_logits):.2e}')
  assert logits.std() > 100 * TOLERANCE
  np.testing.assert_allclose(wide_last, last, atol=TOLERANCE)
  np.testing.assert_allclose(wide_logits, logits, atol=TOLERANCE)


def test_llava_with_images_matches(llava):
  config, params, wide_config, wide_params = llava
  rng = np.random.RandomState(3)
  size = config.vision.image_size
  images = rng.randn(2, size, size, 3).astype(np.float32)
  rows = np.array([[1] + [config.image_token_index] * config.num_image_tokens
                   + rng.randint(3, 250, 8).tolist() for _ in range(2)], np.int32)
  logits = _apply(config, params, rows, images)
  wide = _apply(wide_config, wide_params, rows, images)
  print(f'llava full forward: max |diff| {_max_diff(logits, wide):.2e}, std {logits.std():.3f}')
  assert logits.std() > 100 * TOLERANCE
  np.testing.assert_allclose(wide, logits, atol=TOLERANCE)
  # The image matters, so the projector's widening is exercised.
  blank = _apply(wide_config, wide_params, rows, np.zeros_like(images))
  assert _max_diff(blank, wide) > 100 * TOLERANCE

  lengths = np.array([rows.shape[1] - 4, rows.shape[1] - 6], np.int32)
  prompts = np.where(np.arange(lengths.max())[None] < lengths[:, None], rows[:, :lengths.max()], 0)
  continuation = np.stack([rows[b, n:n + 4] for b, n in enumerate(lengths)])
  args = (prompts.astype(np.int32), lengths, continuation, Llava, images)
  last, extended = _cache_path(config, params, *args)
  wide_last, wide_extended = _cache_path(wide_config, wide_params, *args)
  print(f'llava cache path: max |diff| prefill {_max_diff(last, wide_last):.2e}, '
        f'extend {_max_diff(extended, wide_extended):.2e}')
  np.testing.assert_allclose(wide_last, last, atol=TOLERANCE)
  np.testing.assert_allclose(wide_extended, extended, atol=TOLERANCE)
  np.testing.assert_allclose(extended[0], logits[0, lengths[0]:lengths[0] + 4], atol=TOLERANCE)


@pytest.mark.parametrize('name', ['llama', 'llava'])
def test_parameter_counts_and_config(name, request):
  config, params, wide_config, wide_params = request.getfixturevalue(name)
  def shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(wide_params) == shapes(nn.unbox(abstract_params(wide_config)))
  count = parameter_count(wide_params)
  assert count == parameter_count(abstract_params(wide_config)) > 2 * parameter_count(params)
  text = wide_config.text if name == 'llava' else wide_config
  old_text = config.text if name == 'llava' else config
  assert (text.hidden_size, text.num_heads, text.num_kv_heads, text.intermediate_size) == (
      128, 8, 4, 256)
  assert text.rms_norm_eps == pytest.approx(old_text.rms_norm_eps * 64 / 128)
  assert (text.head_dim, text.num_layers) == (old_text.head_dim, old_text.num_layers)
  layers = (wide_params['language_model'] if name == 'llava' else wide_params)['layers']
  q_proj = np.asarray(layers['self_attn']['q_proj']['kernel'])  # [L, D', N', H]
  new_heads, old_heads = q_proj[:, :, old_text.num_heads:], q_proj[:, :64, :old_text.num_heads]
  assert 0.5 < new_heads.std() / old_heads.std() < 2  # New heads are random: real compute.
  if name == 'llava':
    assert wide_config.vision == config.vision
    same = jax.tree.map(np.array_equal, params['vision_tower'], wide_params['vision_tower'])
    assert all(jax.tree.leaves(same))


def test_control_perturbing_a_zero_o_proj_row_changes_logits(llama):
  config, _, wide_config, wide_params = llama
  o_proj = wide_params['layers']['self_attn']['o_proj']['kernel']  # [L, N', H, D']
  assert not np.asarray(o_proj[:, config.num_heads:]).any()  # The new heads' rows are zero...
  perturbed = jax.tree.map(lambda x: x, wide_params)
  perturbed['layers']['self_attn']['o_proj']['kernel'] = o_proj.at[0, config.num_heads].set(0.5)
  tokens = _tokens(0)
  wide, changed = _apply(wide_config, wide_params, tokens), _apply(wide_config, perturbed, tokens)
  print(f'control: max |diff| {_max_diff(wide, changed):.2e}')
  assert _max_diff(wide, changed) > 100 * TOLERANCE  # ...and they are all that hides the new heads.


def test_bad_sizes_raise(llama):
  config, params = llama[:2]
  for sizes, message in ((dict(WIDE, hidden_size=32), 'hidden_size=32'),
                         (dict(WIDE, num_heads=2), 'num_heads=2'),
                         (dict(WIDE, num_heads=9), 'num_heads=9'),  # not a multiple of group 2
                         (dict(WIDE, intermediate_size=64), 'intermediate_size=64')):
    with pytest.raises(ValueError, match=message):
      widen(config, params, **sizes, rng=jax.random.key(0))
  wrong = presets.get('tiny_llava').text  # Vocabulary 264, not 256.
  with pytest.raises(ValueError, match='do not match'):
    widen(wrong, params, **WIDE, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='target_parameters'):
    config_for_parameters(config, 1000)


def test_widen_to_parameters(llama):
  config, params = llama[:2]
  target = 3_000_000
  chosen = config_for_parameters(config, target)
  count = parameter_count(abstract_params(chosen))
  for neighbour in (chosen.hidden_size - 128, chosen.hidden_size + 128):  # Closest of its step.
    other = widened_config(config, hidden_size=neighbour, num_heads=neighbour // 16,
                           intermediate_size=max(128, 256 * round(2.6875 * neighbour / 256)))
    assert abs(count - target) <= abs(parameter_count(abstract_params(other)) - target)
  assert chosen.num_heads * chosen.head_dim == chosen.hidden_size
  assert chosen.intermediate_size % 256 == 0
  wide_config, wide_params = widen_to_parameters(config, params, target, jax.random.key(7))
  assert wide_config == chosen and parameter_count(wide_params) == count
  tokens = _tokens(3)
  logits, wide = _apply(config, params, tokens), _apply(wide_config, wide_params, tokens)
  print(f'{count} params (hidden {chosen.hidden_size}): max |diff| {_max_diff(logits, wide):.2e}')
  np.testing.assert_allclose(wide, logits, atol=TOLERANCE)
