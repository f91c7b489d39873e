"""The explicit KV cache: prefill and extends (1 or k+1 tokens, ragged rows, rollback) give the
same logits as a full forward pass over each row's sequence."""

import functools

import jax
import numpy as np
import pytest

from mmspec_jax.models import (KVCache, Layout, Llama, Llava, arrange_params, build,
                               init_params, presets)

TOLERANCE = 1e-4
# The TPU paged kernel reads keys and values as bfloat16, float32 caches too (exact for the
# bfloat16 caches it is made for): logits then differ from float32 by a few 1e-3 here. That it
# computes attention exactly is tested on bfloat16-valued inputs (test_pallas_attention).
PALLAS_TOLERANCE = 3e-2
PROMPT_LENGTHS = np.array([3, 7], np.int32)
# The canonical layout (one 256-slot block covers the caches here); unrolled and fused with
# 5-slot blocks, so rows span several blocks and the last block overhangs the 32-slot cache;
# scanned and fused through jax.nn.dot_product_attention (its 'xla' implementation on CPU);
# kernels stored output-major, scanned and unrolled-fused; the TPU paged kernel (interpreted) in
# 16-slot blocks over its heads-first cache.
LAYOUTS = {
    'scanned': Layout(),
    'unrolled_fused_blocks_of_5': Layout(layers='unrolled', fused_projections=True,
                                         attention_block_size=5),
    'scanned_output_major': Layout(output_major_kernels=True),
    'unrolled_fused_output_major': Layout(layers='unrolled', fused_projections=True,
                                          output_major_kernels=True),
    'scanned_fused_kernel': Layout(fused_projections=True, attention='xla'),
    'scanned_pallas': Layout(attention='pallas', attention_block_size=16),
}


@pytest.fixture(scope='module', params=list(LAYOUTS))
def llama(request):
  """The cache methods run in each layout (params arranged from the canonical ones); the full
  forward, the ground truth, always in the canonical layout."""
  config = presets.get('tiny_llama')
  layout = LAYOUTS[request.param]
  params = init_params(config, jax.random.key(0))
  decoding = arrange_params(config, params, layout)
  models = {False: build(config), True: build(config, layout)}
  jitted = jax.jit(lambda p, method, cached, *args: models[cached].apply(
      {'params': p}, *args, method=method), static_argnums=(1, 2))

  def apply(method, *args):
    cached = method is not Llama.__call__
    return jitted(decoding if cached else params, method, cached, *args)
  tolerance = PALLAS_TOLERANCE if layout.attention == 'pallas' else TOLERANCE
  new_cache = lambda batch, length: KVCache.init(config, batch, length, layout=layout)
  return new_cache, apply, tolerance


def _sequences(seed, total=16, vocab=256):
  return np.random.RandomState(seed).randint(0, vocab, (2, total)).astype(np.int32)


def _full_logits(apply, sequences):
  # Each row alone: the ground truth a cache must reproduce.
  return [np.asarray(apply(Llama.__call__, row[None]))[0] for row in sequences]


def _prefill(new_cache, apply, sequences):
  prompts = np.zeros((2, PROMPT_LENGTHS.max()), np.int32)
  for b, n in enumerate(PROMPT_LENGTHS):
    prompts[b, :n] = sequences[b, :n]
  cache = new_cache(2, 32)
  return apply(Llama.prefill, prompts, PROMPT_LENGTHS, cache)


def _continuation(sequences, start, count):
  """int32[B, count]: each row's tokens from its own position start[b]."""
  return np.stack([sequences[b, s:s + count] for b, s in enumerate(start)])


def test_prefill_then_single_token_extends(llama):
  new_cache, apply, tolerance = llama
  sequences = _sequences(0)
  full = _full_logits(apply, sequences)
  last, cache = _prefill(new_cache, apply, sequences)
  for b, n in enumerate(PROMPT_LENGTHS):
    np.testing.assert_allclose(last[b], full[b][n - 1], atol=tolerance)
  for step in range(5):
    tokens = _continuation(sequences, PROMPT_LENGTHS + step, 1)
    logits, cache = apply(Llama.extend, tokens, cache)
    for b, n in enumerate(PROMPT_LENGTHS):
      np.testing.assert_allclose(logits[b, 0], full[b][n + step], atol=tolerance)
  np.testing.assert_array_equal(cache.lengths, PROMPT_LENGTHS + 5)


