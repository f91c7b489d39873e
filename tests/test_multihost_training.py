"""train.py on 2 processes x 4 CPU devices (multiprocess.py), against 1 process x 8 devices.

The global batches do not depend on the number of processes (data/pipeline.py), so 2 processes
killed with -9 mid-run and restarted must end where 1 uninterrupted process ends; a SIGTERM on
one process stops both after the same step, which they save; the export is gathered. Each run
starts on an unprepared data_dir: process 0 prepares it while process 1 waits at a barrier."""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

import training_fixtures as fx
from multiprocess import Processes
from mmspec_jax.convert.loading import load_model
from mmspec_jax.testing import tiny_hf
from mmspec_jax.training.checkpointing import Checkpointer

STEPS = 24


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  tokenizer = str(root / 'tokenizer')
  tiny_hf.word_tokenizer().save_pretrained(tokenizer)
  return {'root': root, 'tokenizer': tokenizer, 'corpus': fx.write_corpus(str(root / 'corpus'))}


def train_command(world, name, *flags):
  """train.py on its own workdir and its own (unprepared) data_dir."""
  return fx.pretrain_command(world['root'] / name, world['tokenizer'], world['corpus'],
                             world['root'] / name / 'tfds', f'--config.num_train_steps={STEPS}',
                             '--config.checkpoint_every_steps=4', '--config.log_every_steps=1',
                             *flags)


def one_process(command, devices=8):
  """The command as one process on `devices` CPU devices (the 2 x 4 runs' mesh)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300,
                        env=env, cwd=fx.REPO).stdout


def final_state(workdir, step):
  """(train state as numpy arrays, data state) at `step`, saved on 8 devices, read on this
  process's one."""
  import orbax.checkpoint as ocp
  directory = workdir / 'checkpoints' / str(step)
  reader = ocp.StandardCheckpointer()
  metadata = reader.metadata(str(directory / 'state')).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = reader.restore(str(directory / 'state'), jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata))
  reader.close()
  data = json.loads((directory / 'data' / 'metadata').read_text())  # orbax's JsonSave file
  return jax.device_get(state), data


@pytest.fixture(scope='module')
def killed_and_resumed(world):
  """(1-process reference workdir, 2-process workdir killed at step 14 and resumed, the
  resumed run's output)."""
  one_process(train_command(world, 'reference'))
  command = train_command(world, 'two_processes')
  with Processes(command, num_processes=2) as job:
    job.wait_for_line('step 14/')
    job.signal(signal.SIGKILL)
    assert job.wait(expect_success=False) == [-signal.SIGKILL] * 2
  with Processes(command, num_processes=2) as job:
    job.wait()
    resumed = job.output(0)
  return world['root'] / 'reference', world['root'] / 'two_processes', resumed


def test_two_processes_killed_and_resumed_equal_one_uninterrupted(killed_and_resumed):
  reference, workdir, resumed = killed_and_resumed
  resumed_from = int(resumed.split('resumed from step ')[1].split()[0])
  assert 0 < resumed_from < STEPS
  expected, expected_data = final_state(reference, STEPS)
  actual, actual_data = final_state(workdir, STEPS)
  # Every row slot's data position: the same documents were read, none skipped or repeated.
  assert actual_data == expected_data and len(actual_data['cursors']) == 8
  # Not bit for bit: the 2 processes sum the 8 devices' gradients through gloo, in another
  # order than one process's all-reduce, so float32 rounding differs (about 3e-8 after 24 Adam
  # steps on ~1e-2 weights). A different batch or a skipped step moves them by ~1e-3.
  differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), actual, expected)
  worst = max(jax.tree.leaves(differences))
  print(f'largest parameter / optimizer-state difference: {worst:.2e}')
  assert worst < 1e-6, differences


def test_export_from_two_processes_equals_export_from_one(killed_and_resumed):
  reference, workdir, _ = killed_and_resumed
  expected_config, expected = load_model(str(reference / 'export'))
  config, actual = load_model(str(workdir / 'export'))
  assert config == expected_config
  # Gathered whole: exactly the parameters the 2 processes hold at the end ...
  final, _ = final_state(workdir, STEPS)
  jax.tree.map(np.testing.assert_array_equal, actual, final['params'])
  # ... and the 1-process export's, to the rounding of the cross-process sum (see above).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), actual, expected)
  assert os.path.isfile(workdir / 'export_hf' / 'config.json')


def test_sigterm_on_one_process_stops_both_at_the_same_step(world):
  command = train_command(world, 'preempted', '--config.num_train_steps=100000',
                          '--config.checkpoint_every_steps=100000', '--config.export=False')
  with Processes(command, num_processes=2) as job:
    job.wait_for_line('step 7/')
    job.signal(signal.SIGTERM, indices=[1])  # Only process 1 is told.
    assert job.wait() == [0, 0]
    output = job.output(0)
  stopped_at = int(output.split('SIGTERM at step ')[1].split(':')[0])
  assert stopped_at >= 7
  checkpointer = Checkpointer(str(world['root'] / 'preempted'), save_every=1, keep=10)
  # Saved by both at that step (a save is collective: had they stopped apart, it would hang).
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  # The restart continues from it, here on one process: the data position is every slot's.
  resumed = one_process(train_command(world, 'preempted', f'--config.num_train_steps='
                                      f'{stopped_at + 2}', '--config.export=False'))
  assert f'resumed from step {stopped_at}' in resumed
  assert f'step {stopped_at + 2}/{stopped_at + 2}' in resumed
