"""Speculative sampling follows the target's distribution exactly.

The empirical joint distribution of the first three generated tokens (the first from the prefill,
the next two from a speculative step that drafts, accepts or rejects, resamples or adds a bonus)
over 24,000 rows is compared with the target's exact joint distribution, computed from its
logits, by a chi-square test. The same test rejects three planted biased samplers, so it has the
power to catch them. Tree drafting with recursive rejection sampling, and the adaptive draft
length, are held to the same test, and two planted tree biases are caught.

The pair has the paper's vocabulary layout: the draft has the first DRAFT_VOCAB of the target's
VOCAB ids, so the target samples ids the draft cannot propose, and the draft is then fed them.
"""

import dataclasses
import functools


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decoding_fixtures import perturb

from mmspec_jax.decoding import acceptance, engine, tree_step
from mmspec_jax.decoding.sampling import (RowSampling, SamplingConfig, pad_vocabulary,
                                          probabilities, processed_logits, row_probabilities,
                                          sample, sample_from, sample_rows)
from mmspec_jax.decoding.statistics import expected_block_efficiency
from mmspec_jax.decoding.tree import DraftTree
from mmspec_jax.decoding.placement import decoding_params
from mmspec_jax.models import LlamaConfig, build, init_params
from mmspec_jax.models.config import with_dtype
from mmspec_jax.models.layout import decoding_default

NUM_SAMPLES = 24_000
VOCAB = 8
GAMMA = 2
PROMPT = [1, 5, 3]
P_VALUE_FLOOR = 1e-3  # Seeds are fixed, so outcomes are deterministic; this is the bar they meet.

DRAFT_VOCAB = 6  # Ids 6 and 7 are the target's alone (as <image> and <pad> past 32000 ids).
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64,
                     eos_token_id=None, bos_token_id=None)
DRAFT_CONFIG = dataclasses.replace(CONFIG, vocab_size=DRAFT_VOCAB)
SAMPLINGS = {
    'temperature': SamplingConfig(temperature=0.7),
    'top_k': SamplingConfig(temperature=1.0, top_k=3),
    'top_p': SamplingConfig(temperature=1.3, top_p=0.8),
}


@pytest.fixture(scope='module')
def models():
  # A draft near the target: it is accepted often enough that a biased sampler shows (a draft that
  # is nearly always rejected hides most biases behind the residual resampling).
  target = init_params(CONFIG, jax.random.key(10))  # Logits of std ~1.
  draft = dict(target, embed_tokens={'embedding': target['embed_tokens']['embedding'][:DRAFT_VOCAB]},
               lm_head={'kernel': target['lm_head']['kernel'][:, :DRAFT_VOCAB]})
  return target, perturb(draft, 3, 0.5)


@pytest.fixture(scope='module')
def exact(models):
  """sampling -> the `models` target's exact_joint, computed once per setting."""
  return functools.lru_cache(maxsize=None)(functools.partial(exact_joint, models[0]))


def exact_joint(target_params, sampling, model=None):
  """float64[V, V, V]: P(t0, t1, t2) under the target (`model`, default CONFIG's), by
  enumerating every (t0, t1)."""
  t0, t1 = np.meshgrid(np.arange(VOCAB), np.arange(VOCAB), indexing='ij')
  sequences = np.concatenate([np.tile(PROMPT, (VOCAB * VOCAB, 1)), t0.reshape(-1, 1),
                              t1.reshape(-1, 1)], axis=1).astype(np.int32)
  model = model or build(CONFIG)
  logits = model.apply({'params': target_params}, sequences)  # [V*V, T, V]
  probs = np.asarray(probabilities(logits[:, -3:], sampling), np.float64)
  first = probs[0, 0]  # P(t0): the same prefix for every sequence.
  second = probs[::VOCAB, 1]  # P(t1 | t0), rows indexed by t0.
  third = probs[:, 2].reshape(VOCAB, VOCAB, VOCAB)  # P(t2 | t0, t1)
  return first[:, None, None] * second[:, :, None] * third


