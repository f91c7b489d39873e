"""Decoding layouts: chosen by config with named errors, arranged from canonical params once."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from mmspec_jax.decoding import placement
from mmspec_jax.models import (Layout, abstract_params, arrange_params, build, init_params,
                               presets)
from mmspec_jax.models import layout as layout_lib


@pytest.mark.parametrize('fields, message', [
    (dict(layers='stacked'), 'layout.layers'), (dict(attention='flash'), 'layout.attention'),
    (dict(attention_block_size=0), 'attention_block_size')])
def test_bad_layouts_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    Layout(**fields)


def test_defaults_per_backend_and_role():
  tpu = layout_lib.decoding_default('tpu', verifies=True)
  assert tpu.scanned and tpu.fused_projections and not tpu.output_major_kernels
  assert layout_lib.decoding_default('gpu').layers == 'unrolled'
  assert not layout_lib.decoding_default('gpu').output_major_kernels
  # On CPU one-row matmuls stream output-major kernels faster, several-row ones slower.
  assert layout_lib.decoding_default('cpu').output_major_kernels
  assert not layout_lib.decoding_default('cpu', verifies=True).output_major_kernels


def test_config_section_fills_only_what_it_leaves_empty():
  section = ml_collections.ConfigDict(dict(
      layers='', fused_projections=False, output_major_kernels='', attention='xla',
      attention_block_size=64))
  chosen = placement.decoding_layout(section, 'cpu', verifies=False)
  assert chosen == Layout(layers='unrolled', fused_projections=False, output_major_kernels=True,
                          attention='xla', attention_block_size=64)
  # As the command line sets it (--config.layout.output_major_kernels=False): a string.
  section.layers, section.output_major_kernels = 'scanned', 'False'
  assert placement.decoding_layout(section, 'cpu').scanned
  assert not placement.decoding_layout(section, 'cpu').output_major_kernels
  section.output_major_kernels = 'yes'
  with pytest.raises(ValueError, match='output_major_kernels'):
    placement.decoding_layout(section, 'cpu')


def test_arranged_params_have_the_layouts_own_tree_and_compute_the_same():
  config = presets.get('tiny_llama')
  params = init_params(config, jax.random.key(0))
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  reference = np.asarray(build(config).apply({'params': params}, tokens))
  layout = Layout(layers='unrolled', fused_projections=True, output_major_kernels=True)
  arranged = arrange_params(config, params, layout)
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(arranged) == shapes(nn.unbox(abstract_params(config, layout)))
  assert 'layers_1' in arranged and 'qkv_proj' in arranged['layers_1']['self_attn']
  logits = np.asarray(build(config, layout).apply({'params': arranged}, tokens))
  np.testing.assert_allclose(logits, reference, atol=1e-5)
  with pytest.raises(ValueError, match='canonical params'):
    arrange_params(config, arranged, Layout(fused_projections=True))
