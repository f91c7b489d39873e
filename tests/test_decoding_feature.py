"""The feature draft (models/feature_draft.py) in the decoding engine (decoding/feature_step.py):
greedy chains give the target's greedy tokens, sampled chains follow the target's distribution
(test_decoding_sampling's chi-square test), and a request decodes the same alone and among others
in continuous batching. Its drafts agree with the target in part, so acceptance and rejection both
occur."""

import dataclasses

import jax
import numpy as np
import pytest

import decoding_fixtures as fx
from test_decoding_sampling import (  # noqa: F401 (exact, models: fixtures)
    CONFIG, DRAFT_CONFIG, GAMMA, P_VALUE_FLOOR, SAMPLINGS, chi_square_p_value, exact, models,
    sampled_joint)
from mmspec_jax.decoding import feature_step
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig, row_keys
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree
from mmspec_jax.models import build, init_params
from mmspec_jax.models.llava import Llava

MAX_NEW_TOKENS = 24
NO_EOS = (-1,)



@pytest.fixture(scope='module')
def setting():
  """The tiny LLaVA target, its ragged image and text rows, their greedy autoregressive tokens,
  and a feature draft derived from the target."""
  target_config, target_params = fx.llava_target()
  batch = fx.ragged_batch(target_config)
  autoregressive = SpeculativeDecoder(build(target_config), None, 0, SamplingConfig(),
                                      MAX_NEW_TOKENS, NO_EOS).generate(
                                          target_params, None, *batch, jax.random.key(0))
  draft = fx.feature_draft(target_config, target_params)
  return target_config, target_params, batch, autoregressive, draft


SHAPES = {  # (gamma, tree, confidence threshold)
    'chain1': (1, None, 0.0), 'chain3': (3, None, 0.0),
    'tree2x2x1': (3, DraftTree((2, 2, 1)), 0.0),
    'adaptive_tree': (4, DraftTree((3, 1, 1, 1)), 0.3),
}


@pytest.mark.parametrize('shape', list(SHAPES))
def test_greedy_feature_drafting_equals_autoregressive(setting, shape):
  """Chains, a tree and an adaptive tree (its nodes fed beside their parents' hidden states)."""
  target_config, target_params, batch, autoregressive, (draft_config, draft_params) = setting
  gamma, tree, threshold = SHAPES[shape]
  decoder = SpeculativeDecoder(build(target_config), build(draft_config), gamma, SamplingConfig(),
                               MAX_NEW_TOKENS, NO_EOS, draft_tree=tree,
                               confidence_threshold=threshold)
  assert decoder.draft_prompt_length([[1, 2]], 8) is None  # It reads every position, images too.
  result = decoder.generate(target_params, draft_params, *batch, jax.random.key(0))
  assert fx.generated_rows(result) == fx.generated_rows(autoregressive)
  steps = int((result.num_target_calls - 1).sum())
  accepted = int(result.num_accepted.sum())
  assert 0 < accepted < steps * gamma  # Both paths exercised.


@pytest.mark.parametrize('tree', [None, DraftTree((2, 2))], ids=['chain', 'tree'])
def test_sampled_feature_drafting_follows_the_target(models, exact, tree):
  """test_decoding_sampling's pair, its draft made a feature draft one position behind the
  target (decoding_fixtures.feature_draft's construction): the first three tokens of 24,000 rows
  against the target's exact joint distribution, for a chain and a tree (recursive rejection
  sampling over children drawn without replacement)."""
  target_params, draft_params = models
  config, params = fx.shifted_feature_draft(DRAFT_CONFIG, draft_params, (0,))
  sampling = SAMPLINGS['top_p']
  decoder = SpeculativeDecoder(build(CONFIG), build(config), GAMMA, sampling, max_new_tokens=3,
                               eos_token_ids=NO_EOS, draft_tree=tree)
  counts, result = sampled_joint(target_params, params, sampling, decoder)
  p_value = chi_square_p_value(counts, exact(sampling))
  assert p_value > P_VALUE_FLOOR, p_value
  accepted = np.asarray(result.accepted_by_position)
  assert 0.1 < accepted[:, 0].mean() < 0.9


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_a_request_decodes_the_same_alone_and_continuously(setting, temperature):
  """Six text requests with their own budgets over 2 slots, entering as slots free up, against
  each decoded alone in a slot of its own."""
  target_config, target_params, _, _, draft = setting
  session = DecodeSession.from_params(None, (target_config, target_params), {'feature': draft})
  alone, together = fx.alone_and_together(session, 'feature',
                                          sampling=SamplingConfig(temperature=temperature))
  assert {k: f.token_ids for k, f in alone.items()} == {k: f.token_ids for k, f in
                                                         together.items()}
  if not temperature:
    assert sum(int(f.accepted_by_position.sum()) for f in together.values()) > 0


