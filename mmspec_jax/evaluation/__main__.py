r"""The paper's evaluation: tau and MBSU per task x draft x gamma x sampling, and answer quality.

  mmspec-evaluate --config.target=DIR --config.drafts=language:DIR,adapter:DIR \
      --config.data_dir=WORLD --config.out_dir=RESULTS [--config.tasks=captioning,sqa] \
      [--config.gammas=1,3,5] [--config.shapes='3,2,1;1,1,1,1,1,1,1@0.4'] \
      [--config.samplings=greedy,sample] [--config.max_new_tokens=64] [--config.batch_size=16]

Reads WORLD/test_{task}.json (LLaVA-format records, images under WORLD/images/), writes
RESULTS/results.json, results.md and tau_vs_gamma.png, prints a progress line per cell to stderr
and the markdown tables to stdout. Bad input stops the run before anything is decoded, with
`error: ...` and a non-zero exit status. The work is `mmspec_jax.evaluation.evaluate`.
"""

from __future__ import annotations

import os

from mmspec_jax import cli
from mmspec_jax.evaluation import evaluate
from mmspec_jax.evaluation.report import MARKDOWN_FILE


def _items(value: str, separator: str = ',') -> list[str]:
  return [item.strip() for item in value.split(separator) if item.strip()]


def _gammas(value: str) -> list[int]:
  try:
    return [int(v) for v in _items(value)]
  except ValueError as e:
    raise ValueError(f'gammas must be comma-separated integers, got {value!r}') from e


def run(config):
  """Runs the evaluation config describes (configs/evaluate.py) and prints its tables."""
  for name in ('target', 'data_dir', 'out_dir'):
    if not config[name]:
      raise ValueError(f'config.{name} is empty: pass --config.{name}=...')
  evaluate(config.target, _items(config.drafts), config.data_dir, tasks=_items(config.tasks),
           gammas=_gammas(config.gammas), shapes=_items(config.shapes, ';'),
           samplings=_items(config.samplings), max_new_tokens=config.max_new_tokens,
           batch_size=config.batch_size, num_examples=config.num_examples,
           out_dir=config.out_dir, seed=config.seed, dtype=config.dtype)
  with open(os.path.join(config.out_dir, MARKDOWN_FILE), encoding='utf-8') as f:
    print(f.read(), end='')
  print(f'wrote {config.out_dir}/')


def command():
  cli.run_command(cli.main_running(run), usage=__doc__, default_config='evaluate')


if __name__ == '__main__':
  command()
