"""A tiny world to train on: a word tokenizer, a patterned text corpus, LLaVA-format conversations
with images, and a tiny LLaVA target that shares the tokenizer, all in the paper's vocabulary
layout (tiny_hf: base vocabulary 128 ids, <image> 128, <pad> 129, target text vocabulary 136)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image

from mmspec_jax.testing import tiny_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's layout: the draft has the base vocabulary; <image> and <pad> (which pad every batch
# the tokenizer pads) lie past it, inside the target's padded text vocabulary.
DRAFT_VOCAB = tiny_hf.BASE_VOCAB
TARGET_VOCAB = tiny_hf.TEXT_VOCAB


def _words(rng, count):
  """Words w6 .. w125 of the base vocabulary, counting up by a stride."""
  start, stride = rng.integers(6, 120), rng.integers(1, 4)
  return [f'w{6 + (start - 6 + stride * i) % 120}' for i in range(count)]


def write_corpus(directory, num_files=3, docs_per_file=60, seed=0):
  """Counting sequences with a per-document stride: learnable, so the loss can fall."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for index in range(num_files):
    with open(os.path.join(directory, f'part{index}.txt'), 'w') as f:
      for _ in range(docs_per_file):
        f.write(' '.join(_words(rng, int(rng.integers(10, 40)))) + '\n\n')
  return os.path.join(directory, '*.txt')


def write_conversations(directory, num_records=24, seed=0):
  """LLaVA JSON whose answers name the image's brightest channel: images matter."""
  os.makedirs(os.path.join(directory, 'images'), exist_ok=True)
  rng = np.random.default_rng(seed)
  records = []
  for index in range(num_records):
    channel = index % 3
    pixels = rng.integers(0, 60, (28, 28, 3), dtype=np.uint8)
    pixels[..., channel] += 180
    name = f'{index}.png'
    Image.fromarray(pixels).save(os.path.join(directory, 'images', name))
    question = ' '.join(_words(rng, 3))
    answer = ['w100 w101', 'w110 w111', 'w120 w121'][channel] + ' ' + ' '.join(_words(rng, 4))
    records.append({'id': f'r{index}', 'image': name, 'conversations': [
        {'from': 'human', 'value': f'<image>\n{question}'},
        {'from': 'gpt', 'value': answer}]})
  path = os.path.join(directory, 'conversations.json')
  with open(path, 'w') as f:
    json.dump(records, f)
  return path, os.path.join(directory, 'images')


def write_target(directory, seed=0):
  """A tiny LLaVA (HF layout) with the word tokenizer and a 28-pixel CLIP processor."""
  llava = tiny_hf.tiny_llava(seed=seed)
  tiny_hf.save(llava, directory)
  tiny_hf.save_llava_processor(tiny_hf.word_tokenizer(), directory)
  return directory


def pretrain_command(workdir, tokenizer, corpus, data_dir, *flags):
  """train.py's tiny draft pretraining on `corpus`, prepared into `data_dir`."""
  return [sys.executable, os.path.join(REPO, 'train.py'),
          '--config=' + os.path.join(REPO, 'configs', 'draft_pretrain.py') + ':tiny',
          f'--workdir={workdir}', f'--config.tokenizer={tokenizer}',
          f'--config.data.data_dir={data_dir}', '--config.data.prepare.builder=text_corpus',
          f'--config.data.prepare.files={corpus}', f'--config.model.vocab_size={DRAFT_VOCAB}',
          '--config.eval_every_steps=1000', *flags]


def load_stage_config(stage: str, scale: str = 'tiny'):
  spec = importlib.util.spec_from_file_location(stage, os.path.join(REPO, 'configs',
                                                                    f'{stage}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(scale)
