r"""`make bench` (mmspec-bench; docs/benchmarks.md): decoding speed, sections 1-7.

  mmspec-bench [--config.sections=6,7] [--config.repeats=3] [--config.out_dir=DIR]
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # Where bench.json, bench.md and the plots go; '' = artifacts/results/bench.
  config.out_dir = ''
  # The sections to run, comma-separated, among 1-7.
  config.sections = '1,2,3,4,5,6,7'
  # Timed runs per figure (the median and the spread are reported).
  config.repeats = 3
  # Where section 1 writes its 1.1B checkpoint; '' = a temporary directory.
  config.work_dir = ''
  return config
