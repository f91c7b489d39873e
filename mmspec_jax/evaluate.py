r"""The paper's evaluation: tau and MBSU per task x draft x gamma x sampling, and answer quality.

  python -m mmspec_jax.evaluate --target=DIR --draft=language:DIR --draft=adapter:DIR \
      --data_dir=WORLD --tasks=captioning,sqa,conversation --gammas=1,2,3,4,5,6,7 \
      [--shape=3,2,1,1 --shape=1,1,1,1,1,1,1@0.4] \
      --samplings=greedy,sample --max_new_tokens=64 --batch_size=16 --num_examples=32 \
      --out_dir=RESULTS

Reads WORLD/test_{task}.json (LLaVA-format records, images under WORLD/images/), writes
RESULTS/results.json, results.md and tau_vs_gamma.png, prints a progress line per cell to stderr
and the markdown tables to stdout. Bad input stops the run before anything is decoded, with
`error: ...` and a non-zero exit status. The work is `mmspec_jax.evaluation.evaluate`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from mmspec_jax.evaluation import evaluate
from mmspec_jax.evaluation.report import MARKDOWN_FILE
from mmspec_jax.evaluation.run import DEFAULT_GAMMAS, DEFAULT_TASKS, SAMPLINGS

_TARGET = flags.DEFINE_string('target', None, 'Target model directory (HF or converted).')
_DRAFTS = flags.DEFINE_multi_string(
    'draft', [], 'NAME:DIR of a draft, repeatable; NAME "language" or "adapter" is checked '
    'against the model kind.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Holds test_{task}.json and images/.')
_TASKS = flags.DEFINE_list('tasks', list(DEFAULT_TASKS), 'Tasks to evaluate.')
_GAMMAS = flags.DEFINE_list('gammas', [str(g) for g in DEFAULT_GAMMAS],
                            'Draft tokens per step to evaluate.')
_SHAPES = flags.DEFINE_multi_string(
    'shape', [], 'A tree or adaptive length beside the gammas, repeatable: "3,2,1" (branching '
    'per depth), "1,1,1,1,1@0.4" (a chain of 5 that stops below draft confidence 0.4).')
_SAMPLINGS = flags.DEFINE_list('samplings', list(SAMPLINGS),
                               'greedy (temperature 0) and/or sample (temperature 1).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens per answer at most.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Rows decoded together.')
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 32, 'First records of each task used.')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the results go (created if missing).')
_SEED = flags.DEFINE_integer('seed', 0, 'Base PRNG seed.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'float32 | bfloat16 | float16.')


def _gammas(values: list[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f'--gammas must be integers, got {values}') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    for flag in (_TARGET, _DATA_DIR, _OUT_DIR):
      if not flag.value:
        raise ValueError(f'--{flag.name} is required')
    evaluate(_TARGET.value, _DRAFTS.value, _DATA_DIR.value, tasks=_TASKS.value,
             gammas=_gammas(_GAMMAS.value), shapes=_SHAPES.value, samplings=_SAMPLINGS.value,
             max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value,
             num_examples=_NUM_EXAMPLES.value, out_dir=_OUT_DIR.value, seed=_SEED.value,
             dtype=_DTYPE.value)
  except (ValueError, OSError) as e:  # Bad input or paths: the message says it; no traceback.
    sys.exit(f'error: {e}')
  with open(os.path.join(_OUT_DIR.value, MARKDOWN_FILE), encoding='utf-8') as f:
    print(f.read(), end='')
  print(f'wrote {_OUT_DIR.value}/')


if __name__ == '__main__':
  app.run(main)
