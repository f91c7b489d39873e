"""Run in a subprocess with 8 fake CPU devices: the 'pallas' attention under meshes that split
rows and kv heads, against one device. Prints one JSON line of results."""

import json
import os

os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                           + os.environ.get('MMSPEC_TEST_XLA_FLAGS', ''))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmspec_jax import sharding  # noqa: E402
from mmspec_jax.decoding import placement  # noqa: E402
from mmspec_jax.models import Layout  # noqa: E402
from mmspec_jax.models.attention import cached_attention  # noqa: E402
from mmspec_jax.models.kv_cache import LayerCache  # noqa: E402

LAYOUT = Layout(attention='pallas', attention_block_size=32)
MESHES = [(8, 1, 1), (2, 1, 4)]


def main():
  rng = np.random.default_rng(0)
  layers, rows, heads, kv_heads, head_dim, capacity, num_tokens = 2, 8, 8, 4, 16, 64, 3
  as_bf16 = lambda shape: np.asarray(
      jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32))
  cache_shape = (kv_heads, layers, rows, capacity, head_dim)
  stored = as_bf16(cache_shape), as_bf16(cache_shape)
  query = as_bf16((rows, num_tokens, heads, head_dim))
  keys, values = as_bf16((rows, num_tokens, kv_heads, head_dim)), as_bf16(
      (rows, num_tokens, kv_heads, head_dim))
  lengths = rng.integers(1, capacity - num_tokens, rows).astype(np.int32)

  def attend(query, keys, values, cache_keys, cache_values, lengths):
    view = LayerCache(keys=cache_keys, values=cache_values, lengths=lengths, layer=1,
                      heads_first=True)
    out, written = cached_attention(query, keys, values, view, LAYOUT)
    return out, written.keys

  args = (query, keys, values, *stored, lengths)
  expected = [np.asarray(a) for a in jax.jit(attend)(*args)]
  differences = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    with placement.mesh_context(mesh):
      got = jax.jit(attend)(*args)
    name = 'x'.join(map(str, shape))
    differences[name] = max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected))
  print(json.dumps({'meshes': list(differences), 'max_abs_difference': differences}))


if __name__ == '__main__':
  main()
