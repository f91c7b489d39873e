"""TFDS builders over local files, and loading prepared TFDS datasets for random access.

Nothing here downloads. The two builders read files named in their BuilderConfig:

  TextCorpus           plain-text or JSONL files -> {'text'}
  LlavaConversations   LLaVA-format JSON + an image folder -> {'id', 'image', 'has_image',
                       'image_file', 'conversations': {'from', 'value'}}

`prepare(builder, data_dir, **sources)` writes array_record files (random access, which the
resumable BatchIterator needs) under data_dir/<builder name>/<config_name>/<version>/.
`load_source(name, data_dir)` opens that, or any TFDS dataset (c4, lm1b, ...) prepared there with
file_format=array_record, as a random-access data source: `len(source)`, `source[i]` -> a dict of
numpy values (Text features come back as bytes, Sequence features as dicts of lists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from mmspec_jax.data.llava_conversations import LlavaConversations, LlavaConversationsConfig
from mmspec_jax.data.text_corpus import TextCorpus, TextCorpusConfig

__all__ = ['BUILDERS', 'LlavaConversations', 'LlavaConversationsConfig', 'TextCorpus',
           'TextCorpusConfig', 'load_source', 'prepare', 'prepared_dir']

BUILDERS = {'text_corpus': TextCorpus, 'llava_conversations': LlavaConversations}
_CONFIG_CLASSES = {TextCorpus: TextCorpusConfig, LlavaConversations: LlavaConversationsConfig}


def prepare(builder: str | type[tfds.core.GeneratorBasedBuilder], data_dir: str | os.PathLike,
            *, config_name: str = 'default', overwrite: bool = False,
            **source_kwargs: Any) -> tfds.core.DatasetBuilder:
  """Builds one of our local-file datasets into data_dir as array_record files.

  Args:
    builder: 'text_corpus', 'llava_conversations', or the builder class.
    data_dir: the TFDS data directory; the dataset lands in data_dir/NAME/config_name/1.0.0/.
    config_name: names this set of sources, so several corpora can share one data_dir.
    overwrite: rebuild even if it is already prepared. Otherwise a prepared dataset is reused,
      and a ValueError is raised if it was prepared from different sources.
    **source_kwargs: the fields of TextCorpusConfig / LlavaConversationsConfig (files=...,
      json_files=..., image_folder=..., ...).
  Returns:
    The prepared builder: `.as_data_source('train')` gives random access, `.info` the splits.
  """
  cls = BUILDERS.get(builder) if isinstance(builder, str) else builder
  if cls not in _CONFIG_CLASSES:
    raise ValueError(f'unknown builder {builder!r}: prepare() builds {sorted(BUILDERS)}; other '
                     'TFDS datasets are prepared with `tfds build NAME --data_dir=DIR '
                     '--file_format=array_record` where they can be downloaded')
  config_class = _CONFIG_CLASSES[cls]
  allowed = {f.name for f in dataclasses.fields(config_class)} - {
      f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = sorted(set(source_kwargs) - allowed)
  if unknown:
    raise ValueError(f'{cls.__name__}: unknown source argument(s) {unknown}; expected '
                     f'{sorted(allowed)}')
  instance = cls(data_dir=os.fspath(data_dir),
                 config=config_class(name=config_name, **source_kwargs))
  info_path = os.path.join(os.fspath(instance.data_path), 'dataset_info.json')
  if os.path.isfile(info_path) and not overwrite:
    with open(info_path, encoding='utf-8') as f:
      stored = json.load(f).get('description')
    if stored != instance.info.description:
      raise ValueError(f'{instance.data_path} was prepared from other sources ({stored}); pass '
                       'overwrite=True to rebuild it, or another config_name')
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # try_download_gcs=False: never look for a pre-built copy on the network.
  instance.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode))
  return instance


def _version_dirs(directory: str) -> list[str]:
  """Prepared version subdirectories (those holding a dataset_info.json), oldest first."""
  found = []
  for entry in os.listdir(directory):
    if (tfds.core.Version.is_valid(entry)
        and os.path.isfile(os.path.join(directory, entry, 'dataset_info.json'))):
      found.append(entry)
  return sorted(found, key=tfds.core.Version)


def prepared_dir(name: str, data_dir: str | os.PathLike) -> str:
  """The directory of a prepared dataset 'NAME[/CONFIG][:VERSION]' in data_dir (latest version
  and the only config by default). Raises ValueError when it is not prepared there."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  base, _, version = name.partition(':')
  dataset, _, config = base.partition('/')
  how = (f'prepare it first (mmspec_jax.data.builders.prepare for local files, or `tfds build '
         f'{dataset} --data_dir={data_dir} --file_format=array_record` where it can be '
         'downloaded); nothing is downloaded here')
  directory = os.path.join(data_dir, dataset)
  if not dataset or not os.path.isdir(directory):
    raise ValueError(f'dataset {name!r} is not prepared in {data_dir}: {how}')
  if config:
    directory = os.path.join(directory, config)
  elif not any(tfds.core.Version.is_valid(e) for e in os.listdir(directory)):
    configs = sorted(e for e in os.listdir(directory) if os.path.isdir(os.path.join(directory, e))
                     and _version_dirs(os.path.join(directory, e)))
    if len(configs) > 1:
      raise ValueError(f'dataset {dataset!r} has several prepared configs in {data_dir}: '
                       f'{configs}; name one, e.g. {dataset}/{configs[0]}')
    directory = os.path.join(directory, configs[0]) if configs else directory
  versions = _version_dirs(directory) if os.path.isdir(directory) else []
  if version:
    versions = [v for v in versions if v == version]
  if not versions:
    raise ValueError(f'dataset {name!r} is not prepared in {data_dir} (no complete '
                     f'{version or "version"} directory under {directory}): {how}')
  return os.path.join(directory, versions[-1])


