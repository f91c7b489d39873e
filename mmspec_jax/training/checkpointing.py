"""Checkpoints with an orbax CheckpointManager: the train state and the input pipeline's position.

Saved together at one step, so a resumed run sees exactly the data an uninterrupted run would.
Saves are asynchronous (training goes on while a step is written); orbax writes to a temporary
directory and renames it on completion, so a run killed mid-save leaves the previous checkpoint as
the latest. The run's config is written to the workdir once; a workdir holding a checkpoint of a
different model or stage is refused rather than silently mixed.
"""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = 'train_config.json'
# Fields that define what a checkpoint is: a change here means another run, not a resume.
IDENTITY_FIELDS = ('stage', 'model', 'task')


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, asynchronous: bool = True):
    self.directory = str(epath.Path(workdir).resolve() / 'checkpoints') if '://' not in workdir \
        else f'{workdir.rstrip("/")}/checkpoints'
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=asynchronous, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (the interval says so)."""
    return self._manager.should_save(step)

  def save(self, step: int, state, data_state: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving (if the interval or `force` says so); returns whether a save started."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state):
    """(state, data_state) at `step`; abstract_state holds ShapeDtypeStructs with shardings, so
    every array is restored straight onto its devices."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def check_workdir_config(workdir: str, config_dict: dict[str, Any]):
  """Refuses a workdir made by another model or stage (every process checks)."""
  path = epath.Path(workdir) / CONFIG_FILE  # Local or gs:// alike.
  if path.exists():
    previous = json.loads(path.read_text())
    for field in IDENTITY_FIELDS:
      if previous.get(field) != config_dict.get(field):
        raise ValueError(
            f'workdir {workdir!r} holds a run of another config: its {field!r} differs '
            f'({previous.get(field)!r} there, {config_dict.get(field)!r} now). Use a new '
            '--workdir, or the same config to resume.')


def write_workdir_config(workdir: str, config_dict: dict[str, Any]):
  """Records the run's config in its workdir (one process of several writes it)."""
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, default=str))
