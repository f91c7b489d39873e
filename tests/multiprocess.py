"""Starts N processes of one command on localhost, joined as one JAX job (a coordinator on a free
port, CPU collectives, fake CPU devices per process), as a TPU slice's hosts would run it.

  with Processes([sys.executable, 'train.py', ...], num_processes=2) as job:
    job.wait_for_line('step 14/')      # process 0's output
    job.kill(signal.SIGKILL)
  job.returncodes

Each process's output goes to a file (no pipe can fill and block it); a failure raises with every
process's last lines. Leaving the block kills whatever still runs, so a failed test leaves no
process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class Processes:

  def __init__(self, command: list[str], num_processes: int = 2, devices_per_process: int = 4,
               timeout: float = 300):
    self.command, self.num_processes = command, num_processes
    self.devices_per_process, self.timeout = devices_per_process, timeout
    self.logs = tempfile.mkdtemp(prefix='multiprocess-')
    self.processes: list[subprocess.Popen] = []
    self.deadline = None

  def __enter__(self) -> 'Processes':
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={self.devices_per_process} '
               + os.environ.get('MMSPEC_TEST_XLA_FLAGS', ''))
    self.deadline = time.time() + self.timeout
    for index in range(self.num_processes):
      flags = ['--config.multihost=True',
               f'--config.distributed.coordinator_address=localhost:{port}',
               f'--config.distributed.num_processes={self.num_processes}',
               f'--config.distributed.process_id={index}',
               '--config.distributed.initialization_timeout=120']
      output = open(self.log_path(index), 'w')
      self.processes.append(subprocess.Popen(self.command + flags, cwd=REPO, env=env,
                                             stdout=output, stderr=subprocess.STDOUT))
    return self

  def __exit__(self, *exc):
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  def log_path(self, index: int) -> str:
    return os.path.join(self.logs, f'process{index}.log')

  def output(self, index: int = 0) -> str:
    with open(self.log_path(index)) as f:
      return f.read()

  def _failure(self, message: str) -> AssertionError:
    tails = '\n'.join(f'--- process {i} (exit {p.poll()}):\n' + ''.join(
        self.output(i).splitlines(True)[-60:]) for i, p in enumerate(self.processes))
    return AssertionError(f'{message}\n{tails}')

  def wait_for_line(self, prefix: str, index: int = 0):
    """Waits until process `index` printed a line starting with `prefix`."""
    while time.time() < self.deadline:
      if any(line.startswith(prefix) for line in self.output(index).splitlines()):
        return
      if any(p.poll() not in (None, 0) for p in self.processes):
        raise self._failure(f'a process failed before printing {prefix!r}')
      time.sleep(0.2)
    raise self._failure(f'no line {prefix!r} within {self.timeout} s')

  def signal(self, sig: int, indices=None):
    for index in range(self.num_processes) if indices is None else indices:
      self.processes[index].send_signal(sig)

  def wait(self, expect_success: bool = True) -> list[int]:
    """Waits for every process (within the deadline); returns their exit codes."""
    for process in self.processes:
      try:
        process.wait(timeout=max(1.0, self.deadline - time.time()))
      except subprocess.TimeoutExpired:
        self.signal(signal.SIGUSR1)  # Where each one is stuck, if it prints stacks on it.
        time.sleep(2)
        raise self._failure(f'still running after {self.timeout} s') from None
    codes = [p.returncode for p in self.processes]
    if expect_success and any(codes):
      raise self._failure(f'exit codes {codes}')
    return codes


def run(command: list[str], num_processes: int = 2, timeout: float = 300) -> list[str]:
  """Runs the command on N processes to completion; returns each one's output."""
  with Processes(command, num_processes, timeout=timeout) as job:
    job.wait()
    return [job.output(i) for i in range(num_processes)]