def load_source(name: str, data_dir: str | os.PathLike, *, split: str = 'train',
                text_key: str | None = None, decoders: dict[str, Any] | None = None
                ) -> Sequence[dict[str, Any]]:
  """A prepared TFDS dataset as a random-access source for make_iterator().

  Args:
    name: 'NAME[/CONFIG][:VERSION]', e.g. 'lm1b', 'c4/en', 'text_corpus/default'.
    data_dir: the TFDS data directory it was prepared in.
    split: a split name, or a TFDS split slice such as 'train[:90%]'.
    text_key: if given, the feature that must exist (the text of a text source).
    decoders: TFDS decoders by feature, e.g. {'image': tfds.decode.SkipDecoding()} so that a
      'chat' iterator, which drops images, does not decode them.
  Returns:
    An ArrayRecordDataSource: len(source), source[i] -> dict of decoded numpy values.
  Raises:
    ValueError: not prepared in data_dir, not array_record, unknown split or missing feature.
  """
  directory = prepared_dir(name, data_dir)
  builder = tfds.builder_from_directory(directory)
  array_record = tfds.core.FileFormat.ARRAY_RECORD
  formats = [builder.info.file_format, *getattr(builder.info, 'alternative_file_formats', ())]
  if array_record not in formats:
    stored = getattr(builder.info.file_format, 'value', None) or 'tfrecord'
    raise ValueError(f'dataset {name!r} in {directory} is stored as {stored}, which has no '
                     'random access; prepare it again with file_format=array_record')
  split_name = re.split(r'[\[+]', split, maxsplit=1)[0]
  if split_name not in builder.info.splits:
    raise ValueError(f'dataset {name!r} has no split {split_name!r}; it has '
                     f'{sorted(builder.info.splits)}')
  if text_key is not None and text_key not in builder.info.features:
    raise ValueError(f'dataset {name!r} has no feature {text_key!r}; it has '
                     f'{sorted(builder.info.features)}')
  return builder.as_data_source(split, decoders=decoders, file_format=array_record)
