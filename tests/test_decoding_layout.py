"""Decoding with the paper's vocabulary layout, and sampling that is a row's own.

The fixture (decoding_fixtures) is LLaVA-1.5 beside a 32000-id draft, shrunk: the draft has 256
ids, the prompts carry <image> 256 and <pad> 257, the target has 264. Without the vocabulary rule
in `Llama.embed` the draft would look up 256 and 257 as NaN rows, every draft token would be
rejected and tau would be exactly 1 on every row; these tests fail on such code.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding_fixtures as fx
from mmspec_jax.decoding.engine import SpeculativeDecoder, check_request
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import AdapterDraftConfig, KVCache, build
from mmspec_jax.models.config import with_dtype

GAMMA = 3
MAX_NEW_TOKENS = 32
NO_EOS = (-1,)
SAMPLED = SamplingConfig(temperature=1.0)


@pytest.fixture(scope='module')
def pair():
  target_config, target_params = fx.llava_target()
  rows, images = [], []
  for seed in range(3):
    seed_rows, seed_images = fx.ragged_rows(target_config, seed)
    rows += seed_rows
    images.append(seed_images)
  tokens, lengths = fx.pad_rows(rows)
  is_image = np.array([target_config.image_token_index in row for row in rows])
  return target_config, target_params, (tokens, lengths, np.concatenate(images)), is_image


def _tau(result):
  """float[B]: tokens per verification step, per row."""
  return (np.asarray(result.num_generated) - 1) / (np.asarray(result.num_target_calls) - 1)


@pytest.mark.parametrize('sampling', [SamplingConfig(), SAMPLED], ids=['greedy', 'sampled'])
@pytest.mark.parametrize('kind', ['language', 'adapter'])
def test_target_language_model_cut_to_the_base_vocabulary_is_accepted(pair, kind, sampling):
  """The draft is the target's own language model with the paper's 256 ids: on text rows it
  agrees with the target everywhere, so nearly every step accepts all GAMMA drafts."""
  target_config, target_params, inputs, is_image = pair
  make_draft = fx.language_draft if kind == 'language' else fx.adapter_draft
  draft_config, draft_params = make_draft(target_config, target_params, noise=0.0)
  draft_text = draft_config.text if kind == 'adapter' else draft_config
  assert draft_text.vocab_size == fx.BASE_VOCAB
  decoder = SpeculativeDecoder(build(target_config), build(draft_config), GAMMA, sampling,
                               MAX_NEW_TOKENS, NO_EOS)
  tau = _tau(decoder.generate(target_params, draft_params, *inputs, jax.random.key(0)))
  print(f'{kind} {sampling}: tau text rows {tau[~is_image].round(2)}, image rows '
        f'{tau[is_image].round(2)}')
  # 31 tokens after the prefill in 8 steps of at most GAMMA + 1 = 4: tau <= 3.875.
  assert tau[~is_image].min() >= GAMMA + 1 - 0.2
  if kind == 'adapter':  # The target's own projector too: image rows agree as well.
    assert tau[is_image].min() >= GAMMA + 1 - 0.2
  else:
    # Reading the text alone, the draft still predicts part of an image row. (The random
    # target's answer is dominated by its 16 image tokens, so this is far below text rows.)
    assert tau[is_image].mean() >= (1.1 if sampling.greedy else 1.3)


def test_out_of_vocabulary_ids_embed_as_zeros_and_do_not_reach_other_positions(pair):
  target_config, target_params, _, _ = pair
  draft_config, draft_params = fx.language_draft(target_config, target_params)
  draft = build(draft_config)
  ids = jnp.array([[1, 5, fx.BASE_VOCAB, fx.PAD_TOKEN, -1, 300]])
  embedded = draft.apply({'params': draft_params}, ids, method='embed')
  assert np.abs(np.asarray(embedded[0, 2:])).max() == 0
  assert np.abs(np.asarray(embedded[0, :2])).min(axis=-1).max() > 0

  def prefill(padding_id):
    tokens = jnp.array([[1, 7, 9, padding_id, padding_id], [1, 7, 9, 11, 13]])
    cache = KVCache.init(draft_config, 2, 12)
    logits, cache = draft.apply({'params': draft_params}, tokens, jnp.array([3, 5]), cache,
                                method='prefill')
    logits_next, _ = draft.apply({'params': draft_params}, jnp.array([[4], [4]]), cache,
                                 method='extend')
    return np.asarray(logits), np.asarray(logits_next)
  padded_with_pad, next_with_pad = prefill(fx.PAD_TOKEN)
  padded_with_text, next_with_text = prefill(3)
  assert np.isfinite(padded_with_pad).all() and np.isfinite(next_with_pad).all()
  # Padding never influences a real position, whatever its id.
  np.testing.assert_allclose(padded_with_pad, padded_with_text, atol=1e-6)
  np.testing.assert_allclose(next_with_pad, next_with_text, atol=1e-6)


@pytest.fixture(scope='module')
def alone_and_in_batches():
  """Row A (image) and row B (text) decoded alone, in a batch of 3, and in a batch of 5 with
  other neighbours and a longer padded length, each row with its own key in every batch."""
  target_config, target_params = fx.llava_target()
  rows, images = fx.ragged_rows(target_config, 0)
  other_rows, other_images = fx.ragged_rows(target_config, 1)
  prompts = {'A': rows[0], 'X': rows[1], 'B': rows[2], 'Y': other_rows[0], 'Z': other_rows[1],
             'W': other_rows[2]}
  pictures = {'A': images[0], 'X': images[1], 'B': images[2], 'Y': other_images[0],
              'Z': other_images[1], 'W': other_images[2]}
  keys = {name: jax.random.key(100 + i) for i, name in enumerate(prompts)}
  batches = {'alone': (['A'], 0), 'three': (['X', 'A', 'B'], 0),
             'five': (['B', 'Y', 'W', 'A', 'Z'], 7)}
  draft = fx.language_draft(target_config, target_params)
  outputs = {}
  for decoding in ('autoregressive', 'speculative'):
    draft_config, draft_params = draft if decoding == 'speculative' else (None, None)
    decoder = SpeculativeDecoder(build(target_config),
                                 draft_config and build(draft_config),
                                 GAMMA if draft_config else 0, SAMPLED, 16, NO_EOS)
    for batch_name, (names, extra_padding) in batches.items():
      longest = max(len(prompts[n]) for n in names)
      tokens, lengths = fx.pad_rows([prompts[n] for n in names], longest + extra_padding)
      result = decoder.generate(target_params, draft_params, tokens, lengths,
                                np.stack([pictures[n] for n in names]),
                                jnp.stack([keys[n] for n in names]))
      for row, name in enumerate(names):
        count = int(result.num_generated[row])
        outputs[decoding, batch_name, name] = np.asarray(result.tokens)[row, :count].tolist()
  return outputs


@pytest.mark.parametrize('decoding', ['autoregressive', 'speculative'])
def test_sampled_row_does_not_depend_on_its_batch(alone_and_in_batches, decoding):
  out = alone_and_in_batches
  assert out[decoding, 'alone', 'A'] == out[decoding, 'three', 'A'] == out[decoding, 'five', 'A']
  assert out[decoding, 'three', 'B'] == out[decoding, 'five', 'B']
  assert len(out[decoding, 'alone', 'A']) == 16


def test_the_batches_really_sampled(alone_and_in_batches):
  """A guard for the test above: different keys (or decoders) give different rows."""
  out = alone_and_in_batches
  assert out['autoregressive', 'five', 'Y'] != out['autoregressive', 'five', 'Z']
  assert out['autoregressive', 'three', 'A'] != out['speculative', 'three', 'A']


def test_bfloat16_greedy_speculative_agrees_with_autoregressive(pair, capsys):
  """Lossless is exact in float32. In bfloat16 the target's verification of G + 1 positions and
  its one-token steps round differently, so a near-tie may break the other way: report how often
  whole rows still agree (the README quotes this)."""
  target_config, target_params, inputs, _ = pair
  draft_config, draft_params = fx.language_draft(target_config, target_params)
  bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  target = build(with_dtype(target_config, 'bfloat16'))
  draft = build(with_dtype(draft_config, 'bfloat16'))
  run = lambda decoder, params: decoder.generate(bf16(target_params), params, *inputs,
                                                 jax.random.key(0))
  autoregressive = run(SpeculativeDecoder(target, None, 0, SamplingConfig(), 24, NO_EOS), None)
  speculative = run(SpeculativeDecoder(target, draft, GAMMA, SamplingConfig(), 24, NO_EOS),
                    bf16(draft_params))
  same = (np.asarray(autoregressive.tokens) == np.asarray(speculative.tokens)).all(axis=1)
  with capsys.disabled():
    print(f'\nbfloat16 greedy: {int(same.sum())}/{len(same)} speculative rows equal the '
          f'autoregressive rows ({int(speculative.num_accepted.sum())} drafts accepted)')
  assert int(speculative.num_accepted.sum()) > 0
  assert same.mean() >= 0.75


def test_request_check_counts_the_last_steps_overshoot_and_the_drafts_text():
  target_config = fx.TARGET
  draft_config = fx.base_text_config(target_config)
  limit = target_config.text.max_position_embeddings  # 512
  text_row = [1] * 400
  check_request(target_config, [text_row], 112)  # 400 + 112 = 512 positions, autoregressive.
  check_request(target_config, [text_row], 112, 1, (draft_config,))  # gamma 1: no overshoot.
  with pytest.raises(ValueError, match=r'row 0: .*\+ 2 draft positions .* 512 positions'):
    check_request(target_config, [text_row], 112, 3, (draft_config,))
  short_draft = dataclasses.replace(draft_config, max_position_embeddings=256)
  image_row = [1] + [target_config.image_token_index] * 300 + [5] * 100
  check_request(target_config, [image_row], 100, 3, (short_draft,))  # draft reads 101 tokens
  with pytest.raises(ValueError, match='row 1: the draft reads 401 prompt tokens'):
    check_request(target_config, [text_row[:100], [1] * 401], 100, 3, (short_draft,))
  only_image = [target_config.image_token_index] * 16
  with pytest.raises(ValueError, match='row 1: the prompt is only image placeholders'):
    check_request(target_config, [text_row[:5], only_image], 8, 3, (draft_config,))
  # The adapter draft reads the placeholders (as its own image features): nothing to refuse.
  adapter_config = AdapterDraftConfig(text=draft_config, vision_hidden_size=32,
                                      image_token_index=target_config.image_token_index)
  check_request(target_config, [only_image], 8, 3, (adapter_config,))
  assert limit == 512
