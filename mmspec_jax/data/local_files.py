"""Shared pieces of the TFDS builders that read local files: globs, stable splits, provenance."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Sequence

from etils import epath
import tensorflow_datasets as tfds

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {'1.0.0': 'Initial release.'}


def as_globs(value: str | Sequence[str]) -> tuple[str, ...]:
  # A lone string is one pattern, not a sequence of one-letter patterns.
  return (value,) if isinstance(value, str) else tuple(value)


def expand(globs: Sequence[str], what: str) -> list[str]:
  """Files matching the globs, sorted within each pattern (so the order never depends on the
  file system), duplicates removed. Raises ValueError naming a pattern that matches nothing."""
  if not globs:
    raise ValueError(f'{what}: no files given')
  files: dict[str, None] = {}
  for pattern in globs:
    matched = [p for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
               if os.path.isfile(p)]
    if not matched:
      raise ValueError(f'{what}: no file matches {pattern!r}')
    files.update(dict.fromkeys(matched))
  return list(files)


def in_validation(key: str, fraction: float) -> bool:
  # A content hash, not a random draw: the split is the same on every machine and every run, and
  # duplicate documents land on the same side (no train/validation leakage through copies).
  if fraction <= 0.0:
    return False
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < fraction


def check_fraction(fraction: float, has_validation_files: bool, what: str):
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'{what}: validation_fraction must be in [0, 1), got {fraction}')
  if fraction > 0.0 and has_validation_files:
    raise ValueError(f'{what}: give validation_files or validation_fraction, not both')


def sources_description(config: tfds.core.BuilderConfig) -> str:
  # Stored in dataset_info.json so that prepare() can refuse to reuse a dataset built from other
  # sources under the same config name.
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)}}
  return 'sources: ' + json.dumps(fields, sort_keys=True)


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """What our local-file builders share. Abstract (no _info), so TFDS does not register it."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS looks up the code of a builder defined in a package through importlib_resources,
    # which may be missing; the path only serves to find a checksums file we never have.
    return epath.Path(__file__)