def test_feature_layers_past_the_target_are_refused_by_name(setting):
  target_config, _, _, _, (draft_config, _) = setting
  deep = dataclasses.replace(draft_config, feature_layers=(0, 5))
  with pytest.raises(ValueError, match=r'reads target layers \(0, 5\), but the target has 2'):
    SpeculativeDecoder(build(target_config), build(deep), 3, SamplingConfig(), MAX_NEW_TOKENS,
                       NO_EOS)
  wide = dataclasses.replace(draft_config, target_hidden_size=draft_config.target_hidden_size + 8)
  with pytest.raises(ValueError, match='reads target features of width 72; the target'):
    DecodeSession.from_params(None, setting[:2], {'wide': (wide, None)}).decoder(
        'wide', num_draft_tokens=3, sampling=SamplingConfig(), max_new_tokens=4)


def test_the_draft_reads_the_target_features_of_its_context(setting):
  """After the prefill and after each step, the draft's first proposal is its full forward's
  prediction over the row's whole context, teacher-forced on the target's features of that
  context (the pending positions and the cache line up), image rows included, after steps that
  accepted drafts (several pending positions) and steps that did not. The derived draft, its
  fused features given weight: every input of it matters."""
  target_config, target_params, batch, _, (draft_config, draft_params) = setting
  random = init_params(draft_config, jax.random.key(5))
  draft_params = dict(draft_params, fc=random['fc'], input_proj={'kernel': np.asarray(
      draft_params['input_proj']['kernel']).copy()})
  draft_params['input_proj']['kernel'][1] = 0.5 * np.asarray(random['input_proj']['kernel'][1])
  sampling = SamplingConfig(temperature=1.0)
  decoder = SpeculativeDecoder(build(target_config), build(draft_config), 3, sampling,
                               MAX_NEW_TOKENS, NO_EOS)
  tokens, lengths, images = batch
  rows = tokens.shape[0]
  cache_length = tokens.shape[1] + MAX_NEW_TOKENS + 4
  prefill = jax.jit(lambda t, d: decoder.prefill_rows(
      t, d, tokens, lengths, images, row_keys(jax.random.key(0), rows),
      np.full((rows,), MAX_NEW_TOKENS, np.int32), cache_length, tokens.shape[1]))
  propose = jax.jit(lambda d, state: feature_step.propose(decoder, d, state,
                                                          row_keys(jax.random.key(1), rows))[1])
  step = jax.jit(decoder._step)  # pylint: disable=protected-access
  target, draft = build(target_config), build(draft_config)
  state = prefill(target_params, draft_params)
  pending_counts, proposals = set(), []  # (row, context length m, the first proposal's probs)
  for _ in range(6):
    pending_counts |= set(np.asarray(state.pending_count).tolist())
    probs = np.asarray(propose(draft_params, state))[:, 0, :draft_config.text.vocab_size]
    proposals += [(row, int(lengths[row] + state.num_generated[row]), probs[row])
                  for row in range(rows)]
    state = step(target_params, draft_params, state)
  assert 1 in pending_counts and max(pending_counts) > 1, pending_counts
  # The draft is causal: one full forward over each row's final context serves every step.
  expected = []
  for row in range(rows):
    generated = np.asarray(state.tokens)[row, :int(state.num_generated[row])]
    context = np.concatenate([tokens[row, :lengths[row]], generated])[None]  # c_0 .. c_{m-1}
    _, features = target.apply({'params': target_params}, context, draft_config.feature_layers,
                               images[row:row + 1], method=Llava.forward_with_features)
    logits, _ = draft.apply({'params': draft_params}, context[:, 1:], features[:, :-1])
    expected.append(np.asarray(jax.nn.softmax(logits[0])))  # Position i predicts c_{i + 2}.
  for row, length, probs in proposals:
    np.testing.assert_allclose(probs, expected[row][length - 2], atol=1e-5)


def test_a_tree_step_drafts_what_the_chain_step_drafts(setting):
  """A chain run through the tree step (an adaptive chain whose threshold never stops it) feeds
  each node beside its parent's hidden state, as the chain step feeds its own: the same drafts,
  so the same acceptance at every position."""
  target_config, target_params, batch, _, (draft_config, draft_params) = setting
  results = [SpeculativeDecoder(build(target_config), build(draft_config), 3, SamplingConfig(),
                                MAX_NEW_TOKENS, NO_EOS, confidence_threshold=threshold).generate(
                                    target_params, draft_params, *batch, jax.random.key(0))
             for threshold in (0.0, 1e-6)]
  assert results[1].num_target_calls.shape == results[0].num_target_calls.shape
  for name in ('tokens', 'num_target_calls', 'accepted_by_position'):
    np.testing.assert_array_equal(getattr(results[0], name), getattr(results[1], name))
