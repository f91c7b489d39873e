"""Greedy speculative decoding is token-identical to greedy autoregressive decoding."""

import jax
import numpy as np
import pytest
import torch

import decoding_fixtures as fx
from mmspec_jax.testing import tiny_hf as hf_builders
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding import statistics
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import build, init_params, presets

MAX_NEW_TOKENS = 24
GREEDY = SamplingConfig()
NO_EOS = (-1,)


def _rows(result):
  return [np.asarray(result.tokens)[b, :int(result.num_generated[b])].tolist()
          for b in range(result.tokens.shape[0])]


def _decode(target_config, target_params, draft=None, gamma=0, inputs=None, eos=NO_EOS,
            max_new_tokens=MAX_NEW_TOKENS, sampling=GREEDY, seed=0):
  draft_config, draft_params = draft or (None, None)
  decoder = SpeculativeDecoder(build(target_config),
                               build(draft_config) if draft_config else None, gamma, sampling,
                               max_new_tokens, eos)
  tokens, lengths, _ = inputs
  # The language-only draft's prompt and cache cut to the batch's longest text, exactly.
  draft_length = decoder.draft_prompt_length([t[:n] for t, n in zip(tokens, lengths)],
                                             tokens.shape[1], multiple=1)
  return decoder.generate(target_params, draft_params, *inputs, jax.random.key(seed),
                          draft_prompt_length=draft_length)


@pytest.fixture(scope='module')
def setting():
  target_config, target_params = fx.llava_target()
  inputs = fx.ragged_batch(target_config)
  autoregressive = _decode(target_config, target_params, inputs=inputs)
  return target_config, target_params, inputs, autoregressive


@pytest.mark.parametrize('gamma', [1, 3, 5])
@pytest.mark.parametrize('kind', ['language', 'adapter'])
def test_greedy_speculative_equals_autoregressive(setting, kind, gamma):
  target_config, target_params, inputs, autoregressive = setting
  make_draft = fx.language_draft if kind == 'language' else fx.adapter_draft
  draft = make_draft(target_config, target_params)
  result = _decode(target_config, target_params, draft, gamma, inputs)
  assert _rows(result) == _rows(autoregressive)
  # Both paths were exercised: some drafts accepted, some rejected.
  steps = int((result.num_target_calls - 1).sum())
  accepted = int(result.num_accepted.sum())
  assert 0 < accepted < steps * gamma


def test_rows_stop_at_their_own_eos(setting):
  target_config, target_params, inputs, autoregressive = setting
  rows = _rows(autoregressive)
  eos = rows[0][4]
  expected = [row[:row.index(eos) + 1] if eos in row else row for row in rows]
  assert len(expected[0]) == rows[0].index(eos) + 1 and any(len(r) == MAX_NEW_TOKENS
                                                            for r in expected)
  draft = fx.adapter_draft(target_config, target_params)
  result = _decode(target_config, target_params, draft, 3, inputs, eos=(eos,))
  assert _rows(result) == expected
  # Finished rows no longer change: nothing is written past a row's end.
  for b, row in enumerate(expected):
    assert not np.asarray(result.tokens)[b, len(row):].any()


def test_max_new_tokens_is_respected_per_row(setting):
  target_config, target_params, inputs, autoregressive = setting
  draft = fx.adapter_draft(target_config, target_params)
  result = _decode(target_config, target_params, draft, 5, inputs, max_new_tokens=7)
  assert _rows(result) == [row[:7] for row in _rows(autoregressive)]


@pytest.mark.parametrize('sampling', [GREEDY, SamplingConfig(temperature=1.0)])
def test_identical_draft_accepts_everything(sampling):
  config = presets.get('tiny_llama')
  params = jax.tree.map(lambda x: x * 1.5, init_params(config, jax.random.key(3)))
  gamma, steps = 4, 5
  tokens = np.array([[1, 5, 9, 0], [1, 7, 3, 8]], np.int32)
  lengths = np.array([3, 4], np.int32)
  result = _decode(config, params, (config, params), gamma, (tokens, lengths, None),
                   max_new_tokens=1 + steps * (gamma + 1), sampling=sampling)
  np.testing.assert_array_equal(result.num_target_calls, 1 + steps)
  tau = (np.asarray(result.num_generated) - 1) / (np.asarray(result.num_target_calls) - 1)
  np.testing.assert_array_equal(tau, gamma + 1)
  np.testing.assert_array_equal(result.accepted_by_position, steps)


