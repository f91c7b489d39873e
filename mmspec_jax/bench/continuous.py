"""Section 6: continuous against static batching, on the same slot programs.

Two workloads on the demo pair, 8 slots, autoregressive and speculative (a chain of 3):
  ragged: 64 requests, each with its own max_new_tokens drawn exponentially (mean 30, at least 1,
    at most 160), EOS off, so the budgets alone make rows ragged;
  eos: the world's held-out prompts with their real EOS (budget 64 each).
Static batching is the same scheduler with `refill=False`: a batch of 8 enters when every slot is
free and runs until its slowest row ends. Continuous batching refills a slot right after the step
in which its row ends (a chunk ends early then, while requests wait), admitting as decode.py does
(`admission_order='longest_first'`: the largest budgets first); on the ragged workload it also
runs in arrival order (first come first served, a server's order). Figures: tokens/s (wall time
from the first admission to the last token, compilation excluded, after a warm-up on the first
requests), slot utilization (active row-steps / slot-steps) overall, while requests waited, and the
ideal for the workload in that admission order (refilled instantly: what the longest requests'
tail leaves of the slots at the end), time to first token and time per output token, and whether
every request's tokens are identical across the runs (and, greedy, to the autoregressive ones).
The speculative ragged case is also run at several `chunk_steps`: long chunks pay fewer host
round trips.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import numpy as np

from mmspec_jax.bench import timing
from mmspec_jax.decoding import statistics
from mmspec_jax.decoding.sampling import SamplingConfig

NUM_SLOTS = 8
NUM_REQUESTS = 64
MEAN_BUDGET, MAX_BUDGET = 30, 160
EOS_BUDGET = 64
GAMMA = 3
CHUNK_STEPS = 8
PREFILL_WIDTH = 4
# Prompts are padded to a multiple of this (the world's prompts are 70-95 tokens; the default
# buckets would pad them to 128, and prefill is a large share of a step's cost on CPU).
BUCKET_MULTIPLE = 32
CHUNK_STEPS_SWEEP = (2, 4, 8, 16, 32)


def ragged_budgets(num: int, seed: int = 0) -> list[int]:
  """max_new_tokens per request: exponential with mean MEAN_BUDGET, in [1, MAX_BUDGET]."""
  draws = np.random.default_rng(seed).exponential(MEAN_BUDGET, num)
  return [int(b) for b in np.clip(np.ceil(draws), 1, MAX_BUDGET)]


def ideal_utilization(steps: list[int], num_slots: int) -> float:
  """The utilization of slots refilled the instant a row ends, for requests taking `steps` steps
  each, admitted in this order: the bound a workload's own tail sets in that order (slots empty
  at the end while the longest requests finish)."""
  loads = [0] * num_slots
  for count in steps:
    loads[loads.index(min(loads))] += count
  return sum(steps) / (num_slots * max(loads)) if max(loads) else 1.0


def run_once(session, decoder, work, *, refill: bool, chunk_steps: int, capacity: int,
             buckets: tuple[int, ...], admission_order: str = 'longest_first'):
  """Decodes `work` ((request, budget) pairs), after a warm-up on its first requests: figures
  and tokens (in `work`'s order)."""
  admission_order = admission_order if refill else 'arrival'  # Static: batches in input order.
  scheduler = session.scheduler(
      decoder, num_slots=NUM_SLOTS, capacity=capacity, chunk_steps=chunk_steps,
      prefill_width=NUM_SLOTS if not refill else PREFILL_WIDTH, refill=refill, buckets=buckets,
      admission_order=admission_order)
  compile_seconds = scheduler.compile([scheduler.bucket(r) for r, _ in work])
  for _ in scheduler.run(work[:2 * NUM_SLOTS]):  # First runs of a program are slower.
    pass
  scheduler.reset_counters()
  finished = {}
  start = time.perf_counter()
  handles = [scheduler.submit(r, b) for r, b in work]
  for event in scheduler.run():
    if event.finished is not None:
      finished[event.handle] = event.finished
  seconds = time.perf_counter() - start
  done = [finished[h] for h in handles]
  admitted = list(range(len(work)))
  if admission_order == 'longest_first':
    admitted.sort(key=lambda i: -work[i][1])  # Stable: ties in arrival order, as the scheduler.
  new_tokens = sum(f.num_generated for f in done)
  stats = statistics.summarize(*statistics.finished_counts(done),
                               num_draft_tokens=decoder.num_draft_tokens)
  latency = statistics.latency_figures(done, start)
  return {
      'tokens_per_second': new_tokens / seconds, 'seconds': seconds, 'new_tokens': new_tokens,
      'slot_utilization': scheduler.utilization, 'chunks': scheduler.chunks,
      'steps': scheduler.slot_steps // NUM_SLOTS, 'prefill_calls': scheduler.prefills,
      'utilization_while_waiting': scheduler.utilization_while_waiting,
      'ideal_utilization': ideal_utilization([done[i].num_target_calls - 1 for i in admitted],
                                             NUM_SLOTS),
      'requests_per_second': len(done) / seconds, 'compile_seconds': compile_seconds,
      'tau': stats.block_efficiency if decoder.num_draft_tokens else None, **latency,
  }, [f.token_ids for f in done]


def run_section(pair, draft_name: str, *, repeats: int, log: Callable[[str], None]) -> dict:
  session, prompts = pair.session, pair.requests
  requests = [prompts[i % len(prompts)] for i in range(NUM_REQUESTS)]
  # Repeated prompts under their own ids: each is its own request.
  requests = [r.__class__(f'{r.id}#{i}', r.line, r.token_ids, r.image, r.seed)
              for i, r in enumerate(requests)]
  workloads = {
      'ragged': ([(r, b) for r, b in zip(requests, ragged_budgets(len(requests)))], ()),
      'eos': ([(r, EOS_BUDGET) for r in prompts[:NUM_REQUESTS]], None),
  }
  results, autoregressive_tokens = {}, {}
  for name, (work, eos) in workloads.items():
    budget = max(b for _, b in work)
    longest = max(len(r.token_ids) for r, _ in work)
    capacity = longest + budget
    buckets = tuple(range(BUCKET_MULTIPLE, longest + BUCKET_MULTIPLE, BUCKET_MULTIPLE))
    run = functools.partial(run_once, session, work=work, capacity=capacity,
                            buckets=buckets)
    for kind, gamma in (('autoregressive', 0), ('speculative', GAMMA)):
      decoder = session.decoder(draft_name if gamma else None, num_draft_tokens=gamma,
                                sampling=SamplingConfig(), max_new_tokens=budget,
                                requests=[r for r, _ in work], eos_token_ids=eos)
      modes = {'static': dict(refill=False), 'continuous': dict(refill=True)}
      if len({b for _, b in work}) > 1:  # Budgets differ: arrival order is another schedule.
        modes['arrival'] = dict(refill=True, admission_order='arrival')
      # The modes interleaved, `repeats` times: a shared VM drifts, and a ratio of two runs
      # made one after the other drifts less than the two figures apart.
      runs, mode_tokens = {mode: [] for mode in modes}, {}
      for _ in range(repeats):
        for mode, settings in modes.items():
          figures, tokens = run(decoder=decoder, chunk_steps=CHUNK_STEPS, **settings)
          runs[mode].append(figures)
          mode_tokens.setdefault(mode, []).append(tokens)
      cell = {mode: timing.median_run(figures) for mode, figures in runs.items()}
      speedup, speedup_range = timing.paired_ratio(runs['continuous'], runs['static'])
      cell.update(speedup=speedup, speedup_range=speedup_range, repeats=repeats)
      if 'arrival' in runs:
        cell['arrival_speedup'] = timing.paired_ratio(runs['arrival'], runs['static'])[0]
      # Greedy: speculative tokens are the autoregressive ones too.
      autoregressive_tokens.setdefault(name, mode_tokens['continuous'][0])
      cell['tokens_identical'] = all(t == autoregressive_tokens[name]
                                     for tokens in mode_tokens.values() for t in tokens)
      static, continuous = cell['static'], cell['continuous']
      if name == 'ragged' and gamma:
        cell['chunk_steps'] = {steps: run(decoder=decoder, refill=True, chunk_steps=steps)[0]
                               for steps in CHUNK_STEPS_SWEEP}
      results[f'{name} {kind}'] = cell
      log(f'[6] {name} {kind}: continuous {continuous["tokens_per_second"]:.0f} tokens/s '
          f'(utilization {continuous["slot_utilization"]:.0%}) against static '
          f'{static["tokens_per_second"]:.0f} ({static["slot_utilization"]:.0%}): '
          f'{cell["speedup"]:.2f}x (median of {repeats}), tokens identical '
          f'{cell["tokens_identical"]}')
  jax.clear_caches()
  return results


def _speedup(cell: dict) -> str:
  """The median speedup, and its range over the repeats."""
  low, high = cell.get('speedup_range', (cell['speedup'], cell['speedup']))
  spread = f' [{low:.2f}-{high:.2f}]' if cell.get('repeats', 1) > 1 else ''
  return f'{cell["speedup"]:.2f}x{spread}'


def markdown(section: dict) -> list[str]:
  """The section's tables."""
  repeats = max(cell.get('repeats', 1) for cell in section.values())
  lines = [f'tokens/s and the other figures: the median run of {repeats} (the lower middle of an '
           'even count), the modes interleaved; speedup: the median of the runs\' paired '
           'continuous / static ratios [their range], so not the ratio of the two medians; the '
           'chunk_steps sweep: one run each.', '',
           '| workload | static tokens/s | continuous tokens/s | speedup | slot utilization '
           'static / continuous (ideal; while waiting) | TTFT p50 / p99 s (continuous) | '
           'TPOT p50 s | steps / prefill calls (static; continuous) | identical |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, cell in section.items():
    s, c = cell['static'], cell['continuous']
    ttft, tpot = c['time_to_first_token'] or {}, c['per_token_latency'] or {}
    lines.append(
        f'| {name} | {s["tokens_per_second"]:.0f} | {c["tokens_per_second"]:.0f} | '
        f'{_speedup(cell)} | {s["slot_utilization"]:.0%} / {c["slot_utilization"]:.0%} '
        f'({c["ideal_utilization"]:.0%}; {c["utilization_while_waiting"] or 0:.0%}) | '
        f'{ttft.get("p50", 0):.3f} / {ttft.get("p99", 0):.3f} | {tpot.get("p50", 0):.4f} | '
        f'{s["steps"]} / {s["prefill_calls"]}; {c["steps"]} / {c["prefill_calls"]} | '
        f'{cell["tokens_identical"]} |')
  for name, cell in section.items():
    if name.startswith('ragged'):
      c = cell['continuous']
      lines += ['', f'{name}: continuous over static tokens/s {cell["speedup"]:.2f}x (goal >= '
                f'1.8: {"met" if cell["speedup"] >= 1.8 else "not met"}); slot utilization '
                f'{c["slot_utilization"]:.0%} (goal >= 90%: '
                f'{"met" if c["slot_utilization"] >= 0.9 else "not met"}; this workload\'s '
                f'ideal {c["ideal_utilization"]:.0%})']
    if 'arrival' in cell:
      a, s = cell['arrival'], cell['static']
      ratio = cell.get('arrival_speedup', a['tokens_per_second'] / s['tokens_per_second'])
      lines += ['', f'{name}, admitted in arrival order (first come first served, a server\'s '
                f'order) instead of the largest budgets first: {a["tokens_per_second"]:.0f} '
                f'tokens/s ({ratio:.2f}x static), '
                f'utilization {a["slot_utilization"]:.0%} (ideal {a["ideal_utilization"]:.0%}; '
                f'{a["utilization_while_waiting"] or 0:.0%} while waiting), {a["steps"]} steps / '
                f'{a["prefill_calls"]} prefill calls, TTFT p50 / p99 '
                f'{(a["time_to_first_token"] or {}).get("p50", 0):.3f} / '
                f'{(a["time_to_first_token"] or {}).get("p99", 0):.3f} s']
  for name, cell in section.items():
    if 'chunk_steps' in cell:
      lines += ['', f'chunk_steps ({name}): ' + ', '.join(
          f'{steps}: {r["tokens_per_second"]:.0f} tokens/s ({r["slot_utilization"]:.0%}, '
          f'{r["chunks"]} chunks)' for steps, r in cell['chunk_steps'].items())]
  return lines
