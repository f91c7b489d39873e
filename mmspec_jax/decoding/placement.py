"""Where decoding's inputs live on a device mesh: parameters by their logical axis names, prompts
and images batch-major over data x fsdp. The KV caches are created inside the jitted program and
sharded there by the models' constraints (cache_batch over data, cache_kv_heads over tensor), so
running under `mesh_context` is what places them."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np

from mmspec_jax import axes, sharding
from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import abstract_params, unstack_layers


def param_shardings(config, mesh, rules=sharding.DEFAULT_RULES):
  return None if config is None else sharding.param_shardings(abstract_params(config), mesh,
                                                              rules)


def decoding_params(config, params):
  """Params as the decoder wants them: off TPU the language model's layers unstacked, one array
  per layer (models.unstack_layers: XLA:CPU would copy each layer's slice of the stacked weights
  every step); on TPU the scanned layout, which its matmuls read in place."""
  if config is None or jax.default_backend() == 'tpu':
    return params
  return unstack_layers(config, params)


def load_for_decoding(path: str, config, dtype: str, mesh, rules=sharding.DEFAULT_RULES):
  """A model's params loaded straight onto their shards, in the decoder's layout."""
  _, params = load_model(path, dtype=dtype, shardings=param_shardings(config, mesh, rules))
  return decoding_params(config, params)


def batch_sharding(shape, mesh, rules=sharding.DEFAULT_RULES):
  """Batch-major; replicated when the batch axes do not divide the rows."""
  return sharding.logical_sharding((axes.BATCH,) + (None,) * (len(shape) - 1), shape, mesh, rules)


def input_structs(batch_size: int, length: int, image_shape, mesh, rules=sharding.DEFAULT_RULES):
  """Abstract (tokens, lengths, images | None) for ahead-of-time compilation."""
  def struct(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, mesh, rules))
  images = None if image_shape is None else struct((batch_size,) + tuple(image_shape), np.float32)
  return (struct((batch_size, length), np.int32), struct((batch_size,), np.int32), images)


def keys_struct(batch_size: int, mesh, rules=sharding.DEFAULT_RULES):
  """Abstract key[B]: one PRNG key per row (see SpeculativeDecoder.generate)."""
  dtype = jax.random.key(0).dtype
  return jax.ShapeDtypeStruct((batch_size,), dtype,
                              sharding=batch_sharding((batch_size,), mesh, rules))


def place_keys(keys, mesh, rules=sharding.DEFAULT_RULES):
  return jax.device_put(keys, batch_sharding(keys.shape, mesh, rules))


def place_inputs(tokens, lengths, images, mesh, rules=sharding.DEFAULT_RULES):
  put = lambda x: None if x is None else jax.device_put(x, batch_sharding(x.shape, mesh, rules))
  return put(tokens), put(lengths), put(images)


@contextlib.contextmanager
def mesh_context(mesh, rules=sharding.DEFAULT_RULES):
  """Trace and run under this: the models' sharding constraints then apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
