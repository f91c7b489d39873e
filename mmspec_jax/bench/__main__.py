r"""`make bench`: decoding speed against the memory roofline, transformers and our own baseline.

  mmspec-bench [--config.out_dir=artifacts/results/bench] [--config.sections=1,2,3,4,5,6,7]

Sections (each writes its figures into bench.json as soon as it finishes):
  1  a random 1.1B LLaMA, batch 1: our autoregressive tokens/s, transformers `generate` on the same
     weights, and the memory-bandwidth roofline measured in the same run;
  2  batch scaling 1/4/16/64 of autoregressive and speculative decoding (the demo pair);
  3  speculative against autoregressive decoding, measured and predicted, on the demo pair and on
     its target widened function-preservingly to ~1B parameters;
  4  transformers assisted generation on the demo pair's HF exports, text and image prompts;
  5  a decode step's cost at two cache capacities (prompt buckets 256 and 2048) holding the same
     ~60-token prompts, batch 8: it should pay for the live cache, not the allocated one;
  6  continuous against static batching, 8 slots, on a ragged workload (64 requests with their
     own budgets) and one with real EOS: tokens/s, slot utilization, latency, chunk_steps;
  7  the OpenAI-compatible server under 1, 4 and 16 concurrent streaming clients against
     decode.py's offline throughput on the same 64 requests.
Sections 2-4, 6 and 7 need the demo's trained models: they are trained first if missing (`make demo`'s
training, about 10 minutes, not counted in any figure).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import types

import jax

from mmspec_jax import cli
from mmspec_jax.demo import artifacts
from mmspec_jax.bench import (assisted, autoregressive, capacity, continuous, report,
                              serving_load, speculative, widen)
from mmspec_jax.bench.timing import read_bandwidth
from mmspec_jax.convert.export import export_to_hf
from mmspec_jax.convert.loading import load_model
from mmspec_jax.models import parameter_count, precision

SECTIONS = (1, 2, 3, 4, 5, 6, 7)
NEEDS_DEMO_MODELS = {2, 3, 4, 6, 7}
NEEDS_PAIR = {2, 3, 4, 6}  # The demo pair in memory (section 7 serves it from its directories).
TASKS = ('captioning', 'sqa', 'conversation')
# Section 3's trees and adaptive length beside gammas 3 and 5: the best tree of the evaluation
# within 32 verified tokens (README, Trees), a small one, and a chain of 7 stopping below draft
# confidence 0.3.
SHAPES = ('5,1,1,1,1,1', '3,1,1', '1,1,1,1,1,1,1@0.3')
PRECISIONS = autoregressive.DTYPES  # Sections 1 and 3 run in each.
WIDE_PROMPTS, WIDE_NEW_TOKENS = 3, 32  # The widened target's runs (batch 1, greedy).


def _log(line: str):
  print(line, file=sys.stderr, flush=True)


def machine(repeats: int, bandwidth: float) -> dict:
  import torch
  import transformers
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
  return {'cpu': cpu, 'cores': len(os.sched_getaffinity(0)), 'memory_gib': memory,
          'platform': jax.devices()[0].platform, 'jax': jax.__version__,
          'torch': torch.__version__, 'transformers': transformers.__version__,
          'read_bandwidth_gb_s': bandwidth / 1e9, 'repeats': repeats}


def ensure_demo_models():
  """The demo's world and trained pair, trained now if missing (not timed by the benchmark)."""
  from mmspec_jax.demo import pipeline as demo
  if all(artifacts.is_trained(stage) for stage in demo.STAGES):
    return
  _log('the demo models are not trained yet: training them first (make demo\'s training)')
  demo.build_world()
  demo.train_models()


def sections(config) -> list[int]:
  """config.sections ('1,2,3') as a sorted list; bad values named."""
  try:
    chosen = sorted({int(s) for s in config.sections.split(',')})
  except ValueError:
    raise ValueError(f'sections: expected comma-separated numbers, got {config.sections!r}'
                     ) from None
  if not chosen or not set(chosen) <= set(SECTIONS):
    raise ValueError(f'sections: choose among {",".join(map(str, SECTIONS))}, got '
                     f'{config.sections!r}')
  if config.repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {config.repeats}')
  return chosen


