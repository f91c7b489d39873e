"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS set before jax is imported): train
steps on several meshes against one device. Prints one JSON line of results."""

import functools
import json
import os
import sys

os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                           + os.environ.get('MMSPEC_TEST_XLA_FLAGS', ''))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_training_step import lm_batch, optimizer_config  # noqa: E402
from mmspec_jax import sharding  # noqa: E402
from mmspec_jax.models import build, init_params, presets  # noqa: E402
from mmspec_jax.training.optimizer import make_optimizer  # noqa: E402
from mmspec_jax.training.step import (Objective, create_state, state_shardings,  # noqa: E402
                                      train_step)

MESHES = [dict(data=8), dict(data=4, tensor=2), dict(data=2, tensor=4),
          dict(data=2, fsdp=2, tensor=2)]


def run(mesh_shape, params, batches, config, optimizer):
  devices = jax.devices() if mesh_shape else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_shape or {'data': 1}, devices)
  shardings, _ = state_shardings(config, optimizer, mesh, sharding.DEFAULT_RULES)
  state = jax.device_put(create_state(params, optimizer), shardings)
  step = jax.jit(functools.partial(train_step, Objective(build(config)), optimizer, 2),
                 out_shardings=(shardings, None), donate_argnums=0)
  for batch in batches:
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      state, metrics = step(state, batch)
  return state, float(metrics['loss'])


def main():
  config = presets.get('tiny_llama')
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))  # Never donated.
  optimizer = make_optimizer(optimizer_config())
  rng = np.random.RandomState(0)
  batches = [lm_batch(rng, rows=16) for _ in range(3)]
  reference, reference_loss = run(None, params, batches, config, optimizer)
  results = {}
  for mesh_shape in MESHES:
    state, loss = run(mesh_shape, params, batches, config, optimizer)
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         state.params, reference.params)
    mlp = state.params['layers']['mlp']['up_proj']['kernel']
    embed = state.params['embed_tokens']['embedding']
    mu = state.opt_state[1][0].mu['layers']['mlp']['up_proj']['kernel']
    results['x'.join(f'{k}{v}' for k, v in mesh_shape.items())] = {
        'max_param_diff': max(jax.tree.leaves(diffs)), 'loss_diff': abs(loss - reference_loss),
        'mlp_spec': str(mlp.sharding.spec), 'embed_spec': str(embed.sharding.spec),
        'moment_spec': str(mu.sharding.spec),
        'mlp_shard_shape': list(mlp.addressable_shards[0].data.shape),
        'mlp_shape': list(mlp.shape)}
  print(json.dumps(results))


if __name__ == '__main__':
  main()
