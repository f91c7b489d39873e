"""TextCorpus: a TFDS builder over local plain-text or JSONL files -> {'text'}."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from mmspec_jax.data import local_files


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """Which local files make a TextCorpus.

  Attributes:
    files: glob(s) of the training files.
    validation_files: glob(s) of separate validation files; or instead
    validation_fraction: the share of documents held out by a stable hash of their text.
    source_format: 'jsonl' (one JSON object per line with a `text_field` string), 'text', or
      'auto' (by extension: *.jsonl -> jsonl, anything else -> text).
    text_field: the JSONL field holding the document.
    document_per: for plain text, 'paragraph' (blocks separated by blank lines; single newlines
      stay inside a document) or 'file' (each whole file is one document).
  """
  files: str | Sequence[str] = ()
  validation_files: str | Sequence[str] = ()
  validation_fraction: float = 0.0
  source_format: str = 'auto'
  text_field: str = 'text'
  document_per: str = 'paragraph'

  def __post_init__(self):
    self.files = local_files.as_globs(self.files)
    self.validation_files = local_files.as_globs(self.validation_files)
    if not self.files:
      raise ValueError('TextCorpus: no source files given (files=GLOB or a list of globs)')
    if self.source_format not in ('auto', 'text', 'jsonl'):
      raise ValueError(f"TextCorpus: source_format must be 'auto', 'text' or 'jsonl', got "
                       f'{self.source_format!r}')
    if self.document_per not in ('paragraph', 'file'):
      raise ValueError(f"TextCorpus: document_per must be 'paragraph' or 'file', got "
                       f'{self.document_per!r}')
    local_files.check_fraction(self.validation_fraction, bool(self.validation_files), 'TextCorpus')


def _read_documents(path: str, config: TextCorpusConfig) -> Iterator[tuple[str, str]]:
  """Yields (unique key, document text) from one file; empty documents are skipped."""
  jsonl = (config.source_format == 'jsonl'
           or (config.source_format == 'auto' and path.endswith('.jsonl')))
  with open(path, encoding='utf-8') as f:
    if jsonl:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path} line {line_number}: not valid JSON ({e})') from e
        text = record.get(config.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
          raise ValueError(f'{path} line {line_number}: no string field '
                           f'{config.text_field!r}')
        if text.strip():
          yield f'{path}:{line_number}', text
      return
    content = f.read()
  if config.document_per == 'file':
    documents = [content.strip()]
  else:
    documents = [block.strip() for block in re.split(r'\n[ \t\r\f\v]*\n', content)]
  for index, text in enumerate(d for d in documents if d):
    yield f'{path}:{index}', text


class TextCorpus(local_files.LocalFilesBuilder):
  """Documents from local plain-text or JSONL files (see TextCorpusConfig). Splits: 'train', and
  'validation' when validation_files or validation_fraction is given."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=local_files.sources_description(self.builder_config),
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    train_files = local_files.expand(config.files, 'TextCorpus files')
    if config.validation_files:
      validation_files = local_files.expand(config.validation_files, 'TextCorpus validation_files')
      self._check_nonempty(train_files, None)
      self._check_nonempty(validation_files, None)
      return {'train': self._generate_examples(train_files, None),
              'validation': self._generate_examples(validation_files, None)}
    self._check_nonempty(train_files, 'train')
    splits = {'train': self._generate_examples(train_files, 'train')}
    if config.validation_fraction > 0.0:
      self._check_nonempty(train_files, 'validation')
      splits['validation'] = self._generate_examples(train_files, 'validation')
    return splits

  def _keep(self, text: str, split: str | None) -> bool:
    """Whether a document belongs to `split` (None: every document of the files does)."""
    return split is None or (split == 'validation') == local_files.in_validation(
        text, self.builder_config.validation_fraction)

  def _check_nonempty(self, files: list[str], split: str | None):
    # TFDS fails an empty split with a bare AssertionError; say what is wrong instead. Stops at
    # the first document of the split, so this rarely reads more than the first file.
    for path in files:
      for _, text in _read_documents(path, self.builder_config):
        if self._keep(text, split):
          return
    if split == 'validation':
      fraction = self.builder_config.validation_fraction
      raise ValueError(f'TextCorpus: validation_fraction={fraction} selects no document of '
                       f'{files}; use a larger fraction or validation_files')
    raise ValueError(f'TextCorpus: no non-empty document in {files}')

  def _generate_examples(self, files: list[str], split: str | None):
    for path in files:
      for key, text in _read_documents(path, self.builder_config):
        if self._keep(text, split):
          yield key, {'text': text}