def test_prefill_then_verification_sized_extend(llama):
  new_cache, apply, tolerance = llama
  sequences = _sequences(1)
  full = _full_logits(apply, sequences)
  _, cache = _prefill(new_cache, apply, sequences)
  num_draft_tokens = 5
  tokens = _continuation(sequences, PROMPT_LENGTHS, num_draft_tokens + 1)
  logits, cache = apply(Llama.extend, tokens, cache)
  for b, n in enumerate(PROMPT_LENGTHS):
    np.testing.assert_allclose(logits[b], full[b][n:n + num_draft_tokens + 1], atol=tolerance)
  np.testing.assert_array_equal(cache.lengths, PROMPT_LENGTHS + num_draft_tokens + 1)


def test_rollback_then_reextend_matches_shorter_prefix(llama):
  new_cache, apply, tolerance = llama
  sequences = _sequences(2)
  _, cache = _prefill(new_cache, apply, sequences)
  drafted = _continuation(sequences, PROMPT_LENGTHS, 6)
  _, cache = apply(Llama.extend, drafted, cache)
  # Row 0 keeps 2 of its 6 new tokens, row 1 keeps 5: ragged acceptance.
  kept = np.array([2, 5], np.int32)
  cache = cache.with_lengths(PROMPT_LENGTHS + kept)
  replacement = np.random.RandomState(9).randint(0, 256, (2, 3)).astype(np.int32)
  logits, cache = apply(Llama.extend, replacement, cache)
  for b, n in enumerate(PROMPT_LENGTHS):
    # The truth: the prompt, the kept tokens, the replacement; the rejected tokens never existed.
    sequence = np.concatenate([sequences[b, :n + kept[b]], replacement[b]])
    expected = np.asarray(apply(Llama.__call__, sequence[None]))[0][-3:]
    np.testing.assert_allclose(logits[b], expected, atol=tolerance)
  np.testing.assert_array_equal(cache.lengths, PROMPT_LENGTHS + kept + 3)


def test_rollback_is_needed(llama):
  """Control for the test above: extending without the rollback gives different logits."""
  new_cache, apply, tolerance = llama
  sequences = _sequences(2)
  _, cache = _prefill(new_cache, apply, sequences)
  _, cache = apply(Llama.extend, _continuation(sequences, PROMPT_LENGTHS, 6), cache)
  replacement = np.random.RandomState(9).randint(0, 256, (2, 3)).astype(np.int32)
  logits, _ = apply(Llama.extend, replacement, cache)
  sequence = np.concatenate([sequences[0, :PROMPT_LENGTHS[0] + 2], replacement[0]])
  expected = np.asarray(apply(Llama.__call__, sequence[None]))[0][-3:]
  assert np.abs(np.asarray(logits[0]) - expected).max() > 100 * tolerance


@pytest.mark.parametrize('layout', ['scanned', 'unrolled_fused_blocks_of_5'])
def test_llava_prefill_with_images_then_extends(layout):
  config = presets.get('tiny_llava')
  params = init_params(config, jax.random.key(1))
  decoding = arrange_params(config, params, LAYOUTS[layout])
  model, decoder = build(config), build(config, LAYOUTS[layout])
  rng = np.random.RandomState(3)
  size = config.vision.image_size
  images = rng.randn(2, size, size, 3).astype(np.float32)
  text_lengths = [2, 6]
  rows = [np.array([1] + [config.image_token_index] * config.num_image_tokens
                   + rng.randint(3, 250, n + 4).tolist(), np.int32) for n in text_lengths]
  lengths = np.array([len(r) - 4 for r in rows], np.int32)
  prompts = np.zeros((2, lengths.max()), np.int32)
  for b, n in enumerate(lengths):
    prompts[b, :n] = rows[b][:n]
  # Jitted: the LLaVA run op by op (its vision tower included) takes several times longer.
  forward = jax.jit(functools.partial(model.apply, {'params': params}))
  full = [np.asarray(forward(row[None], images[b:b + 1]))[0] for b, row in enumerate(rows)]
  decode = jax.jit(functools.partial(decoder.apply, {'params': decoding}),
                   static_argnames='method')
  cache = KVCache.init(config.text, 2, 64)
  last, cache = decode(prompts, lengths, cache, images, method=Llava.prefill)
  tokens = np.stack([rows[b][n:n + 4] for b, n in enumerate(lengths)])
  logits, cache = decode(tokens, cache, method=Llava.extend)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(last[b], full[b][n - 1], atol=TOLERANCE)
    np.testing.assert_allclose(logits[b], full[b][n:n + 4], atol=TOLERANCE)
  # The image changes the logits: the features really are placed at the placeholders.
  blank = np.asarray(forward(rows[0][None], np.zeros_like(images[:1])))
  assert np.abs(blank[0] - full[0]).max() > 100 * TOLERANCE
