"""Loading models: from a Hugging Face directory (converting on the fly) or a converted one.

A converted directory holds `mmspec_config.json` (our model config), `params/` (an orbax
checkpoint) and the source's tokenizer/processor files. `load_model` accepts either kind.

Conversion streams: each of our parameters is assembled from its HF tensor(s), cast, placed on its
device(s) (`shardings`) and released before the next, so host memory peaks near one copy of the
model plus one parameter.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from mmspec_jax.convert import hf_keys
from mmspec_jax.sharding import placed_structs
from mmspec_jax.convert.checkpoint_files import WEIGHT_FILE_PATTERNS, CheckpointFiles
from mmspec_jax.convert.hf_config import ConversionError, config_from_hf_dir
from mmspec_jax.models import abstract_params
from mmspec_jax.models.config import LlavaConfig, ModelConfig, from_dict, to_dict, with_dtype

CONFIG_FILE = 'mmspec_config.json'
PARAMS_DIR = 'params'

Progress = Callable[[str], None]


def layout(config: ModelConfig):
  """Our roots, the HF prefixes and the layer stacks for this kind of model."""
  if isinstance(config, LlavaConfig):
    stacks = {hf_keys.TEXT: {'layers': 0},
              hf_keys.VISION: {'layers': 0, 'unused_layers': config.num_vision_layers_computed}}
    return hf_keys.LLAVA_ROOTS, hf_keys.LLAVA_PREFIXES, stacks
  return hf_keys.LLAMA_ROOTS, hf_keys.LLAMA_PREFIXES, {hf_keys.TEXT: {'layers': 0}}


def _resolve_prefixes(files: CheckpointFiles, entries: list[hf_keys.Entry],
                      prefixes: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """Which key layout each component uses, probed with its first tensor."""
  chosen = {}
  for entry in entries:
    if entry.component in chosen:
      continue
    candidates = prefixes[entry.component]
    probe = entry.hf_names[0]
    found = [p for p in candidates if p + probe in files]
    if not found:
      others = ', '.join(repr(p + probe) for p in candidates[1:])
      raise ConversionError(f'missing tensor {candidates[0] + probe!r} in the checkpoint'
                            + (f' (also looked for {others})' if others else ''))
    chosen[entry.component] = found[0]
  return chosen


def convert_hf_params(hf_dir: str, config: ModelConfig, *, shardings: Any = None,
                      allow_pickle: bool = False, progress: Progress | None = None):
  """Our parameters (in `config`'s param_dtype) from the HF checkpoint in `hf_dir`.

  shardings: None (default device) or a pytree of `jax.sharding.Sharding` matching the params.
  """
  abstract = traverse_util.flatten_dict(nn.unbox(abstract_params(config)), sep='/')
  roots, prefixes, stacks = layout(config)
  entries = hf_keys.entries({p: leaf.shape for p, leaf in abstract.items()}, roots, stacks)
  flat_shardings = (traverse_util.flatten_dict(shardings, sep='/') if shardings is not None
                    else {})
  converted, used = {}, set()
  with CheckpointFiles(hf_dir, allow_pickle=allow_pickle) as files:
    prefix_of = _resolve_prefixes(files, entries, prefixes)
    for number, entry in enumerate(entries, 1):
      leaf = abstract[entry.path]
      layer_shape = leaf.shape[1:] if entry.stacked else leaf.shape
      expected = hf_keys.hf_shape(entry.kind, layer_shape)
      array = np.empty(leaf.shape, leaf.dtype)
      for index, name in enumerate(entry.hf_names):
        name = prefix_of[entry.component] + name
        if name not in files:
          raise ConversionError(f'missing tensor {name!r} in the checkpoint')
        if files.shape(name) != expected:
          raise ConversionError(f'unexpected shape for tensor {name!r}: expected {expected}, '
                                f'found {files.shape(name)}')
        tensor = hf_keys.to_ours(entry.kind, files.read(name), layer_shape)
        if entry.stacked:
          array[index] = tensor
        else:
          array[...] = tensor
        used.add(name)
      converted[entry.path] = jax.device_put(array, flat_shardings.get(entry.path))
      del array
      if progress:
        progress(f'[{number}/{len(entries)}] {entry.path} {tuple(leaf.shape)}')
    leftover = sorted(n for n in files.names() - used
                      if not n.endswith(hf_keys.IGNORED_SUFFIXES) and not _is_tied_head(n, config))
  if leftover:
    logging.warning('ignored %d checkpoint tensors our model does not use: %s', len(leftover),
                    ', '.join(leftover[:8]) + (' ...' if len(leftover) > 8 else ''))
  return traverse_util.unflatten_dict(converted, sep='/')


def _is_tied_head(name: str, config: ModelConfig) -> bool:
  text = config.text if isinstance(config, LlavaConfig) else config
  return text.tie_word_embeddings and name.endswith('lm_head.weight')


def copy_tokenizer_files(source_dir: str, out_dir: str) -> list[str]:
  """Copies everything but weights (tokenizer, processor, chat template, configs)."""
  weights = {p for pattern in WEIGHT_FILE_PATTERNS
             for p in glob.glob(os.path.join(source_dir, pattern))}
  copied = []
  for path in sorted(glob.glob(os.path.join(source_dir, '*'))):
    if os.path.isfile(path) and path not in weights:
      shutil.copy2(path, os.path.join(out_dir, os.path.basename(path)))
      copied.append(os.path.basename(path))
  return copied


def is_converted_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(out_dir: str, config: ModelConfig, params, *, source_dir: str | None = None):
  """Writes a converted directory: config, orbax params, tokenizer files of `source_dir`.

  Called by one process (of one or several): `params` must be host arrays or arrays this process
  holds whole (e.g. gathered with distributed.fetch); no other process takes part."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  params_dir = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(params_dir):
    raise ConversionError(f'{params_dir!r} already exists; choose an empty --out_dir')
  if source_dir is not None:
    copy_tokenizer_files(source_dir, out_dir)
  this_process = jax.process_index()
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=this_process, active_processes={this_process}))
  checkpointer.save(params_dir, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  # The config goes last: its presence marks the directory as complete.
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(to_dict(config), f, indent=2)


def read_config(path: str) -> ModelConfig:
  """The model config of an HF directory or a converted one."""
  if is_converted_dir(path):
    with open(os.path.join(path, CONFIG_FILE)) as f:
      return from_dict(json.load(f))
  return config_from_hf_dir(path)


def load_model(path: str, *, dtype: str | None = None, shardings: Any = None,
               allow_pickle: bool = False, progress: Progress | None = None):
  """(config, params) from an HF directory or a converted directory.

  dtype: compute and parameter dtype ('float32', 'bfloat16'); default: the converted
  directory's, or float32 for an HF directory.
  """
  if not os.path.isdir(path):
    raise ConversionError(f'model directory {path!r} does not exist')
  config = read_config(path)
  if dtype is not None or not is_converted_dir(path):
    config = with_dtype(config, dtype or 'float32')
  if not is_converted_dir(path):
    return config, convert_hf_params(path, config, shardings=shardings,
                                     allow_pickle=allow_pickle, progress=progress)
  import orbax.checkpoint as ocp
  abstract = nn.unbox(abstract_params(config))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  # Restoring into this target casts to the requested dtype and places every leaf straight onto
  # its sharding.
  target = placed_structs(abstract, shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), target)
  return config, params
