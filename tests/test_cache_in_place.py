"""The KV cache is updated in place inside the decode loop, for both layer layouts.

Read from the optimized HLO of the whole compiled decode program, at a shape where the caches
dominate (a 64-token prompt bucket, 1024 new tokens): inside any loop body (the decode
while_loop, the draft's scan, the layer scan, the attention's block loop) no instruction copies a
cache-sized buffer, and the program's temporaries beyond the caches stay below the caches' size.
A cache that is not written in place is copied by every call (a scanned layer stack taking it as
scan input and output, an unrolled one re-stacking each layer's slice): these tests catch that.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import Layout, abstract_params, build, presets

BATCH, PROMPT, NEW_TOKENS, GAMMA = 4, 64, 1024, 3
TARGET = dataclasses.replace(presets.get('tiny_llama'), num_layers=2)
DRAFT = dataclasses.replace(TARGET, num_layers=1)
CAPACITY = PROMPT + NEW_TOKENS + GAMMA + 1


def _cache_shape(config):
  return f'f32[{config.num_layers},{BATCH},{CAPACITY},{config.num_kv_heads},{config.head_dim}]'


def _copies_in_loops(hlo: str, shape: str) -> list[str]:
  """Copy instructions producing `shape` in any computation but the entry one."""
  found, computation = [], None
  for line in hlo.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      computation = line.split(' ')[0]
    elif computation != 'ENTRY' and re.search(
        r'= ' + re.escape(shape) + r'\{[^}]*\} copy\(', line):
      found.append(f'{computation}: {line.strip()[:160]}')
  return found


@pytest.fixture(scope='module', params=['scanned', 'unrolled'])
def compiled(request):
  layout = Layout(layers=request.param, fused_projections=True)
  decoder = SpeculativeDecoder(build(TARGET, layout), build(DRAFT, layout), GAMMA,
                               SamplingConfig(), NEW_TOKENS, (2,))
  params = [nn.unbox(abstract_params(config, layout)) for config in (TARGET, DRAFT)]
  return decoder.generate.lower(*params, jax.ShapeDtypeStruct((BATCH, PROMPT), jnp.int32),
                                jax.ShapeDtypeStruct((BATCH,), jnp.int32), None,
                                jax.random.key(0)).compile()


def test_no_cache_sized_copy_inside_any_loop(compiled):
  hlo = compiled.as_text()
  for config in (TARGET, DRAFT):
    shape = _cache_shape(config)
    assert shape in hlo, shape  # The check below looks at the right buffers.
    assert not _copies_in_loops(hlo, shape), '\n'.join(_copies_in_loops(hlo, shape))


def test_copy_detection_finds_a_copy_in_a_loop():
  """Control: a loop that reads a buffer it later overwrites gets a copy, and it is found."""
  shape = (2, BATCH, CAPACITY, 2, 16)

  def body(i, cache):
    snapshot = cache  # Read after the in-place write below: XLA must copy.
    cache = cache.at[0, :, i].set(1.0)
    return cache + snapshot[1:2].sum()
  hlo = jax.jit(lambda c: jax.lax.fori_loop(0, 3, body, c)).lower(
      jax.ShapeDtypeStruct(shape, jnp.float32)).compile().as_text()
  assert _copies_in_loops(hlo, 'f32[' + ','.join(map(str, shape)) + ']')


def test_temporaries_beyond_the_caches_stay_below_their_size(compiled):
  """The caches are created inside the program, so they are temporaries themselves; everything
  else the program holds at once (activations, attention blocks, any copy) must be smaller."""
  caches = 0
  for config in (TARGET, DRAFT):
    caches += 2 * config.num_layers * BATCH * CAPACITY * config.num_kv_heads * config.head_dim * 4
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  assert caches <= temporaries < 2 * caches, (temporaries, caches)
