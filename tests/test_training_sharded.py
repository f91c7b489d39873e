"""The train step on an 8-device CPU mesh equals the one-device step, with parameters and
optimizer moments really sharded (run in a subprocess: the device count is fixed at jax import)."""

import pytest

from multidevice import run_check


@pytest.fixture(scope='module')
def results():
  return run_check('sharded_train_check.py')


@pytest.mark.parametrize('mesh', ['data8', 'data4xtensor2', 'data2xtensor4',
                                  'data2xfsdp2xtensor2'])
def test_sharded_step_equals_one_device(results, mesh):
  result = results[mesh]
  assert result['max_param_diff'] < 1e-5 and result['loss_diff'] < 1e-5
  tensor = int(mesh.split('tensor')[1]) if 'tensor' in mesh else 1
  fsdp = int(mesh.split('fsdp')[1][0]) if 'fsdp' in mesh else 1
  _, embed, mlp = result['mlp_shape']
  # The MLP kernel [layers, embed, mlp] is split over fsdp x tensor, moments alike.
  assert result['mlp_shard_shape'] == [result['mlp_shape'][0], embed // fsdp, mlp // tensor]
  assert result['moment_spec'] == result['mlp_spec']
