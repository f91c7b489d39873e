"""The benchmark's outputs: bench.json (every figure), bench.md (the tables the README shows) and
two plots, batch_scaling.png and speedup.png."""

from __future__ import annotations

import json
import os
from typing import Any

from mmspec_jax.bench import continuous, serving_load

JSON_FILE = 'bench.json'
MARKDOWN_FILE = 'bench.md'
BATCH_PLOT = 'batch_scaling.png'
SPEEDUP_PLOT = 'speedup.png'
GOALS = {'fraction_of_roofline': 0.9, 'speedup_over_transformers': 1.6,
         'measured_over_predicted': 0.9, 'speedup_over_best_autoregressive': 2.5}


def _rate(rate: dict[str, float]) -> str:
  """'median [slowest-fastest]' tokens/s."""
  digits = 1 if rate['median'] < 100 else 0
  return f'{rate["median"]:.{digits}f} [{rate["low"]:.{digits}f}-{rate["high"]:.{digits}f}]'


def _goal(value: float, goal: float) -> str:
  return f'{value:.2f} (goal >= {goal}: {"met" if value >= goal else "not met"})'


def _machine(machine: dict[str, Any]) -> list[str]:
  return [f'Machine: {machine["cpu"]}, {machine["cores"]} cores, {machine["memory_gib"]:.0f} GiB; '
          f'jax {machine["jax"]}, torch {machine["torch"]}, transformers '
          f'{machine["transformers"]}. Read bandwidth measured in this run (the fastest run of '
          f'several read kernels): {machine["read_bandwidth_gb_s"]:.1f} GB/s. Runs compared with '
          'each other are timed round-robin. Figures are medians of '
          f'{machine["repeats"]} runs after warm-up, [slowest-fastest]; compile time apart.', '']


def _autoregressive(section: dict[str, Any]) -> list[str]:
  model = section['model']
  bandwidth = section['read_bandwidth']
  lines = [f'### 1. Autoregressive decoding, {model["parameters"] / 1e9:.2f}B LLaMA (batch 1, '
           f'{section["prompt_length"]}-token prompt, {section["new_tokens"]} new tokens)', '',
           f'Read bandwidth {bandwidth["bytes_per_second"] / 1e9:.1f} GB/s: the fastest run of '
           + ', '.join(f'{name} ({rate["median"] / 1e9:.1f} median, {rate["high"] / 1e9:.1f} '
                       'best)' for name, rate in bandwidth['probes'].items())
           + ', GB/s.', '',
           '| precision | | tokens/s | of roofline | compile / warm-up s | greedy tokens equal to '
           "transformers' |", '|---|---|---|---|---|---|']
  for dtype, run in section['precisions'].items():
    roofline = run['roofline_tokens_per_second']
    lines.append(f'| {dtype} | memory roofline ({run["bytes_per_token"] / 1e9:.2f} GB read per '
                 f'token) | {roofline:.2f} | 100% | | |')
    for name, label, extra in (('ours', 'mmspec-jax (jitted while_loop)', 'compile_seconds'),
                               ('transformers', 'transformers `generate` (torch, '
                                f'{section["threads"]} threads)', 'warmup_seconds')):
      rate = run[name]['tokens_per_second']
      lines.append(f'| {dtype} | {label} | {_rate(rate)} | {rate["median"] / roofline:.0%} | '
                   f'{run[name][extra]:.1f} | '
                   + (f'{run["same_tokens_as_transformers"]}/{section["new_tokens"]}'
                      if name == 'ours' else '') + ' |')
  lines += ['', f'- fraction of roofline (ours, {section["fastest_precision"]}): '
            f'{_goal(section["fraction_of_roofline"], GOALS["fraction_of_roofline"])}',
            f'- speedup over transformers (each in its fastest precision: ours '
            f'{section["fastest_precision"]}, transformers '
            f'{section["transformers_fastest_precision"]}): '
            f'{_goal(section["speedup_over_transformers"], GOALS["speedup_over_transformers"])}',
            f'- `dtype=\'auto\'` picks {section["auto_precision"]} on this host; the fastest '
            f'measured here: {section["fastest_precision"]}', '']
  return lines


def _batch_scaling(rows: list[dict[str, Any]]) -> list[str]:
  lines = ['### 2. Batch scaling (demo pair, greedy)', '',
           '| batch | autoregressive tokens/s | speculative tokens/s (gamma) | tau | speedup |',
           '|---|---|---|---|---|']
  by_batch = {}
  for row in rows:
    by_batch.setdefault(row['batch_size'], {})[row['gamma'] > 0] = row
  for batch, pair in by_batch.items():
    ar, spec = pair[False], pair[True]
    speedup = spec['tokens_per_second']['median'] / ar['tokens_per_second']['median']
    lines.append(f'| {batch} | {_rate(ar["tokens_per_second"])} | '
                 f'{_rate(spec["tokens_per_second"])} ({spec["gamma"]}) | {spec["tau"]:.2f} | '
                 f'{speedup:.2f}x |')
  return lines + ['']