def sampled_joint(target_params, draft_params, sampling, decoder=None):
  """Counts float64[V, V, V] of the first three tokens of NUM_SAMPLES rows, decoded by `decoder`
  (default: a chain of GAMMA drafts), and the engine's result."""
  decoder = decoder or engine.SpeculativeDecoder(build(CONFIG), build(DRAFT_CONFIG), GAMMA,
                                                 sampling, max_new_tokens=3, eos_token_ids=(-1,))
  tokens = np.tile(np.array(PROMPT, np.int32), (NUM_SAMPLES, 1))
  lengths = np.full((NUM_SAMPLES,), len(PROMPT), np.int32)
  result = decoder.generate(target_params, draft_params, tokens, lengths, None,
                            jax.random.key(0))
  generated = np.asarray(result.tokens)
  assert (np.asarray(result.num_generated) == 3).all()
  counts = np.zeros((VOCAB,) * 3)
  np.add.at(counts, (generated[:, 0], generated[:, 1], generated[:, 2]), 1)
  # The target's own ids do occur, so the draft reads ids it does not have.
  assert (generated >= DRAFT_VOCAB).any(axis=1).mean() > 0.05
  return counts, result


def chi_square_p_value(counts, expected_probs):
  expected = expected_probs.reshape(-1) / expected_probs.sum() * counts.sum()  # float32 rounding
  observed = counts.reshape(-1)
  assert observed[expected == 0].sum() == 0, 'sampled a token the target gives zero probability'
  # Pool cells expected fewer than 5 times, as the test's approximation requires.
  small = expected < 5
  if expected[small].sum() > 0:
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
  else:
    expected, observed = expected[~small], observed[~small]
  return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize('name', list(SAMPLINGS))
def test_sampled_tokens_follow_the_target(models, exact, name):
  target_params, draft_params = models
  sampling = SAMPLINGS[name]
  counts, result = sampled_joint(target_params, draft_params, sampling)
  p_value = chi_square_p_value(counts, exact(sampling))
  print(f'{name}: p = {p_value:.3f}, accepted per row {float(result.num_accepted.mean()):.2f}')
  assert p_value > P_VALUE_FLOOR
  # The draft disagrees with the target often enough to exercise every path.
  accepted = np.asarray(result.accepted_by_position)
  assert 0.1 < accepted[:, 0].mean() < 0.9


def _greedy_drafting_with_softmax_q(rng, draft_logits, sampling, vocab_size):
  logits = pad_vocabulary(draft_logits, vocab_size)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), probabilities(logits, sampling)


def _raw_logit_q(rng, draft_logits, sampling, vocab_size):
  logits = pad_vocabulary(draft_logits, vocab_size)
  token, _ = sample(rng, logits, sampling)
  return token, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _batch_minimum(flags):
  counts = jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=1), axis=1)
  return jnp.broadcast_to(counts.min(), counts.shape)


@pytest.mark.parametrize('bug, name', [
    ('greedy_draft', 'temperature'),
    ('raw_logit_q', 'top_k'),
    ('batch_minimum', 'temperature'),
])
def test_planted_biased_samplers_are_caught(models, exact, monkeypatch, bug, name):
  if bug == 'greedy_draft':
    monkeypatch.setattr(engine, '_draft_token', _greedy_drafting_with_softmax_q)
  elif bug == 'raw_logit_q':
    monkeypatch.setattr(engine, '_draft_token', _raw_logit_q)
  else:
    monkeypatch.setattr(acceptance, 'leading_true_count', _batch_minimum)
  assert _p_value_with_planted_bug(models, exact, bug, name) < P_VALUE_FLOOR


def _p_value_with_planted_bug(models, exact, bug, name, branching=None):
  """The chi-square p-value of a chain (or a tree of `branching`) decoded with the bug planted."""
  # Equal decoders share jit's trace cache; drop it so the planted function is traced.
  jax.clear_caches()
  target_params, draft_params = models
  sampling = SAMPLINGS[name]
  if branching is None:
    counts, _ = sampled_joint(target_params, draft_params, sampling)
  else:
    counts, _ = sampled_tree_joint(target_params, draft_params, sampling, branching)
  p_value = chi_square_p_value(counts, exact(sampling))
  print(f'{bug}: p = {p_value:.2e}')
  jax.clear_caches()  # Nothing traced with the planted bug may outlive this test.
  return p_value


