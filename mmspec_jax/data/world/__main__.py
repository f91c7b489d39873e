"""Generates a synthetic world (see mmspec_jax/data/world/generate.py).

  python -m mmspec_jax.data.world --out_dir=DIR --seed=0 [--num_train_images=3000]
      [--num_test_images=100] [--corpus_bytes=2000000] [--image_size=64] [--overwrite]
"""

import sys
import time

from absl import app, flags

from mmspec_jax.data.world import generate

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Directory to write the world into.',
                               required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed (>= 0); the same seed gives the same bytes.')
_NUM_TRAIN = flags.DEFINE_integer('num_train_images', generate.DEFAULT_NUM_TRAIN_IMAGES,
                                  'Train images (one record per task each).')
_NUM_TEST = flags.DEFINE_integer('num_test_images', generate.DEFAULT_NUM_TEST_IMAGES,
                                 'Held-out test images (one record per task each).')
_CORPUS_BYTES = flags.DEFINE_integer('corpus_bytes', generate.DEFAULT_CORPUS_BYTES,
                                     'Approximate size of text_corpus.txt.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'Image side in pixels.')
_PATCH_SIZE = flags.DEFINE_integer('patch_size', 8, "The vision tower's patch size.")
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 512, 'BPE vocabulary size.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a world already in out_dir.')


def main(argv):
  del argv
  start = time.time()

  def progress(message):
    sys.stderr.write(f'\r[{time.time() - start:6.1f}s] {message}\033[K')
    sys.stderr.flush()

  try:
    manifest = generate.generate_world(
        _OUT_DIR.value, seed=_SEED.value, num_train_images=_NUM_TRAIN.value,
        num_test_images=_NUM_TEST.value, corpus_bytes=_CORPUS_BYTES.value,
        image_size=_IMAGE_SIZE.value, patch_size=_PATCH_SIZE.value, vocab_size=_VOCAB_SIZE.value,
        overwrite=_OVERWRITE.value, progress=progress)
  except ValueError as e:
    sys.stderr.write('\n')
    raise app.UsageError(str(e)) from e
  sys.stderr.write('\n')
  print(f'wrote {_OUT_DIR.value} in {time.time() - start:.1f}s: {manifest["records"]}, '
        f'corpus {manifest["text_corpus"]["bytes"]} bytes, vocabulary {manifest["vocab_size"]}')


if __name__ == '__main__':
  app.run(main)
