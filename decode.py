r"""Speculative decoding of a JSONL file of prompts (see configs/decode.py for every setting).

  python decode.py --config=configs/decode.py --config.target=DIR [--config.draft=DIR] \
      --config.prompts=IN.jsonl --config.output=OUT.jsonl [--config.num_draft_tokens=5] ...

Writes OUT.jsonl and OUT.summary.json and prints the run statistics. Bad input stops the run
before anything is decoded, with `error: ...` and a non-zero exit status. On several hosts, run
the same command on each with --config.multihost=True (see mmspec_jax/distributed.py).
"""

from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

from mmspec_jax import distributed
from mmspec_jax.decoding import runner, statistics

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/decode.py', lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    stats = runner.run(config)
  except (ValueError, OSError) as e:  # Bad input or paths: the message says it; no traceback.
    sys.exit(f'error: {e}')
  if distributed.is_primary():  # Process 0 wrote the files; it alone reports.
    print(statistics.format_table(stats))
    print(f'wrote {config.output} and {runner.summary_path(config.output)}')


if __name__ == '__main__':
  app.run(main)