def _speculative(comparisons: dict[str, dict[str, Any]]) -> list[str]:
  lines = ['### 3. Speculative against autoregressive decoding (batch 1, greedy)', '',
           'Predicted from the measured cost of each call (prefills, one target step, one '
           'verification of n tokens, the draft calls) and the run\'s token and step counts; '
           '"decode phase" leaves the prefills out: tau * t_target / (t_drafts + t_verify(n)). '
           'A tree is written by its branching per depth (3x2x1), an adaptive length by its '
           'confidence threshold after "@"; k: draft calls per step, v(n): a verification of n '
           'tokens over one target step.', '',
           '| target | draft | tau | n | k | v(n) | draft/target step cost | AR tokens/s | '
           'speculative tokens/s | predicted (decode phase) | measured | measured / predicted | '
           'same tokens |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for label, comparison in comparisons.items():
    ar = comparison['autoregressive']
    for row in comparison['speculative']:
      lines.append(
          f'| {label} ({comparison["target_parameters"] / 1e6:,.1f}M) | '
          f'{row.get("shape") or "gamma " + str(row["gamma"])} | {row["tau"]:.2f} | '
          f'{row.get("verified_tokens", row["gamma"] + 1)} | '
          f'{row.get("draft_calls_per_step", row["gamma"]):.2f} | '
          f'{row.get("verification_cost", float("nan")):.2f} | '
          f'{row["cost_ratio"]:.2g} | {_rate(ar["tokens_per_second"])} | '
          f'{_rate(row["tokens_per_second"])} | {row["predicted_speedup"]:.2f}x '
          f'({row["predicted_steady_state_speedup"]:.2f}x) | '
          f'{row["measured_speedup"]:.2f}x | '
          f'{_goal(row["measured_over_predicted"], GOALS["measured_over_predicted"])} | '
          f'{"yes" if row["tokens_identical_to_autoregressive"] else "NO"} |')
  for label, comparison in comparisons.items():
    ratios = comparison.get('verification_cost_ratio')
    if ratios:
      lines += ['', f'{label}: v(n), one target call on n tokens against one on 1 token: '
                + ', '.join(f'n = {n}: {ratio:.2f}x' for n, ratio in ratios.items())
                + ' (memory-bound, as on an accelerator at batch 1, it would stay near 1x).']
  lines += _against_best(comparisons)
  return lines + ['']


def _against_best(comparisons: dict[str, dict[str, Any]]) -> list[str]:
  """The widened target's best autoregressive decoding and each precision's best speculative
  run against it."""
  wide = {label: c for label, c in comparisons.items() if 'best_autoregressive' in c}
  if not wide:
    return []
  first = next(iter(wide.values()))
  best = first['best_autoregressive']
  lines = ['', 'Autoregressive decoding of the widened target, tokens/s: ' + ', '.join(
      f'{name} {rate:.2f}' for name, rate in best['candidates'].items())
      + f'; the best: {best["decoder"]}. The fastest speculative decoding runs in '
      f'{first.get("fastest_speculative_precision")}; `dtype=\'auto\'` picks '
      f'{first.get("auto_precision")} for a speculative session on this host.']
  for label, comparison in wide.items():
    row = max(comparison['speculative'], key=lambda r: r['speedup_over_best_autoregressive'])
    what = row.get('shape') or f'gamma {row["gamma"]}'
    goal = 'speedup_over_best_autoregressive'
    lines.append(f'- {label}, best speculative ({what}, tau {row["tau"]:.2f}) over the best '
                 f'autoregressive: {_goal(row[goal], GOALS[goal])}; tokens identical to its '
                 'autoregressive output: '
                 f'{"yes" if row["tokens_identical_to_autoregressive"] else "NO"}')
  return lines


def _assisted(section: dict[str, Any]) -> list[str]:
  lines = ['### 4. Against transformers assisted generation (demo pair, batch 1, greedy)', '',
           '| prompts | run | tokens/s | rows identical to ours (autoregressive) |',
           '|---|---|---|---|']
  for kind, runs in section.items():
    for name, run in runs.items():
      figure = _rate(run['tokens_per_second']) if 'tokens_per_second' in run else (
          f'error: `{run["error"]}`')
      same = run.get('rows_identical_to_ours_autoregressive', '')
      lines.append(f'| {kind} | {name} | {figure} | {same} |')
  return lines + ['']


def _capacity(section: dict[str, Any]) -> list[str]:
  model = section['model']
  lines = ['### 5. A decode step at two cache capacities (the same prompts, batch '
           f'{section["batch_size"]})', '',
           f'A random {model["parameters"] / 1e6:.0f}M-parameter LLaMA '
           f'({model["weight_bytes"] / 1e9:.2f} GB of weights), {section["mean_prompt_tokens"]:.0f}'
           f'-token prompts on average, {section["live_tokens"]:.0f} positions live per row; '
           'one step = one 1-token extend of the batch, timed in a jitted loop of calls.', '',
           '| prompt bucket | cache capacity | cache bytes | step ms | prefill ms '
           '| step ms from generate - prefill |', '|---|---|---|---|---|---|']
  for row in section['rows']:
    lines.append(f'| {row["prompt_bucket"]} | {row["cache_capacity"]} | '
                 f'{row["cache_bytes"] / 1e9:.2f} GB | {row["step_ms"]:.2f} '
                 f'[{row["step_ms_low"]:.2f}-{row["step_ms_high"]:.2f}] | '
                 f'{row["prefill_ms"]:.0f} | {row["generate_step_ms"]:.2f} |')
  ratio = section['step_ratio']
  return lines + ['', f'Step time at the larger capacity over the smaller: {ratio:.2f}x '
                  f'(goal <= 1.2: {"met" if ratio <= 1.2 else "not met"}).', '']


def markdown(results: dict[str, Any]) -> str:
  lines = _machine(results['machine'])
  if 'autoregressive' in results:
    lines += _autoregressive(results['autoregressive'])
  if 'batch_scaling' in results:
    lines += _batch_scaling(results['batch_scaling'])
  if 'speculative' in results:
    lines += _speculative(results['speculative'])
  if 'assisted' in results:
    lines += _assisted(results['assisted'])
  if 'cache_capacity' in results:
    lines += _capacity(results['cache_capacity'])
  if 'continuous' in results:
    lines += ['', '### 6. Continuous against static batching (demo pair, 8 slots, greedy)', '']
    lines += continuous.markdown(results['continuous'])
  if 'serving' in results:
    lines += ['', '### 7. The server under load (demo pair, 8 slots, greedy, 64 chat requests '
              'with images)', '']
    lines += serving_load.markdown(results['serving'])
  return '\n'.join(lines)


def _plots(results: dict[str, Any], out_dir: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if 'batch_scaling' in results:
    fig, ax = plt.subplots(figsize=(5, 4))
    for speculative, label in ((False, 'autoregressive'), (True, 'speculative')):
      rows = [r for r in results['batch_scaling'] if (r['gamma'] > 0) == speculative]
      ax.errorbar([r['batch_size'] for r in rows],
                  [r['tokens_per_second']['median'] for r in rows],
                  yerr=[[r['tokens_per_second']['median'] - r['tokens_per_second']['low']
                         for r in rows],
                        [r['tokens_per_second']['high'] - r['tokens_per_second']['median']
                         for r in rows]], marker='o', capsize=3, label=label)
    ax.set(xscale='log', yscale='log', xlabel='batch size', ylabel='tokens/s',
           title='Demo pair: throughput by batch size')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, BATCH_PLOT), dpi=120)
    plt.close(fig)
  if 'speculative' in results:
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, comparison in results['speculative'].items():
      rows = comparison['speculative']
      ax.plot([r['predicted_speedup'] for r in rows], [r['measured_speedup'] for r in rows],
              'o', label=label)
    limit = max([1.0] + [max(r['predicted_speedup'], r['measured_speedup'])
                         for c in results['speculative'].values() for r in c['speculative']])
    ax.plot([0, limit * 1.1], [0, limit * 1.1], 'k--', linewidth=1, label='measured = predicted')
    ax.set(xlabel='predicted speedup', ylabel='measured speedup',
           title='Speculative vs autoregressive (batch 1)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, SPEEDUP_PLOT), dpi=120)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: str, *, final: bool):
  """bench.json always (so an interrupted run keeps its sections); markdown and plots at the end."""
  os.makedirs(out_dir, exist_ok=True)
  temporary = os.path.join(out_dir, JSON_FILE + '.tmp')
  with open(temporary, 'w') as f:
    json.dump({**results, 'complete': final}, f, indent=1,
              default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
  os.replace(temporary, os.path.join(out_dir, JSON_FILE))
  if final:
    with open(os.path.join(out_dir, MARKDOWN_FILE), 'w') as f:
      f.write(markdown(results) + '\n')
    _plots(results, out_dir)
