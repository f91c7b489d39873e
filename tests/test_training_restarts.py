"""train.py killed, preempted and restarted, on 1 process x 8 CPU devices and on 2 processes x 4
(multiprocess.py), against 1 uninterrupted process x 8 devices.

1 process killed with -9 and restarted ends bit for bit where the uninterrupted run ends. The
global batches do not depend on the number of processes (data/pipeline.py), so 2 processes
killed and restarted end there too, up to the rounding of the cross-process gradient sum. A
SIGTERM on one process stops both after the same step, which they save; a restart on 1 process
continues from it, and stops and saves on its own SIGTERM. The export is gathered. Each run
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


ONE_PROCESS_ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu',
                   'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                   + os.environ.get('MMSPEC_TEST_XLA_FLAGS', '')}  # 2 x 4's mesh


def one_process(command):
  return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300,
                        env=ONE_PROCESS_ENV, cwd=fx.REPO).stdout


def one_process_signalled(command, line, sig):
  """Runs the command as one process, sends `sig` once it printed a line starting with `line`;
  returns (exit code, output)."""
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=ONE_PROCESS_ENV, cwd=fx.REPO)
  output = []
  for printed in process.stdout:
    output.append(printed)
    if printed.startswith(line):
      process.send_signal(sig)
      break
  output.append(process.communicate(timeout=120)[0])
  return process.returncode, ''.join(output)


def stopped_at(output):
  return int(output.split('SIGTERM at step ')[1].split(':')[0])


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
def reference(world):
  """The uninterrupted 1-process run's workdir."""
  one_process(train_command(world, 'reference'))
  return world['root'] / 'reference'


def resumed_from(output):
  step = int(output.split('resumed from step ')[1].split()[0])
  assert 0 < step < STEPS
  return step


def test_one_process_killed_and_resumed_equals_uninterrupted_bit_for_bit(world, reference):
  command = train_command(world, 'one_process', '--config.export=False')
  code, _ = one_process_signalled(command, 'step 14/', signal.SIGKILL)  # Mid-run, 3 saved.
  assert code == -signal.SIGKILL
  resumed_from(one_process(command))
  expected, expected_data = final_state(reference, STEPS)
  actual, actual_data = final_state(world['root'] / 'one_process', STEPS)
  assert actual_data == expected_data  # Same position in the data: nothing skipped or repeated.
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.fixture(scope='module')
def killed_and_resumed(world, reference):
  """(1-process reference workdir, 2-process workdir killed at step 14 and resumed, the
  resumed run's output). The 2 processes read through a grain worker process each (the
  reference through none): the batches must not depend on it."""
  command = train_command(world, 'two_processes', '--config.data.workers=1')
  with Processes(command, num_processes=2) as job:
    job.wait_for_line('step 14/')
    job.signal(signal.SIGKILL)
    assert job.wait(expect_success=False) == [-signal.SIGKILL] * 2
  with Processes(command, num_processes=2) as job:
    job.wait()
    resumed = job.output(0)
  return reference, world['root'] / 'two_processes', resumed


def test_two_processes_killed_and_resumed_equal_one_uninterrupted(killed_and_resumed):
  reference, workdir, resumed = killed_and_resumed
  resumed_from(resumed)
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
  assert 'SIGTERM at step' not in job.output(1)  # Process 0 alone speaks.
  first_stop = stopped_at(output)
  assert first_stop >= 7
  # Saved by both at that step (a save is collective: had they stopped apart, it would hang).
  assert latest_step(world['root'] / 'preempted') == first_stop
  # The restart continues from it, here on one process (the data position is every slot's),
  # and a SIGTERM there saves its own current step, though no interval asks for one.
  code, output = one_process_signalled(command, f'step {first_stop + 2}/', signal.SIGTERM)
  assert code == 0 and f'resumed from step {first_stop}' in output
  assert stopped_at(output) >= first_stop + 2
  assert latest_step(world['root'] / 'preempted') == stopped_at(output)


def latest_step(workdir):
  checkpointer = Checkpointer(str(workdir), save_every=1, keep=10)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step
