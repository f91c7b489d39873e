"""Full-size presets by shape only (jax.eval_shape allocates nothing), and logical axis names."""

import flax.linen as nn
import jax
import pytest

from mmspec_jax.models import KVCache, abstract_params, parameter_count, presets

# transformers' count for llava-hf/llava-1.5-7b-hf, every tensor included (the CLIP layer after
# vision_feature_layer and post_layernorm are held though never applied).
LLAVA_7B_PARAMETERS = 7_063_427_072


@pytest.mark.parametrize('name, expected', [
    ('llava_1_5_7b', LLAVA_7B_PARAMETERS),
    ('draft_115m', 116_925_440),  # About 117M, as the paper's 115M drafter.
])
def test_parameter_counts(name, expected):
  assert parameter_count(abstract_params(presets.get(name))) == expected


def test_13b_is_larger():
  count = parameter_count(abstract_params(presets.get('llava_1_5_13b')))
  assert 13.3e9 < count < 13.4e9


@pytest.mark.parametrize('name', ['llava_1_5_7b', 'draft_115m'])
def test_every_parameter_has_logical_axis_names(name):
  boxed = abstract_params(presets.get(name))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  # The scanned stacks carry the layer axis name.
  specs = nn.get_partition_spec(boxed)
  text_specs = specs['language_model'] if 'language_model' in specs else specs
  assert tuple(text_specs['layers']['self_attn']['q_proj']['kernel']) == (
      'layers', 'embed', 'heads', 'head_dim')


def test_cache_is_sized_and_named_without_allocating():
  config = presets.get('llava_1_5_7b').text
  cache = jax.eval_shape(lambda: KVCache.init(config, batch_size=8, max_length=2048))
  assert cache.keys.shape == (32, 8, 2048, 32, 128)
  axes = KVCache.logical_axes()
  assert len(axes.keys) == cache.keys.ndim and len(axes.lengths) == cache.lengths.ndim


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown model preset 'llava_2'"):
    presets.get('llava_2')


def test_single_linear_projector_variant():
  import dataclasses
  import numpy as np
  from mmspec_jax.models import build, init_params
  config = dataclasses.replace(presets.get('tiny_llava'), projector_type='linear')
  params = init_params(config, jax.random.key(0))
  assert set(params['multi_modal_projector']) == {'linear_1'}
  size = config.vision.image_size
  tokens = np.array([[1] + [config.image_token_index] * config.num_image_tokens + [5]])
  logits = build(config).apply({'params': params}, tokens, np.ones((1, size, size, 3)))
  assert logits.shape == (1, tokens.shape[1], config.text.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