def run(config):
  """Runs the sections config names (configs/bench.py); writes and prints the report."""
  args = types.SimpleNamespace(
      sections=sections(config), repeats=config.repeats, work_dir=config.work_dir or None,
      out_dir=config.out_dir or os.path.join(artifacts.results_dir(), 'bench'))
  report.write({}, args.out_dir, final=False)  # A bad --out_dir fails before any work.
  if set(args.sections) & NEEDS_DEMO_MODELS:
    ensure_demo_models()
  start = time.perf_counter()
  results = {}
  if 1 in args.sections:
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
      results['autoregressive'] = autoregressive.run_section(work_dir, repeats=args.repeats,
                                                             log=_log)
    # The bandwidth the roofline used: measured between section 1's runs.
    bandwidth = results['autoregressive']['read_bandwidth']['bytes_per_second']
  else:
    bandwidth = read_bandwidth()['bytes_per_second']
  results = {'machine': machine(args.repeats, bandwidth), **results}
  _log(f'read bandwidth {bandwidth / 1e9:.1f} GB/s')
  threads = results['machine']['cores']
  report.write(results, args.out_dir, final=False)

  if set(args.sections) & NEEDS_PAIR:
    pair = _load_pair('float32')
  if 2 in args.sections:
    results['batch_scaling'] = speculative.batch_scaling(
        pair, (1, 4, 16, 64), gamma=3, num_prompts=64, max_new_tokens=64,
        repeats=args.repeats, log=_log)
    report.write(results, args.out_dir, final=False)
  if 3 in args.sections:
    results['speculative'] = _speculative_section(pair, args, threads)
    report.write(results, args.out_dir, final=False)
  if 4 in args.sections:
    results['assisted'] = assisted.run_section(
        pair, artifacts.hf_export_dir(artifacts.DEMO_TARGET_STAGE),
        artifacts.hf_export_dir(artifacts.DEMO_DRAFT_STAGE), num_prompts=8,
        max_new_tokens=64, gamma=3, repeats=args.repeats, threads=threads, log=_log)
    report.write(results, args.out_dir, final=False)
  if 5 in args.sections:
    results['cache_capacity'] = capacity.run_section(repeats=args.repeats, log=_log)
    report.write(results, args.out_dir, final=False)
  if 6 in args.sections:
    results['continuous'] = continuous.run_section(pair, speculative.DRAFT,
                                                    repeats=args.repeats, log=_log)
    report.write(results, args.out_dir, final=False)
  if 7 in args.sections:
    results['serving'] = serving_load.run_section(repeats=args.repeats, log=_log)

  results['seconds'] = time.perf_counter() - start
  report.write(results, args.out_dir, final=True)
  print(report.markdown(results))
  _log(f'bench finished in {results["seconds"]:.0f}s; results in {args.out_dir}/')


def _speculative_section(pair: speculative.Pair, args, threads: int) -> dict:
  """Section 3 in float32 and bfloat16: the demo pair and its target widened to ~1B, each
  autoregressive and speculative, and transformers' autoregressive decoding of the widened
  target in both precisions; every speculative run on the widened target against the best
  autoregressive decoding of it, whoever's and whichever precision."""
  wide_config, wide_params = _widened_model()
  comparisons = {}
  for dtype in PRECISIONS:
    if dtype != pair.session.dtype:
      pair = _load_pair(dtype)
    comparisons[f'demo target, {dtype}'] = speculative.compare(
        pair, (3, 5), num_prompts=16, max_new_tokens=64, repeats=args.repeats, log=_log,
        label=f'[3/4] demo target, {dtype}', shapes=SHAPES)[0]
    wide = pair.with_target(wide_config, wide_params)
    comparison, wide_tokens = speculative.compare(
        wide, (3, 5), num_prompts=WIDE_PROMPTS, max_new_tokens=WIDE_NEW_TOKENS,
        repeats=args.repeats, log=_log, label=f'[3/4] widened target, {dtype}', shapes=SHAPES,
        verify_sizes=(2, 4, 8, 16, 32))
    if dtype == 'float32':  # Widening preserves the function; bfloat16 rounds sums anew.
      _check_widened(comparison, pair, wide, wide_tokens)
    comparisons[f'widened target, {dtype}'] = comparison
    del wide
  with tempfile.TemporaryDirectory(dir=args.work_dir) as hf_dir:
    export_to_hf(wide_params, wide_config, hf_dir)
    del wide_params
    theirs = {dtype: assisted.transformers_target(
        pair, hf_dir, dtype, num_prompts=WIDE_PROMPTS, max_new_tokens=WIDE_NEW_TOKENS,
        repeats=args.repeats, threads=threads, log=_log) for dtype in PRECISIONS}
  _against_best_autoregressive(comparisons, theirs)
  return comparisons


