"""Where decoding's inputs live on a device mesh: parameters by their logical axis names, prompts
and images batch-major over data x fsdp. The KV caches are created inside the jitted program and
sharded there by the models' constraints (cache_batch over data, cache_kv_heads over tensor), so
running under `mesh_context` is what places them."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np

from mmspec_jax import axes, sharding
from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import abstract_params, arrange_params
from mmspec_jax.models import layout as layout_lib
from mmspec_jax.models.layout import CANONICAL, Layout


def param_shardings(config, mesh, rules=sharding.DEFAULT_RULES, layout: Layout = CANONICAL):
  """Shardings of a model's params in `layout`, from their logical axis names."""
  return None if config is None else sharding.param_shardings(abstract_params(config, layout),
                                                              mesh, rules)


def decoding_layout(layout_config=None, backend: str | None = None, *,
                    verifies: bool = False, dtype: str = 'float32') -> Layout:
  """A model's decoding layout from a config's `layout` section (decode.py). Its empty `layers`,
  its `output_major_kernels` of '' and a missing section mean the backend's default for a model
  computing in `dtype` that does or does not verify drafts (models.layout.decoding_default), as
  do `min_matmul_rows` 0 and `cache_dtype` ''."""
  default = layout_lib.decoding_default(backend, verifies=verifies, dtype=dtype)
  if layout_config is None:
    return default
  fields = dict(layout_config)
  if not fields.get('layers'):
    fields['layers'] = default.layers
  # A string field in the config ('' = default), so the command line gives 'True' / 'False'.
  choice = str(fields.get('output_major_kernels', '')).strip().lower()
  if choice not in ('', 'true', 'false'):
    raise ValueError(f'layout.output_major_kernels must be True, False or empty (the default), '
                     f'got {fields["output_major_kernels"]!r}')
  fields['output_major_kernels'] = (default.output_major_kernels if choice == ''
                                    else choice == 'true')
  for name in ('min_matmul_rows', 'cache_dtype'):  # 0 or '': the default.
    if not fields.get(name):
      fields[name] = getattr(default, name)
  return Layout(**fields)


def decoding_params(config, params, layout: Layout, mesh=None, rules=sharding.DEFAULT_RULES):
  """Canonical params arranged as the decoder's `layout` says (models.arrange_params), placed
  on their shards in that layout when a mesh is given. The decoder's modules must be built with
  the same layout (`models.build(config, layout)`)."""
  if config is None:
    return None
  shardings = None if mesh is None else param_shardings(config, mesh, rules, layout)
  return arrange_params(config, params, layout, shardings)


def load_for_decoding(path: str, config, dtype: str, mesh, rules=sharding.DEFAULT_RULES, *,
                      layout: Layout):
  """A model's params loaded straight onto their shards, arranged in the decoder's layout."""
  _, params = load_model(path, dtype=dtype, shardings=param_shardings(config, mesh, rules))
  return decoding_params(config, params, layout, mesh, rules)


@functools.lru_cache(maxsize=256)
def _batch_sharding(shape, mesh, rules):
  return sharding.logical_sharding((axes.BATCH,) + (None,) * (len(shape) - 1), shape, mesh, rules)


def batch_sharding(shape, mesh, rules=sharding.DEFAULT_RULES):
  """Batch-major; replicated when the batch axes do not divide the rows."""
  try:
    return _batch_sharding(tuple(shape), mesh, rules)
  except TypeError:  # Unhashable rules (lists): computed each time.
    return _batch_sharding.__wrapped__(tuple(shape), mesh, rules)


def rows_struct(shape, dtype, mesh, rules=sharding.DEFAULT_RULES):
  """An abstract batch-major array, placed as place_rows places one."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, mesh, rules))


def input_structs(batch_size: int, length: int, image_shape, mesh, rules=sharding.DEFAULT_RULES):
  """Abstract (tokens, lengths, images | None) for ahead-of-time compilation."""
  struct = lambda shape, dtype: rows_struct(shape, dtype, mesh, rules)
  images = None if image_shape is None else struct((batch_size,) + tuple(image_shape), np.float32)
  return (struct((batch_size, length), np.int32), struct((batch_size,), np.int32), images)


def keys_struct(batch_size: int, mesh, rules=sharding.DEFAULT_RULES):
  """Abstract key[B]: one PRNG key per row (see SpeculativeDecoder.generate)."""
  dtype = jax.random.key(0).dtype
  return jax.ShapeDtypeStruct((batch_size,), dtype,
                              sharding=batch_sharding((batch_size,), mesh, rules))


def _place(value, mesh, rules):
  """A host array that every process holds whole -> a global array split over the batch axes
  (each process puts only the rows of its own devices)."""
  if value is None:
    return None
  if jax.process_count() == 1:  # Every device is this process's: one plain transfer.
    return jax.device_put(value, batch_sharding(tuple(np.shape(value)), mesh, rules))
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # Typed keys: place their data.
    placed = _place(jax.random.key_data(value), mesh, rules)
    return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(value))
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, batch_sharding(value.shape, mesh, rules),
                                      lambda index: value[index])


def place_rows(value, mesh, rules=sharding.DEFAULT_RULES):
  """A host array of rows (slot indices, budgets) placed batch-major."""
  return _place(value, mesh, rules)


def place_keys(keys, mesh, rules=sharding.DEFAULT_RULES):
  return _place(keys, mesh, rules)


def place_inputs(tokens, lengths, images, mesh, rules=sharding.DEFAULT_RULES):
  return tuple(_place(x, mesh, rules) for x in (tokens, lengths, images))


@contextlib.contextmanager
def mesh_context(mesh, rules=sharding.DEFAULT_RULES):
  """Trace and run under this: the models' sharding constraints then apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
