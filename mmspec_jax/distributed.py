"""Several processes (hosts) running one job: how they start and how they agree.

Every process runs the same command; `--config.multihost=True` makes it join the others through
`jax.distributed.initialize`. On a TPU slice, SLURM or Open MPI, JAX finds the coordinator, the
process count and this process's id by itself; elsewhere (several GPU nodes, or several processes
on one machine as the tests run them) pass them:

  --config.distributed.coordinator_address=HOST:PORT   (process 0's address)
  --config.distributed.num_processes=N
  --config.distributed.process_id=I                    (0 .. N-1, one per process)

The helpers below are no-ops for one process, so single-host code paths stay unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils


def add_config(config: ml_collections.ConfigDict):
  """The `multihost` switch and its `distributed` fields, shared by train.py and decode.py."""
  config.multihost = False
  # Empty / -1: detected by JAX (TPU, SLURM, Open MPI environments).
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=-1, process_id=-1, initialization_timeout=300))


def initialize(config):
  """Joins the other processes when config.multihost; before any other JAX call."""
  if not config.get('multihost', False):
    return
  settings = config.distributed
  given = {'coordinator_address': settings.coordinator_address or None,
           'num_processes': settings.num_processes if settings.num_processes > 0 else None,
           'process_id': settings.process_id if settings.process_id >= 0 else None}
  if given['num_processes'] is not None and given['process_id'] is not None and not (
      0 <= given['process_id'] < given['num_processes']):
    raise ValueError(f'config.distributed.process_id {settings.process_id} must lie in [0, '
                     f'{settings.num_processes}) (config.distributed.num_processes)')
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(initialization_timeout=settings.initialization_timeout,
                             **{name: value for name, value in given.items()
                                if value is not None})


def is_primary() -> bool:
  """The process that writes shared files and speaks."""
  return jax.process_index() == 0


def barrier(name: str):
  """Every process waits here until all have arrived (e.g. after process 0 prepared files)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any: how all hosts agree to stop at the same step
  when only some received SIGTERM."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serializable `value`, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]


def fetch(tree):
  """A pytree of (possibly multi-host sharded) arrays as numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class HostMessages:
  """Process 0's messages to every other process, in order, through the coordination service's
  key-value store (host to host: no device work, no compile). One process: nothing is sent.

  Message i is stored under `{name}/{i}` (its part count, written last) and `{name}/{i}/{j}`
  (parts of at most PART_BYTES). Each reader counts what it has read under `{name}/read/{p}`;
  `forget_read()` deletes what every reader has read. (A shared program step is no proof that a
  process has read: with replicated state a step needs nothing from the others.)
  """

  PART_BYTES = 1 << 20
  WAIT_MS = 60_000  # A receive waits this long, then again, for as long as it takes.

  def __init__(self, name: str):
    self.name, self.sent, self.received, self._forgotten = name, 0, 0, 0

  @staticmethod
  def _client():
    from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
    return jax_distributed.global_state.client

  def send(self, payload: bytes):
    client, index = self._client(), self.sent
    parts = [payload[i:i + self.PART_BYTES]
             for i in range(0, max(len(payload), 1), self.PART_BYTES)]
    for j, part in enumerate(parts):
      client.key_value_set_bytes(f'{self.name}/{index}/{j}', part)
    client.key_value_set(f'{self.name}/{index}', str(len(parts)))
    self.sent += 1

  def receive(self) -> bytes:
    client, index = self._client(), self.received
    while True:
      try:
        count = int(client.blocking_key_value_get(f'{self.name}/{index}', self.WAIT_MS))
        break
      except Exception as e:  # pylint: disable=broad-except
        if 'DEADLINE_EXCEEDED' not in str(e) and 'timed out' not in str(e).lower():
          raise
        logging.info('still waiting for message %d of %s', index, self.name)
    payload = b''.join(client.blocking_key_value_get_bytes(f'{self.name}/{index}/{j}',
                                                           self.WAIT_MS) for j in range(count))
    self.received += 1
    client.key_value_set(f'{self.name}/read/{jax.process_index()}', str(self.received),
                         allow_overwrite=True)
    return payload

  def forget_read(self):
    """Deletes the messages every other process has read (process 0)."""
    client = self._client()
    read = min(self._read_count(client, p) for p in range(1, jax.process_count()))
    for index in range(self._forgotten, read):
      client.key_value_delete(f'{self.name}/{index}')  # With the parts under it.
    self._forgotten = max(self._forgotten, read)

  def _read_count(self, client, process: int) -> int:
    try:
      return int(client.key_value_try_get(f'{self.name}/read/{process}'))
    except Exception:  # pylint: disable=broad-except
      return 0  # Nothing read yet: the key does not exist.
