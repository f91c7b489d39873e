"""The feature draft (models/feature_draft.py) and the target's layer outputs it reads.

The target's features are its layers' outputs: against transformers' `output_hidden_states`
(torch, float32) to 1e-4, image positions included, and the same from a cached prefill and extend
as from the full forward, in every layout. The draft's cached prefill and extend give its full
forward's logits and hidden states; its config and params round-trip through a converted
directory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmspec_jax.convert.loading import load_model, save_converted
from mmspec_jax.models import (FeatureDraftConfig, KVCache, Layout, LlamaConfig, arrange_params,
                               build, default_feature_layers, init_params, text_config)
from mmspec_jax.models.config import from_dict, to_dict
from mmspec_jax.models.llava import Llava
from mmspec_jax.testing import tiny_hf as hf_builders

TOLERANCE = 1e-4
NUM_LAYERS = 4
FEATURE_LAYERS = (0, 2, 3)  # Low, middle, and the last (HF's last hidden state is normed).
LAYOUTS = {
    'canonical': Layout(),
    'unrolled_fused': Layout(layers='unrolled', fused_projections=True),
    'output_major': Layout(layers='unrolled', fused_projections=True, output_major_kernels=True),
}


@pytest.fixture(scope='module')
def target(tmp_path_factory):
  """A 4-layer tiny LLaVA, its converted (config, params), prompts with images, and
  transformers' hidden states for each row alone."""
  directory = str(tmp_path_factory.mktemp('feature_target'))
  hf_model = hf_builders.tiny_llava(num_layers=NUM_LAYERS)
  hf_builders.save(hf_model, directory)
  config, params = load_model(directory)
  rng = np.random.RandomState(0)
  rows = hf_builders.llava_prompts(rng, config.num_image_tokens)
  images = rng.randn(len(rows), 3, 28, 28).astype(np.float32)  # NCHW, as transformers takes
  references = []
  with torch.no_grad():
    for row, image in zip(rows, images):
      out = hf_model(input_ids=torch.tensor([row]), pixel_values=torch.tensor(image[None]),
                     output_hidden_states=True)
      references.append([h[0].numpy() for h in out.hidden_states])
  lengths = np.array([len(r) for r in rows], np.int32)
  tokens = np.full((len(rows), lengths.max()), hf_builders.PAD_TOKEN, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return config, params, tokens, lengths, images.transpose(0, 2, 3, 1), references


def test_default_feature_layers_are_eagle3s():
  assert default_feature_layers(32) == (1, 15, 28)  # Vicuna-7B's 32 layers.
  assert default_feature_layers(40) == (1, 19, 36)
  assert default_feature_layers(4) == (0, 1, 3)  # Too shallow for EAGLE-3's: spread evenly.


def test_target_features_match_transformers_hidden_states(target):
  config, params, tokens, lengths, images, references = target
  model = build(config)
  _, features = model.apply({'params': params}, tokens, FEATURE_LAYERS, images,
                            method=Llava.forward_with_features)
  features = np.asarray(features)  # [B, T, K, D]
  norm = lambda x: np.asarray(model.apply({'params': params}, jnp.asarray(x), method=lambda m, h:
                                          m.language_model.norm(h)))
  worst = 0.0
  for row, (n, hidden_states) in enumerate(zip(lengths, references)):
    for k, layer in enumerate(FEATURE_LAYERS):
      ours = features[row, :n, k]
      if layer == NUM_LAYERS - 1:  # transformers' last entry is after the final norm.
        ours = norm(ours)
      worst = max(worst, np.abs(ours - hidden_states[layer + 1]).max())
  assert worst < TOLERANCE, worst


@pytest.mark.parametrize('layout_name', list(LAYOUTS))
def test_cached_prefill_and_extend_give_the_full_forwards_features(target, layout_name):
  """Prefill all but the last 3 positions, extend by those 3: the features and logits at every
  position equal the full forward's (layer outputs collected inside the scanned layout too)."""
  config, params, tokens, lengths, images, _ = target
  layout = LAYOUTS[layout_name]
  full_logits, full = build(config).apply({'params': params}, tokens, FEATURE_LAYERS, images,
                                          method=Llava.forward_with_features)
  model, arranged = build(config, layout), arrange_params(config, params, layout)
  cache = KVCache.init(text_config(config), tokens.shape[0], 64, layout=layout)
  prefix = lengths - 3
  _, cache, prefilled = model.apply({'params': arranged}, tokens, prefix, cache, FEATURE_LAYERS,
                                    images, method=Llava.prefill_with_features)
  rest = np.stack([tokens[i, n:n + 3] for i, n in enumerate(prefix)])
  logits, cache, extended = model.apply({'params': arranged}, rest, cache, FEATURE_LAYERS,
                                        method=Llava.extend_with_features)
  assert (np.asarray(cache.lengths) == lengths).all()
  for row, n in enumerate(prefix):
    np.testing.assert_allclose(prefilled[row, :n], full[row, :n], atol=TOLERANCE)
    np.testing.assert_allclose(extended[row], full[row, n:n + 3], atol=TOLERANCE)
    np.testing.assert_allclose(logits[row], full_logits[row, n:n + 3], atol=TOLERANCE)


def test_bad_feature_layers_are_refused_by_name(target):
  config, params, tokens, _, images, _ = target
  with pytest.raises(ValueError, match=r'feature_layers \[4\] are not layers of a 4-layer'):
    build(config).apply({'params': params}, tokens, (0, 4), images,
                        method=Llava.forward_with_features)


@pytest.fixture(scope='module')
def draft(target):
  config = target[0]
  draft_config = FeatureDraftConfig(
      text=LlamaConfig(vocab_size=hf_builders.BASE_VOCAB, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position_embeddings=256),
      target_hidden_size=config.text.hidden_size, feature_layers=FEATURE_LAYERS)
  return draft_config, init_params(draft_config, jax.random.key(1))


@pytest.mark.parametrize('layout_name', ['canonical', 'output_major'])
def test_draft_cached_calls_equal_its_full_forward(target, draft, layout_name):
  """Teacher-forced on the target's features: a prefill of all but the last 2 positions and an
  extend by those 2 give the full forward's logits and hidden states there."""
  config, params, tokens, lengths, images, _ = target
  draft_config, draft_params = draft
  _, features = build(config).apply({'params': params}, tokens, FEATURE_LAYERS, images,
                                    method=Llava.forward_with_features)
  next_tokens, features = tokens[:, 1:], features[:, :-1]  # Position i reads token i + 1.
  full_logits, full_hidden = build(draft_config).apply({'params': draft_params}, next_tokens,
                                                       features)
  layout = LAYOUTS[layout_name]
  model, arranged = build(draft_config, layout), arrange_params(draft_config, draft_params, layout)
  variables = {'params': arranged}
  fused = model.apply(variables, features, method='fuse')
  cache = KVCache.init(text_config(draft_config), tokens.shape[0], 64, layout=layout)
  prefix = lengths - 1 - 2
  last_logits, last_hidden, cache = model.apply(variables, next_tokens, fused, prefix, cache,
                                                method='prefill')
  rest = lambda x: np.stack([x[i, n:n + 2] for i, n in enumerate(prefix)])
  logits, hidden, cache = model.apply(variables, rest(next_tokens), rest(fused), cache,
                                      method='extend')
  rows = np.arange(len(prefix))
  np.testing.assert_allclose(last_logits, full_logits[rows, prefix - 1], atol=TOLERANCE)
  np.testing.assert_allclose(last_hidden, full_hidden[rows, prefix - 1], atol=TOLERANCE)
  np.testing.assert_allclose(logits, rest(np.asarray(full_logits)), atol=TOLERANCE)
  np.testing.assert_allclose(hidden, rest(np.asarray(full_hidden)), atol=TOLERANCE)
  # Its own hidden state in place of the fused features (drafting) is a valid input too.
  own_logits, _ = build(draft_config).apply({'params': draft_params}, next_tokens,
                                            fused=full_hidden)
  assert np.isfinite(np.asarray(own_logits)).all()


def test_draft_refuses_features_of_the_wrong_shape(draft):
  draft_config, draft_params = draft
  with pytest.raises(ValueError, match=r'expected \[\.\.\., 3, 48\]'):
    build(draft_config).apply({'params': draft_params}, jnp.zeros((1, 2), jnp.int32),
                              jnp.zeros((1, 2, 2, 48)))
  with pytest.raises(ValueError, match='one of them'):
    build(draft_config).apply({'params': draft_params}, jnp.zeros((1, 2), jnp.int32))


def test_draft_round_trips_through_a_converted_directory(draft, tmp_path):
  draft_config, draft_params = draft
  assert from_dict(to_dict(draft_config)) == draft_config
  save_converted(str(tmp_path / 'feature_draft'), draft_config, draft_params)
  config, params = load_model(str(tmp_path / 'feature_draft'))
  assert config == draft_config
  jax.tree.map(np.testing.assert_array_equal, params, draft_params)


def test_unroll_is_the_draft_drafting_past_the_target_features(target, draft):
  """Stream s of `unroll` at position j equals the cached path: the target's features fed up to
  position j - s, then s positions drafted on the draft's own hidden states."""
  config, params, tokens, lengths, images, _ = target
  draft_config, draft_params = draft
  _, features = build(config).apply({'params': params}, tokens, FEATURE_LAYERS, images,
                                    method=Llava.forward_with_features)
  next_tokens, features = tokens[:, 1:], features[:, :-1]
  model, variables = build(draft_config), {'params': draft_params}
  streams = model.apply(variables, next_tokens, features, 2, method='unroll')
  np.testing.assert_allclose(streams[0], model.apply(variables, next_tokens, features)[0],
                             atol=TOLERANCE)
  fused = model.apply(variables, features, method='fuse')
  for row in range(tokens.shape[0]):
    for anchor in (3, int(lengths[row]) - 5):  # The last verified position.
      cache = KVCache.init(text_config(draft_config), 1, 64)
      logits, hidden, cache = model.apply(variables, next_tokens[row:row + 1, :anchor + 1],
                                          fused[row:row + 1, :anchor + 1],
                                          np.array([anchor + 1]), cache, method='prefill')
      for step in (1, 2):
        position = anchor + step
        logits, hidden, cache = model.apply(
            variables, next_tokens[row:row + 1, position:position + 1], hidden[:, None], cache,
            method='extend')
        hidden = hidden[:, 0]
        np.testing.assert_allclose(logits[0, 0], streams[step][row, position], atol=TOLERANCE)