# Trees: siblings drawn without replacement, verified by recursive rejection sampling. (4, 1)
# under top-k 3 leaves each root a 4th child that cannot be drawn; under top-p the tree has a
# confidence threshold that stops rows early (the adaptive length), and the target samples the
# positions not drafted.
TREE_CASES = {
    'temperature': ((3, 2), 0.0),
    'top_k': ((4, 1), 0.0),
    'top_p': ((3, 1, 1), 0.6),
}


def sampled_tree_joint(target_params, draft_params, sampling, branching, threshold=0.0):
  decoder = engine.SpeculativeDecoder(build(CONFIG), build(DRAFT_CONFIG), len(branching),
                                      sampling, max_new_tokens=3, eos_token_ids=(-1,),
                                      draft_tree=DraftTree(branching),
                                      confidence_threshold=threshold)
  return sampled_joint(target_params, draft_params, sampling, decoder)


@pytest.mark.parametrize('case', list(TREE_CASES))
def test_sampled_tree_tokens_follow_the_target(models, exact, case):
  target_params, draft_params = models
  sampling = SAMPLINGS[case]
  branching, threshold = TREE_CASES[case]
  counts, result = sampled_tree_joint(target_params, draft_params, sampling, branching,
                                      threshold)
  p_value = chi_square_p_value(counts, exact(sampling))
  accepted = np.asarray(result.accepted_by_position)
  print(f'{case}: p = {p_value:.3f}, accepted at depth 1 {accepted[:, 0].mean():.2f}')
  assert p_value > P_VALUE_FLOOR
  assert 0.1 < accepted[:, 0].mean() < 0.95
  if threshold:
    steps = np.asarray(result.num_target_calls) - 1
    assert (np.asarray(result.draft_calls) < steps * len(branching)).mean() > 0.1  # Stopped.


def _with_replacement(rng, probs, num):
  """Children drawn independently (with replacement): a repeated token can be drafted twice."""
  draw = lambda key, p: jax.random.categorical(key, jnp.log(p), shape=(num,) + p.shape[:-1])
  tokens = jnp.moveaxis(jax.vmap(draw)(rng, probs), 1, -1).astype(jnp.int32)
  return tokens, jnp.ones(tokens.shape, bool)


def _trusting_try(draw, p_x, q_x):
  """Tries every child, even one of probability 0 under the renormalized q (a repeat)."""
  return jnp.ones(draw.shape, bool), draw * q_x < p_x


def _removed_without_renormalizing(q, token):
  return jnp.put_along_axis(q, token[:, None], 0.0, axis=1, inplace=False)


@pytest.mark.parametrize('bug, name', [('with_replacement', 'top_k'),
                                       ('not_renormalized', 'temperature')])
def test_planted_tree_biases_are_caught(models, exact, monkeypatch, bug, name):
  """Siblings drawn with replacement but verified as if without (each child's renormalized q
  trusted), and q not renormalized after a rejected sibling."""
  if bug == 'with_replacement':
    monkeypatch.setattr(tree_step, 'draw_children', _with_replacement)
    monkeypatch.setattr(acceptance, 'try_child', _trusting_try)
  else:
    monkeypatch.setattr(acceptance, 'without_token', _removed_without_renormalizing)
  assert _p_value_with_planted_bug(models, exact, bug, name, (3, 2)) < P_VALUE_FLOOR


def test_expected_block_efficiency_with_known_acceptance():
  """Synthetic p and q at every position: alpha = sum(min(p, q)) is each token's acceptance
  probability, so the mean tokens per step must be (1 - alpha^(G+1)) / (1 - alpha), and the
  emitted first token must follow p."""
  rows, gamma = 60_000, 4
  p = jnp.array([0.5, 0.2, 0.2, 0.1])
  q = jnp.array([0.25, 0.25, 0.25, 0.25])
  alpha = float(jnp.minimum(p, q).sum())
  draft_rng, accept_rng = jax.random.split(jax.random.key(5))
  draft_tokens = jax.random.categorical(draft_rng, jnp.log(q), shape=(rows, gamma))
  num_accepted, emitted = acceptance.speculative_accept(
      accept_rng, draft_tokens.astype(jnp.int32), jnp.broadcast_to(q, (rows, gamma, 4)),
      jnp.broadcast_to(p, (rows, gamma + 1, 4)))
  tokens_per_step = np.asarray(num_accepted + 1, np.float64)
  expected = expected_block_efficiency(alpha, gamma)
  assert abs(tokens_per_step.mean() - expected) < 4 * tokens_per_step.std() / np.sqrt(rows)
  first = np.bincount(np.asarray(emitted[:, 0]), minlength=4)
  assert chi_square_p_value(first, np.asarray(p, np.float64)) > P_VALUE_FLOOR


