"""The plan check runs end to end for a scaled-down config on 8 fake CPU devices."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.target=tiny_llava', '--config.draft=tiny_llama', '--config.prompt_length=64',
         '--config.max_new_tokens=64', '--config.train.batch_size=8', '--config.train.seq_len=64',
         '--config.dtype=float32', '--config.memory_per_device_gib=0.5']


def _plan(tmp_path, name, *flags):
  output = tmp_path / f'{name}.json'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
      [sys.executable, '-m', 'mmspec_jax.plan', '--config=' + os.path.join(REPO, 'configs',
                                                                          'plan.py'),
       f'--output={output}', *SMALL, *flags], capture_output=True, text=True, env=env,
      timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(output.read_text())


@pytest.fixture(scope='module')
def plans(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('plan')
  replicated = _plan(tmp_path, 'replicated', '--config.mesh.data=8', '--config.mesh.tensor=1')
  sharded = _plan(tmp_path, 'sharded', '--config.mesh.data=2', '--config.mesh.tensor=4')
  return replicated, sharded


def test_reports_decoding_and_training_memory(plans):
  stdout, reports = plans[1]
  assert '8 cpu devices' in stdout and 'GiB per device' in stdout
  decoding, training = reports
  assert decoding['program'].startswith('speculative decoding tiny_llava + tiny_llama')
  assert training['program'].startswith('train step tiny_llama')
  for report in reports:
    assert report['parameter_bytes'] > 0 and report['temp_size_in_bytes'] > 0
    assert report['fits']
  assert decoding['kv_cache_bytes'] > 0 and training['optimizer_bytes'] > 0


def test_tensor_parallelism_divides_parameter_bytes(plans):
  (_, replicated), (_, sharded) = plans
  assert sharded[0]['parameter_bytes'] < 0.5 * replicated[0]['parameter_bytes']
  assert sharded[1]['optimizer_bytes'] < 0.5 * replicated[1]['optimizer_bytes']
