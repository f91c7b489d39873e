r"""Converts a Hugging Face LLaVA or LLaMA directory into an orbax checkpoint this package loads.

  python -m mmspec_jax.convert --hf_dir=llava-1.5-7b-hf --out_dir=llava-7b-jax [--dtype=bfloat16]

Writes OUT/mmspec_config.json, OUT/params/ (orbax) and the tokenizer/processor files. `decode.py`
and `load_model` accept OUT or the HF directory itself.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from mmspec_jax.convert.hf_config import ConversionError
from mmspec_jax.convert.loading import load_model, save_converted
from mmspec_jax.models import parameter_count
from mmspec_jax.models.config import SUPPORTED_DTYPES

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face model directory.', required=True)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Output directory (new or empty).', required=True)
_DTYPE = flags.DEFINE_enum('dtype', 'float32', list(SUPPORTED_DTYPES),
                           'Parameter and compute dtype of the converted model.')
_ALLOW_PICKLE = flags.DEFINE_bool(
    'allow_pickle', False, 'Allow pickled pytorch_model*.bin weights (they can run code).')


def main(argv):
  del argv
  start = time.time()
  try:
    config, params = load_model(_HF_DIR.value, dtype=_DTYPE.value,
                                allow_pickle=_ALLOW_PICKLE.value,
                                progress=lambda line: print(line, flush=True))
    print(f'converted {parameter_count(params):,} parameters in {time.time() - start:.1f}s; '
          f'writing {_OUT_DIR.value}', flush=True)
    save_converted(_OUT_DIR.value, config, params, source_dir=_HF_DIR.value)
  except ConversionError as e:
    sys.exit(f'error: {e}')
  print(f'done in {time.time() - start:.1f}s: {_OUT_DIR.value}')


if __name__ == '__main__':
  app.run(main)