def test_a_step_cut_short_by_the_budget_counts_what_the_row_keeps():
  """statistics.py's rule: the last step keeps 3 of its 5 tokens; it counts as one step, with 3
  tokens, drafts 0-2 accepted, and draft 3 (accepted by the target, not wanted) not reached."""
  config = presets.get('tiny_llama')
  params = jax.tree.map(lambda x: x * 1.5, init_params(config, jax.random.key(3)))
  gamma, steps = 4, 5
  tokens = np.array([[1, 5, 9, 0], [1, 7, 3, 8]], np.int32)
  lengths = np.array([3, 4], np.int32)
  max_new_tokens = 1 + steps * (gamma + 1) - 2
  result = _decode(config, params, (config, params), gamma, (tokens, lengths, None),
                   max_new_tokens=max_new_tokens)
  np.testing.assert_array_equal(result.num_generated, max_new_tokens)
  np.testing.assert_array_equal(result.num_target_calls, 1 + steps)
  np.testing.assert_array_equal(result.accepted_by_position, [[5, 5, 5, 4]] * 2)
  np.testing.assert_array_equal(result.reached_by_position, [[5, 5, 5, 4]] * 2)
  stats = statistics.summarize(*statistics.row_counts(result, 2), num_draft_tokens=gamma)
  assert stats.block_efficiency == pytest.approx((max_new_tokens - 1) / steps)  # 4.6
  np.testing.assert_allclose(stats.acceptance_rate_by_position, [1, 1, 1, 1])


def test_reached_counts_the_rejected_position_and_nothing_past_it(setting):
  """Per step, drafts 0..n-1 accepted and draft n (the first rejection) reached; with no cut
  the reached count equals the one derived from acceptance (steps, then accepted[i - 1])."""
  target_config, target_params, inputs, _ = setting
  result = _decode(target_config, target_params,
                   fx.language_draft(target_config, target_params), 3, inputs)
  accepted = np.asarray(result.accepted_by_position)
  reached = np.asarray(result.reached_by_position)
  steps = np.asarray(result.num_target_calls) - 1
  assert (reached[:, 0] == steps).all() and (accepted < reached).any()
  # 24 new tokens with no EOS: only a row's last step can be cut, by at most one position.
  derived = np.concatenate([steps[:, None], accepted[:, :-1]], axis=1)
  assert ((derived - reached >= 0) & (derived - reached <= 1)).all()


@pytest.fixture(scope='module')
def hf_llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('hf_llava'))
  model = hf_builders.tiny_llava(seed=5)
  hf_builders.save(model, path)
  return model, path


def test_matches_transformers_generate(hf_llava):
  hf_model, path = hf_llava
  config, params = load_model(path)
  rng = np.random.RandomState(4)
  prompt = hf_builders.llava_prompts(rng, config.num_image_tokens, lengths=(6,))[0]
  image = rng.randn(1, 3, 28, 28).astype(np.float32)
  new_tokens = 12
  with torch.no_grad():
    generated = hf_model.generate(
        input_ids=torch.tensor([prompt]), pixel_values=torch.tensor(image),
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
  expected = generated[0, len(prompt):].tolist()
  inputs = (np.array([prompt], np.int32), np.array([len(prompt)], np.int32),
            image.transpose(0, 2, 3, 1))
  autoregressive = _decode(config, params, inputs=inputs, max_new_tokens=new_tokens)
  assert _rows(autoregressive) == [expected]
  draft = fx.language_draft(config, params)
  speculative = _decode(config, params, draft, 3, inputs, max_new_tokens=new_tokens)
  assert _rows(speculative) == [expected]
