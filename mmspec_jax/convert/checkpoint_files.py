"""The tensors of a Hugging Face model directory, read one at a time.

safetensors files are memory-mapped, so reading a tensor costs only that tensor. Pickled
`pytorch_model*.bin` files can run arbitrary code when unpickled and are refused unless the caller
opts in (then torch is needed, and loads them with `weights_only=True`, memory-mapped).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from mmspec_jax.convert.hf_config import ConversionError

SAFETENSORS_INDEX = 'model.safetensors.index.json'
PICKLE_INDEX = 'pytorch_model.bin.index.json'
WEIGHT_FILE_PATTERNS = ('*.safetensors', '*.bin', '*.pt', '*.pth', '*.msgpack', '*.h5',
                        SAFETENSORS_INDEX, PICKLE_INDEX)


def _weight_map(hf_dir: str, index_name: str, pattern: str) -> dict[str, str]:
  """Tensor name -> file, from the sharded index when there is one, else from the files."""
  index = os.path.join(hf_dir, index_name)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    missing = sorted({name for name in weight_map.values()
                      if not os.path.isfile(os.path.join(hf_dir, name))})
    if missing:
      raise ConversionError(f'{index} names shard files that are missing: {missing}')
    return {key: os.path.join(hf_dir, name) for key, name in weight_map.items()}
  return {path: path for path in sorted(glob.glob(os.path.join(hf_dir, pattern)))}


class CheckpointFiles:
  """Read-only access to a HF directory's tensors; use as a context manager."""

  def __init__(self, hf_dir: str, *, allow_pickle: bool = False):
    self._handles = {}
    self._pickled = None
    files = _weight_map(hf_dir, SAFETENSORS_INDEX, '*.safetensors')
    if any(name.endswith('.safetensors') for name in files.values()):
      self._file_of = self._safetensors_names(files)
      return
    pickles = _weight_map(hf_dir, PICKLE_INDEX, 'pytorch_model*.bin')
    if not pickles:
      raise ConversionError(f'no weights in {hf_dir!r}: expected model.safetensors, sharded '
                            f'*.safetensors with {SAFETENSORS_INDEX}, or pytorch_model.bin')
    if not allow_pickle:
      raise ConversionError(
          f'{hf_dir!r} holds only pickled PyTorch weights ({os.path.basename(next(iter(pickles.values())))}), '
          'which can run arbitrary code when loaded. Convert them to safetensors, or opt in with '
          'allow_pickle=True (--allow_pickle) if you trust their source.')
    self._file_of = self._pickle_names(pickles)

  def _safetensors_names(self, files: dict[str, str]) -> dict[str, str]:
    from safetensors import safe_open
    file_of = {}
    for path in sorted(set(files.values())):
      handle = safe_open(path, framework='numpy')
      self._handles[path] = handle
      file_of.update({name: path for name in handle.keys()})
    return file_of

  def _pickle_names(self, files: dict[str, str]) -> dict[str, str]:
    try:
      import torch
    except ImportError as e:
      raise ConversionError('loading pickled .bin checkpoints needs torch installed') from e
    self._pickled = {}
    for path in sorted(set(files.values())):
      tensors = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
      self._pickled.update({name: tensor for name, tensor in tensors.items()})
    return {name: 'pickle' for name in self._pickled}

  def names(self) -> set[str]:
    return set(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def shape(self, name: str) -> tuple[int, ...]:
    if self._pickled is not None:
      return tuple(self._pickled[name].shape)
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    """One tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
    if self._pickled is not None:
      import ml_dtypes
      import torch
      tensor = self._pickled[name]
      if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits.
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return tensor.numpy()
    handle = self._handles[self._file_of[name]]
    if handle.get_slice(name).get_dtype() == 'BF16':
      return self._read_bfloat16(self._file_of[name], name)
    return handle.get_tensor(name)

  @staticmethod
  def _read_bfloat16(path: str, name: str) -> np.ndarray:
    # numpy has no bfloat16, so safetensors' numpy reader refuses it; its flax reader does not.
    # Read on the host CPU device so an accelerator never sees the tensor.
    import jax
    from safetensors import safe_open
    with jax.default_device(jax.devices('cpu')[0]):
      with safe_open(path, framework='flax') as handle:
        return np.asarray(handle.get_tensor(name))

  def close(self):
    self._handles.clear()
    self._pickled = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
