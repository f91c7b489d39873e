"""Models named by Hugging Face Hub id (`org/name`) as well as by directory.

An id is resolved through the local Hugging Face cache with huggingface_hub (HF_HOME, HF_HUB_CACHE
and HF_HUB_OFFLINE are honoured): a cached snapshot is used as it is; one not cached is downloaded
only when huggingface_hub is allowed online, and otherwise the error names the id and the cache
that was searched.
"""

from __future__ import annotations

import os
import re

# org/name as the Hub spells ids (a revision is not part of it).
_HUB_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$')


def is_hub_id(name: str) -> bool:
  """Whether `name` reads as a Hub id and is not a path that exists here."""
  return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def resolve_model(name: str) -> str:
  """A model directory: `name` itself, or the cached snapshot of the Hub id `name`."""
  if not name or not is_hub_id(name):
    return name
  import huggingface_hub
  from huggingface_hub import constants
  cache = constants.HF_HUB_CACHE
  try:
    return huggingface_hub.snapshot_download(name, cache_dir=cache,
                                             local_files_only=constants.HF_HUB_OFFLINE)
  except Exception as e:  # Not cached and offline, unknown id, no network: one message.
    where = ('HF_HUB_OFFLINE is set, so nothing is downloaded'
             if constants.HF_HUB_OFFLINE else 'and downloading it failed')
    raise ValueError(f'model {name!r} is neither a directory nor in the Hugging Face cache '
                     f'{cache!r} ({where}: {type(e).__name__}: {e})') from None