def _against_best_autoregressive(comparisons: dict, theirs: dict):
  """Adds the widened target's best autoregressive decoding (ours or transformers', either
  precision) and each speculative run's speedup over it."""
  candidates = {f'transformers, {dtype}': run['tokens_per_second']['median']
                for dtype, run in theirs.items() if 'tokens_per_second' in run}
  wide = {label: c for label, c in comparisons.items() if label.startswith('widened')}
  for label, comparison in wide.items():
    candidates[f'ours, {comparison["dtype"]}'] = comparison['autoregressive'][
        'tokens_per_second']['median']
  best = max(candidates, key=candidates.get)
  for comparison in wide.values():
    comparison['transformers_autoregressive'] = theirs
    comparison['best_autoregressive'] = {'decoder': best, 'tokens_per_second': candidates[best],
                                         'candidates': candidates}
    for row in comparison['speculative']:
      row['speedup_over_best_autoregressive'] = (
          row['tokens_per_second']['median'] / candidates[best])
  rows = [(label, row) for label, c in wide.items() for row in c['speculative']]
  label, row = max(rows, key=lambda lr: lr[1]['speedup_over_best_autoregressive'])
  auto = precision.auto_dtype(verifies=True)
  for comparison in wide.values():
    comparison['fastest_speculative_precision'] = wide[label]['dtype']
    comparison['auto_precision'] = auto
  _log(f'[3/4] widened target: best autoregressive {candidates[best]:.2f} tokens/s ({best}); '
       f'best speculative {row["speedup_over_best_autoregressive"]:.2f}x that ({label}, '
       f'{row["shape"] or "gamma " + str(row["gamma"])}); dtype=\'auto\' picks {auto} for a '
       'speculative session')


def _load_pair(dtype: str) -> speculative.Pair:
  return speculative.load_pair(artifacts.export_dir(artifacts.DEMO_TARGET_STAGE),
                               artifacts.export_dir(artifacts.DEMO_DRAFT_STAGE),
                               artifacts.world_dir(), TASKS, num_examples=22,
                               max_new_tokens=64, dtype=dtype)


def _widened_model():
  """The demo target widened to ~1B parameters: canonical (config, float32 params)."""
  config, params = load_model(artifacts.export_dir(artifacts.DEMO_TARGET_STAGE), dtype='float32')
  config, params = widen.widen_to_parameters(config, params, 1e9, jax.random.key(0))
  _log(f'[3/4] target widened to {parameter_count(params) / 1e9:.2f}B parameters '
       f'(hidden {config.text.hidden_size}, {config.text.num_heads} heads, MLP '
       f'{config.text.intermediate_size}, {config.text.num_layers} layers)')
  return config, params


def _check_widened(comparison, pair, wide, wide_tokens):
  """The widened target must decode exactly as the original: same greedy tokens, same logits."""
  original = speculative.decode(pair, 0, 1, len(wide_tokens), WIDE_NEW_TOKENS,
                                repeats=1)['tokens']
  identical = all(a.tolist() == b.tolist() for a, b in zip(original, wide_tokens))
  comparison['outputs_identical_to_original'] = identical
  comparison['logits_max_abs_difference'] = speculative.logits_difference(pair, wide)
  _log(f'[3/4] the widened target decodes exactly as the original: {identical} (logits differ '
       f'by at most {comparison["logits_max_abs_difference"]:.1e})')


def command():
  cli.run_command(cli.main_running(run, (ValueError,)), usage=__doc__, default_config='bench')


if __name__ == '__main__':
  command()