def test_top_k_and_top_p_filter_as_documented():
  logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
  kept = lambda s: np.isfinite(np.asarray(processed_logits(logits, s)))
  np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_k=2)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.65)), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.75)), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.3)), [1, 0, 0, 0])


def test_smaller_draft_vocabulary_never_drafts_missing_ids():
  draft_logits = jnp.array([[2.0, 1.0, 0.5], [0.1, 0.2, 0.3]])  # Vd = 3
  padded = pad_vocabulary(draft_logits, 5)
  probs = np.asarray(probabilities(padded, SamplingConfig(temperature=1.0)))
  assert probs.shape == (2, 5) and (probs[:, 3:] == 0).all()
  np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
  tokens, _ = sample(jax.random.key(0), jnp.tile(padded, (500, 1)), SamplingConfig(1.0))
  assert int(tokens.max()) < 3
  with pytest.raises(ValueError, match='larger than the target'):
    pad_vocabulary(draft_logits, 2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(temperature=-0.1), r'temperature must be in \[0, 100.0\]'),
    (dict(top_p=0.0), r'top_p must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(top_k=-1), r'top_k must be an integer in \[0, 2\*\*31\)'),
    (dict(top_k=2 ** 31), r'top_k must be an integer in \[0, 2\*\*31\)'),
    (dict(temperature=1e39), r'temperature must be in \[0, 100.0\]'),
])
def test_bad_sampling_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingConfig(**kwargs)


def test_bad_decoder_settings_are_refused():
  model = build(CONFIG)
  with pytest.raises(ValueError, match='gamma'):
    engine.SpeculativeDecoder(model, model, 0, SamplingConfig(), 4, (2,))
  with pytest.raises(ValueError, match='max_new_tokens'):
    engine.SpeculativeDecoder(model, None, 0, SamplingConfig(), 0, (2,))
  bigger = build(LlamaConfig(**{**CONFIG.__dict__, 'vocab_size': VOCAB + 1}))
  with pytest.raises(ValueError, match='draft vocabulary'):
    engine.SpeculativeDecoder(model, bigger, 2, SamplingConfig(), 4, (2,))


