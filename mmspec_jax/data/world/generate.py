"""Writes a whole synthetic world to a directory: images, LLaVA JSON per task, a text corpus, a
tokenizer and processor, and a manifest.

  out_dir/
    images/{train,test}_NNNNN.png   one picture per scene (image_size x image_size RGB)
    train_{task}.json, test_{task}.json   LLaVA records (tasks.py) for captioning, sqa,
                                          conversation; every image has one record per task
    train_all.json                  the train records of all tasks, shuffled together
    text_corpus.txt                 text-only documents separated by blank lines (corpus.py)
    tokenizer/                      BPE tokenizer + LlavaProcessor (tokenizer.py)
    manifest.json                   seed, sizes, record counts, library versions

Record "image" fields are relative to out_dir/images (the image_folder of the
llava_conversations builder). Test scenes are held out: no train scene equals a test scene.

Everything is a function of the seed and the sizes: the same arguments give byte-identical
files. Each record draws from its own random stream (seed, split, image index, task), so the
first N images of a world are the same whatever num_train_images is.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from mmspec_jax.data.world import corpus, tokenizer
from mmspec_jax.data.world.scenes import Scene, render, sample_scene
from mmspec_jax.data.world.tasks import TASKS, make_record

FORMAT_VERSION = 1
IMAGE_FOLDER = 'images'
TOKENIZER_FOLDER = 'tokenizer'
SPLITS = ('train', 'test')
DEFAULT_NUM_TRAIN_IMAGES = 3000
DEFAULT_NUM_TEST_IMAGES = 100
DEFAULT_CORPUS_BYTES = 2_000_000
# Independent random streams, so that changing one size leaves the other outputs unchanged.
_TEST_SCENES, _TRAIN_SCENES, _RECORD_TEXT, _CORPUS, _MIXING = range(5)


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


def sample_split_scenes(seed: int, num_train: int, num_test: int
                        ) -> tuple[list[Scene], list[Scene]]:
  """(train scenes, test scenes): test scenes are distinct, and no train scene is a test one."""
  rng = _rng(seed, _TEST_SCENES)
  test: list[Scene] = []
  seen: set[Scene] = set()
  while len(test) < num_test:
    scene = sample_scene(rng)
    if scene not in seen:
      seen.add(scene)
      test.append(scene)
  rng = _rng(seed, _TRAIN_SCENES)
  train: list[Scene] = []
  while len(train) < num_train:
    scene = sample_scene(rng)
    if scene not in seen:  # Repeats within train are fine: they are new images of a scene.
      train.append(scene)
  return train, test


def _write_json(path: str, records: Sequence[dict[str, Any]]):
  # One record per line: valid JSON that is still easy to read and diff.
  with open(path, 'w', encoding='utf-8') as f:
    f.write('[\n' + ',\n'.join(json.dumps(r, ensure_ascii=False) for r in records) + '\n]\n')


def _chat_text(record: dict[str, Any]) -> str:
  """The record as the LLaVA-1.5 text the models read, for tokenizer training."""
  pieces = []
  for turn in record['conversations']:
    pieces.append(f'USER: {turn["value"]}' if turn['from'] == 'human' else
                  f'ASSISTANT: {turn["value"]}')
  return ' '.join(pieces)


def _versions() -> dict[str, str]:
  versions = {'python': platform.python_version()}
  for package in ('mmspec-jax', 'numpy', 'pillow', 'tokenizers', 'transformers'):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = 'not installed'
  return versions


def _check_output_dir(out_dir: str, overwrite: bool):
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise ValueError(f'{out_dir} is not empty; pass overwrite=True (--overwrite) to replace a '
                       'world there, or choose another directory')
    if not os.path.isfile(os.path.join(out_dir, 'manifest.json')):
      raise ValueError(f'{out_dir} is not empty and holds no world (no manifest.json); refusing '
                       'to overwrite it')
    for folder in (IMAGE_FOLDER, TOKENIZER_FOLDER):  # Stale images of a larger world would stay.
      shutil.rmtree(os.path.join(out_dir, folder), ignore_errors=True)


def generate_world(out_dir: str | os.PathLike, *, seed: int = 0,
                   num_train_images: int = DEFAULT_NUM_TRAIN_IMAGES,
                   num_test_images: int = DEFAULT_NUM_TEST_IMAGES,
                   corpus_bytes: int = DEFAULT_CORPUS_BYTES, image_size: int = 64,
                   patch_size: int = 8, vocab_size: int = 512, overwrite: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Generates a world into out_dir (see the module docstring for the layout).

  Args:
    out_dir: output directory; created if missing, must be empty unless overwrite.
    seed: non-negative integer; everything is determined by it and the sizes.
    num_train_images: train scenes/images (each gives one record per task).
    num_test_images: held-out test images, shared by the three tasks (so each test_{task}.json
      has num_test_images records).
    corpus_bytes: approximate size of text_corpus.txt in bytes.
    image_size: picture side in pixels, also the processor's input size.
    patch_size: the vision tower's patch size, written into the processor.
    vocab_size: the BPE tokenizer's vocabulary size.
    overwrite: replace an existing world in out_dir.
    progress: called with a short status line as work advances (e.g. print).
  Returns:
    The manifest (also written to out_dir/manifest.json).
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  if num_train_images < 1 or num_test_images < 1:
    raise ValueError(f'num_train_images and num_test_images must be >= 1, got '
                     f'{num_train_images} and {num_test_images}')
  out_dir = os.fspath(out_dir)
  _check_output_dir(out_dir, overwrite)
  report = progress or (lambda message: None)
  os.makedirs(os.path.join(out_dir, IMAGE_FOLDER), exist_ok=True)

  scenes = dict(zip(SPLITS, sample_split_scenes(seed, num_train_images, num_test_images)))
  total = num_train_images + num_test_images
  done = 0
  records: dict[str, dict[str, list]] = {split: {task: [] for task in TASKS} for split in SPLITS}
  for split_index, split in enumerate(SPLITS):
    for index, scene in enumerate(scenes[split]):
      name = f'{split}_{index:05d}'
      render(scene, image_size).save(os.path.join(out_dir, IMAGE_FOLDER, f'{name}.png'))
      for task_index, task in enumerate(TASKS):
        rng = _rng(seed, _RECORD_TEXT, split_index, index, task_index)
        records[split][task].append(make_record(task, scene, rng, record_id=f'{name}_{task}',
                                                image=f'{name}.png'))
      done += 1
      if done % 500 == 0 or done == total:
        report(f'images and records {done}/{total}')

  files = {}
  for split in SPLITS:
    for task in TASKS:
      files[f'{split}_{task}.json'] = len(records[split][task])
      _write_json(os.path.join(out_dir, f'{split}_{task}.json'), records[split][task])
  mixed = [r for task in TASKS for r in records['train'][task]]
  mixed = [mixed[int(i)] for i in _rng(seed, _MIXING).permutation(len(mixed))]
  files['train_all.json'] = len(mixed)
  _write_json(os.path.join(out_dir, 'train_all.json'), mixed)

  documents = list(corpus.documents(_rng(seed, _CORPUS), corpus_bytes))
  text = '\n\n'.join(documents) + '\n'
  with open(os.path.join(out_dir, 'text_corpus.txt'), 'w', encoding='utf-8') as f:
    f.write(text)
  report(f'text corpus: {len(documents)} documents, {len(text.encode("utf-8"))} bytes')

  # Held-out test text stays out of the tokenizer too.
  tokenizer_texts = [_chat_text(r) for r in mixed] + documents
  trained = tokenizer.train_tokenizer(tokenizer_texts, vocab_size=vocab_size)
  tokenizer.write_processor(trained, os.path.join(out_dir, TOKENIZER_FOLDER),
                            image_size=image_size, patch_size=patch_size)
  report(f'tokenizer: {len(trained)} tokens')

  manifest = {
      'format_version': FORMAT_VERSION, 'seed': int(seed), 'image_size': image_size,
      'patch_size': patch_size, 'num_train_images': num_train_images,
      'num_test_images': num_test_images, 'tasks': list(TASKS), 'image_folder': IMAGE_FOLDER,
      'tokenizer_dir': TOKENIZER_FOLDER, 'records': files,
      'text_corpus': {'documents': len(documents), 'bytes': len(text.encode('utf-8'))},
      'vocab_size': len(trained), 'versions': _versions(),
  }
  with open(os.path.join(out_dir, 'manifest.json'), 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=2)
    f.write('\n')
  return manifest
