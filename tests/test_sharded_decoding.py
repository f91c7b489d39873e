"""Decoding on 8 fake CPU devices over (data, tensor) meshes equals one device, token for token
and statistic for statistic; a checkpoint saved on one mesh restores onto another. (A subprocess:
the device count is fixed when jax is imported.)"""

import pytest

from multidevice import run_check


@pytest.fixture(scope='module')
def results():
  return run_check('sharded_decode_check.py')


@pytest.mark.parametrize('mesh', ['8x1', '4x2', '2x4', '1x8'])
def test_greedy_outputs_and_statistics_equal_one_device(results, mesh):
  assert results['accepted'] > 0  # Speculation really happened.
  assert results[mesh]['tokens_equal'] and results[mesh]['stats_equal']


def test_heads_are_sharded_over_tensor(results):
  assert results['4x2']['q_proj_spec'] == "P(None, 'fsdp', 'tensor', None)"


def test_checkpoint_restores_onto_another_mesh(results):
  assert results['restore_equal'] and results['restore_on_target_shardings']


def test_tree_decoding_on_a_mesh_equals_the_chain_on_one_device(results):
  assert results['tree_4x2']['tokens_equal']
  assert results['tree_4x2']['accepted'] > results['accepted']  # The tree accepted more.


def test_feature_draft_on_a_mesh_equals_the_chain_on_one_device(results):
  assert results['feature_4x2']['tokens_equal'] and results['feature_4x2']['accepted'] > 0
  assert results['dynamic_4x2']['tokens_equal'] and results['dynamic_4x2']['accepted'] > 0


def test_continuous_batching_on_a_mesh_equals_each_request_alone_on_one_device(results):
  assert results['continuous_4x2'] == {'tokens_equal': True, 'lengths': True}
