"""LlavaConversations: a TFDS builder over LLaVA-format JSON and a local image folder."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmspec_jax.data import local_files
from mmspec_jax.data.processing import load_image

# Records without an image store this 1x1 black PNG and has_image=False: a fixed-shape feature
# keeps every record decodable the same way, and has_image (not the pixels) says to ignore it.
_EMPTY_IMAGE_SHAPE = (1, 1, 3)


def _png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


_EMPTY_IMAGE_PNG = _png_bytes(Image.fromarray(np.zeros(_EMPTY_IMAGE_SHAPE, np.uint8)))


@dataclasses.dataclass(eq=False)
class LlavaConversationsConfig(tfds.core.BuilderConfig):
  """Which local files make a LlavaConversations dataset.

  Attributes:
    json_files: glob(s) of LLaVA-format JSON files (a list of records) or JSONL files (one record
      a line): {"id", "image" (optional, relative to image_folder), "conversations": [{"from":
      "human"|"gpt", "value": ...}, ...]}. LLaVA-Instruct-150K, LCS-558K and converted ScienceQA
      are all of this form.
    image_folder: the folder the records' "image" paths are relative to (needed only if some
      record has an image).
    validation_json_files: glob(s) of separate validation files; or instead
    validation_fraction: the share of records held out by a stable hash of their id.
  """
  json_files: str | Sequence[str] = ()
  image_folder: str | None = None
  validation_json_files: str | Sequence[str] = ()
  validation_fraction: float = 0.0

  def __post_init__(self):
    self.json_files = local_files.as_globs(self.json_files)
    self.validation_json_files = local_files.as_globs(self.validation_json_files)
    if not self.json_files:
      raise ValueError('LlavaConversations: no source files given (json_files=GLOB)')
    local_files.check_fraction(self.validation_fraction, bool(self.validation_json_files),
                    'LlavaConversations')


def _load_records(path: str) -> list[Any]:
  with open(path, encoding='utf-8') as f:
    try:
      if path.endswith('.jsonl'):
        return [json.loads(line) for line in f if line.strip()]
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(records, list):
    raise ValueError(f'{path}: expected a JSON list of LLaVA records, got '
                     f'{type(records).__name__}')
  return records


def _checked_record(record: Any, index: int, path: str, image_folder: str | None
                    ) -> dict[str, Any]:
  """A validated record: {'id', 'image_path' (None without image), 'conversations'}."""
  where = f'{path} record {index}'
  if not isinstance(record, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}')
  record_id = str(record.get('id', f'{os.path.basename(path)}#{index}'))
  where += f' (id {record_id!r})'
  turns = record.get('conversations')
  if not isinstance(turns, list) or not all(
      isinstance(t, dict) and isinstance(t.get('from'), str) and isinstance(t.get('value'), str)
      for t in turns):
    raise ValueError(f'{where}: "conversations" must be a list of {{"from", "value"}} strings')
  image = record.get('image')
  image_path = None
  if image:
    if not isinstance(image, str):
      raise ValueError(f'{where}: "image" must be one relative path (LLaVA-1.5 takes one image '
                       f'per conversation), got {image!r}')
    if image_folder is None:
      raise ValueError(f'{where} has image {image!r} but no image_folder was given')
    image_path = os.path.join(os.path.expanduser(image_folder), image)
    if not os.path.isfile(image_path):
      raise ValueError(f'image file not found: {image_path} ({where})')
  return {'id': record_id, 'image_file': image or '', 'image_path': image_path,
          'conversations': [{'from': t['from'], 'value': t['value']} for t in turns]}


def _image_bytes(path: str) -> bytes:
  """The file's own bytes for RGB JPEG/PNG (no re-encoding loss), else RGB PNG bytes: the data
  source decodes with PIL without a mode conversion, so everything stored must be RGB."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format in ('JPEG', 'PNG') and image.mode == 'RGB':
        return data
    return _png_bytes(load_image(path))  # Alpha is composited on white, as in processing.py.
  except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError.
    raise ValueError(f'cannot decode image file {path}: {e}') from e


class LlavaConversations(local_files.LocalFilesBuilder):
  """LLaVA-format conversations with their images (see LlavaConversationsConfig).

  Features: id Text; image uint8[H, W, 3] (a 1x1 black image when the record has none);
  has_image bool; image_file Text (the record's relative path, '' without image);
  conversations Sequence({'from': Text, 'value': Text}). Every record is validated (and every
  image file checked to exist) before anything is written.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=local_files.sources_description(self.builder_config),
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            # encoding_format=None: JPEG and PNG bytes are both stored as they are.
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format=None),
            'has_image': np.bool_,
            'image_file': tfds.features.Text(),
            'conversations': tfds.features.Sequence({'from': tfds.features.Text(),
                                                     'value': tfds.features.Text()}),
        }))

  def _records(self, patterns: Sequence[str], what: str) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for file_index, path in enumerate(local_files.expand(patterns, what)):
      for index, record in enumerate(_load_records(path)):
        checked = _checked_record(record, index, path, self.builder_config.image_folder)
        records.append((f'{file_index}:{index}', checked))
    return records

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    train = self._records(config.json_files, 'LlavaConversations json_files')
    if config.validation_json_files:
      validation = self._records(config.validation_json_files,
                                 'LlavaConversations validation_json_files')
    else:
      held_out = [local_files.in_validation(r[1]['id'], config.validation_fraction)
                  for r in train]
      validation = [r for r, out in zip(train, held_out) if out]
      train = [r for r, out in zip(train, held_out) if not out]
    if not train:
      raise ValueError(f'LlavaConversations: no record for the train split in '
                       f'{config.json_files}')
    splits = {'train': self._generate_examples(train)}
    if config.validation_json_files or config.validation_fraction > 0.0:
      if not validation:  # TFDS fails an empty split with a bare AssertionError.
        raise ValueError('LlavaConversations: the validation split would be empty (use a larger '
                         'validation_fraction or validation_json_files)')
      splits['validation'] = self._generate_examples(validation)
    return splits

  def _generate_examples(self, records: list[tuple[str, dict[str, Any]]]):
    for key, record in records:
      has_image = record['image_path'] is not None
      yield key, {
          'id': record['id'],
          'image': _image_bytes(record['image_path']) if has_image else _EMPTY_IMAGE_PNG,
          'has_image': has_image,
          'image_file': record['image_file'],
          'conversations': record['conversations'],
      }