def test_top_k_keeps_exactly_k_tokens_on_ties():
  logits = jnp.array([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
  kept = lambda s: np.isfinite(np.asarray(processed_logits(logits, s))).astype(int).tolist()
  # Ties go to the lower id, as a stable sort (and XLA's top-k) order them.
  assert kept(SamplingConfig(1.0, top_k=2)) == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
  # top-p stops at the rank where the mass is reached, inside a tie too.
  assert kept(SamplingConfig(1.0, top_p=0.5)) == [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
  probs = np.asarray(probabilities(logits, SamplingConfig(1.0, top_k=2)))
  np.testing.assert_allclose(probs[1], [0.5, 0.5, 0, 0, 0])


@pytest.mark.parametrize('temperature', [1e-6, 1e-9, 0.0])
def test_tiny_temperatures_decode_greedily(temperature):
  sampling = SamplingConfig(temperature=temperature)
  assert sampling.greedy
  logits = jnp.array([[50.0, 49.9999, -3.0], [0.0, 1e-3, 2e-3]])
  tokens, probs = sample(jax.random.key(0), logits, sampling)
  assert tokens.tolist() == [0, 2]
  assert np.isfinite(np.asarray(probs)).all()
  # Just above the greedy cut the softmax is still finite (no inf - inf).
  probs = np.asarray(probabilities(logits, SamplingConfig(temperature=1.1e-5)))
  assert np.isfinite(probs).all() and np.allclose(probs.sum(-1), 1)


def test_sampling_streams_are_per_row():
  """A row's draws come from its own key: the same key gives the same draw in any batch."""
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (5, 50)))
  keys = jax.random.split(jax.random.key(2), 5)
  together = np.asarray(sample_from(keys, probs))
  alone = [int(sample_from(keys[i:i + 1], probs[i:i + 1])[0]) for i in range(5)]
  shuffled = np.asarray(sample_from(keys[::-1], probs[::-1]))[::-1]
  assert together.tolist() == alone == shuffled.tolist()


def test_each_rows_own_settings_give_that_settings_distribution():
  """row_probabilities at the paper's layout (a 32064-id target, the draft's 32000 padded with
  -inf, ties in the logits): row b's distribution is probabilities() under row b's settings, and
  sample_rows draws a greedy row's argmax."""
  settings = [SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0,
              top_k=3), SamplingConfig(temperature=1.3, top_p=0.8),
              SamplingConfig(temperature=0.9, top_k=40, top_p=0.5)]
  logits = jax.random.normal(jax.random.key(0), (len(settings), 2, 32000)) * 3
  logits = logits.at[:, :, 10:14].set(logits.max())  # Ties at the top: kept by the lower id.
  logits = pad_vocabulary(logits, 32064)
  rows = RowSampling.of(settings)
  got = row_probabilities(logits, rows)
  for b, sampling in enumerate(settings):
    np.testing.assert_allclose(got[b], probabilities(logits[b], sampling), atol=1e-6)
    assert float(got[b, :, 32000:].sum()) == 0
  tokens, _ = sample_rows(jax.random.split(jax.random.key(1), len(settings)), logits, rows)
  np.testing.assert_array_equal(tokens[0], jnp.argmax(logits[0], axis=-1))
  # Without top-k or top-p anywhere, the sort is skipped: still the same distributions.
  plain = RowSampling.of([SamplingConfig(), SamplingConfig(temperature=0.5)])
  np.testing.assert_allclose(row_probabilities(logits[:2], plain)[1],
                             probabilities(logits[1], SamplingConfig(temperature=0.5)), atol=1e-6)


def test_per_request_sampling_engine_follows_the_target(models, exact):
  """The engine that samples under each row's own settings (continuous batching's), every row
  with top-p's: the same chi-square test."""
  target_params, draft_params = models
  sampling = SAMPLINGS['top_p']
  decoder = engine.SpeculativeDecoder(build(CONFIG), build(DRAFT_CONFIG), GAMMA, sampling,
                                      max_new_tokens=3, eos_token_ids=(-1,),
                                      per_request_sampling=True)
  counts, _ = sampled_joint(target_params, draft_params, sampling, decoder)
  p_value = chi_square_p_value(counts, exact(sampling))
  print(f'per-request top_p: p = {p_value:.3f}')
  assert p_value > P_VALUE_FLOOR


@pytest.mark.parametrize('branching', [None, (3, 2)], ids=['chain', 'tree'])
def test_sampled_bfloat16_tokens_follow_the_bfloat16_target(models, branching):
  """In bfloat16 on this backend's decoding layouts (on CPU: output-major kernels, matmuls
  padded to three rows), a chain and a tree sample the bfloat16 target's distribution."""
  layouts = {verifies: decoding_default(verifies=verifies, dtype='bfloat16')
             for verifies in (True, False)}
  config, draft_config = (with_dtype(c, 'bfloat16') for c in (CONFIG, DRAFT_CONFIG))
  cast = lambda params: jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  target = decoding_params(config, cast(models[0]), layouts[True])
  draft = decoding_params(draft_config, cast(models[1]), layouts[False])
  sampling = SAMPLINGS['temperature']
  tree = DraftTree(branching) if branching else None
  decoder = engine.SpeculativeDecoder(
      build(config, layouts[True]), build(draft_config, layouts[False]),
      tree.depth if tree else GAMMA, sampling, max_new_tokens=3, eos_token_ids=(-1,),
      draft_tree=tree)
  counts, result = sampled_joint(target, draft, sampling, decoder)
  p_value = chi_square_p_value(counts, exact_joint(target, sampling,
                                                   build(config, layouts[True])))
  print(f'bfloat16 {branching}: p = {p_value:.3f}')
  assert p_value > P_VALUE_FLOOR
  accepted = np.asarray(result.accepted_by_position)
  assert 0.1 < accepted[:, 0].mean() < 0.9
