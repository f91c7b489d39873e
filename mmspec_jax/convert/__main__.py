r"""Converts a Hugging Face LLaVA or LLaMA checkpoint into an orbax checkpoint this package loads.

  mmspec-convert --config.hf_dir=llava-1.5-7b-hf --config.out_dir=llava-7b-jax \
      [--config.dtype=bfloat16]

hf_dir may be a Hub id (org/name) in the local Hugging Face cache. Writes OUT/mmspec_config.json,
OUT/params/ (orbax) and the tokenizer/processor files. decode.py and `load_model` accept OUT or
the HF directory itself.
"""

from __future__ import annotations

import time

from mmspec_jax import cli


def run(config):
  """Converts config.hf_dir into config.out_dir, printing progress."""
  from mmspec_jax.convert.hub import resolve_model
  from mmspec_jax.convert.loading import load_model, save_converted
  from mmspec_jax.models import parameter_count
  from mmspec_jax.models.config import SUPPORTED_DTYPES
  for name in ('hf_dir', 'out_dir'):
    if not config[name]:
      raise ValueError(f'config.{name} is empty: pass --config.{name}=PATH')
  if config.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'unsupported dtype {config.dtype!r}; expected one of {SUPPORTED_DTYPES}')
  start = time.time()
  hf_dir = resolve_model(config.hf_dir)
  model_config, params = load_model(hf_dir, dtype=config.dtype, allow_pickle=config.allow_pickle,
                                    progress=lambda line: print(line, flush=True))
  print(f'converted {parameter_count(params):,} parameters in {time.time() - start:.1f}s; '
        f'writing {config.out_dir}', flush=True)
  save_converted(config.out_dir, model_config, params, source_dir=hf_dir)
  print(f'done in {time.time() - start:.1f}s: {config.out_dir}')


def command():
  from mmspec_jax.convert.hf_config import ConversionError
  cli.run_command(cli.main_running(run, (ConversionError, ValueError, OSError)), usage=__doc__,
                  default_config='convert')


if __name__ == '__main__':
  command()
