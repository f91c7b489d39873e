r"""Input tokens/s of the training pipeline (not part of `make test` or `make bench`).

  python -m mmspec_jax.bench.input_pipeline [--seconds=8] [--workers=0,2]

Three sources, each prepared as TFDS array_record files (what training reads), read through
`make_iterator` exactly as train.py builds it, one host:
  world text       the offline world's text corpus, packed (draft_pretrain: batch 16, seq 128);
  world multimodal the world's LLaVA conversations with their images (target: batch 16, seq 128);
  synthetic text   20,000 documents of 50-800 words, packed (batch 8, seq 1024).
Figures: tokens/s of row slots holding a token (for conversations, tokens before the padding),
measured after the first batch; the first batch's latency (worker start-up) apart. The world is
generated under artifacts/ if missing (as `make demo` does).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mmspec_jax.demo import artifacts
from mmspec_jax.data import builders
from mmspec_jax.data import pipeline


def _synthetic_corpus(path: str, words: list[str], num_docs: int, seed: int = 0):
  """Documents of 50-800 words drawn from `words`, one paragraph each."""
  rng = np.random.default_rng(seed)
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(num_docs):
      f.write(' '.join(rng.choice(words, rng.integers(50, 800))) + '\n\n')


def _measure(make, seconds: float) -> dict:
  start = time.perf_counter()
  iterator = make()
  batch = next(iterator)
  first = time.perf_counter() - start
  start, tokens, count = time.perf_counter(), 0, 0
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    tokens += int((batch['segment_ids'] > 0).sum())
    count += 1
  elapsed = time.perf_counter() - start
  if hasattr(iterator, 'close'):
    iterator.close()
  return {'tokens_per_s': tokens / elapsed, 'batches_per_s': count / elapsed,
          'first_batch_s': first}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=8.0)
  parser.add_argument('--workers', default='0,2',
                      help='comma-separated worker process counts to measure')
  parser.add_argument('--sources', default='world text,world multimodal,synthetic text')
  parser.add_argument('--data_dir', default='', help='TFDS directory (default: a temporary one)')
  args = parser.parse_args(argv)
  from transformers import AutoTokenizer

  from mmspec_jax.data.world import generate_world
  from mmspec_jax.data.processing import MultimodalProcessor
  world = artifacts.world_dir()
  if not os.path.isfile(os.path.join(world, 'manifest.json')):
    generate_world(world, progress=print)
  tokenizer_dir = os.path.join(world, 'tokenizer')
  tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
  processor = MultimodalProcessor.from_pretrained(tokenizer_dir)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='input_bench_')
  synthetic = os.path.join(data_dir, 'synthetic.txt')
  if not os.path.isfile(synthetic):
    with open(f'{world}/text_corpus.txt', encoding='utf-8') as f:
      words = sorted(set(f.read().split()))  # The world's words: its tokenizer knows them.
    _synthetic_corpus(synthetic, words, 20_000)
  builders.prepare('text_corpus', data_dir, config_name='world', files=f'{world}/text_corpus.txt')
  builders.prepare('llava_conversations', data_dir, config_name='world',
                   json_files=f'{world}/train_all.json', image_folder=f'{world}/images')
  builders.prepare('text_corpus', data_dir, config_name='synthetic', files=synthetic)
  cases = {
      'world text': ('pretrain', 'text_corpus/world', 16, 128, {}),
      'world multimodal': ('multimodal', 'llava_conversations/world', 16, 128, dict(
          num_image_tokens=64, image_token_id=4,
          preprocess_images=processor.preprocess_images)),
      'synthetic text': ('pretrain', 'text_corpus/synthetic', 8, 1024, {}),
  }
  workers = [int(w) for w in args.workers.split(',') if w]
  supports_workers = 'workers' in pipeline.make_iterator.__code__.co_varnames
  print(f'{"source":18} {"workers":>7} {"tokens/s":>11} {"batches/s":>10} {"first batch":>12}')
  for name in args.sources.split(','):
    kind, dataset, batch_size, seq_len, extra = cases[name]
    source = builders.load_source(dataset, data_dir,
                                  text_key='text' if kind == 'pretrain' else None)
    for count in workers if supports_workers else [0]:
      options = {'workers': count} if supports_workers else {}
      result = _measure(lambda: pipeline.make_iterator(
          kind, source, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=0,
          **options, **extra), args.seconds)
      print(f'{name:18} {count:7d} {result["tokens_per_s"]:11,.0f} '
            f'{result["batches_per_s"]:10.1f} {result["first_batch_s"]:11.2f}s', flush=True)


if __name__ == '__main__':
  main()
