"""Timing primitives: medians with their spread, compile time kept apart, read bandwidth.

Every figure the benchmark reports is a `Timing`: the median of several runs of an already
compiled (or already warmed-up) function, with the fastest and slowest run, so a reader sees the
noise. Compilation (or, for torch, the first warm-up call) is timed once, separately.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per run over `runs` runs (after warm-up)."""
  median: float
  low: float
  high: float
  runs: int

  @classmethod
  def of(cls, seconds: list[float]) -> Timing:
    return cls(median=statistics.median(seconds), low=min(seconds), high=max(seconds),
               runs=len(seconds))

  def rate(self, amount: float) -> dict[str, float]:
    """amount per second at the median, and at the slowest and fastest run."""
    return {'median': amount / self.median, 'low': amount / self.high,
            'high': amount / self.low}

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def median_run(runs: list[dict]) -> dict:
  """The run with the median tokens/s (the lower middle one of an even count)."""
  return sorted(runs, key=lambda r: r['tokens_per_second'])[(len(runs) - 1) // 2]


def paired_ratio(runs: list[dict], baselines: list[dict]) -> tuple[float, tuple[float, float]]:
  """The median of runs[i] / baselines[i] tokens/s, and their range: pairs timed one after the
  other, as a shared VM drifts less between two runs than over a whole section."""
  ratios = [r['tokens_per_second'] / b['tokens_per_second'] for r, b in zip(runs, baselines)]
  return float(np.median(ratios)), (min(ratios), max(ratios))


def time_runs(run: Callable[[], Any], *, repeats: int, warmup: int = 1) -> Timing:
  """Times `run()` (which must block until its result is ready) `repeats` times."""
  for _ in range(warmup):
    run()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return Timing.of(seconds)


def compile_timed(jitted, *args, **static) -> tuple[Any, float]:
  """(compiled executable, seconds to lower and compile) of a jitted function."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **static).compile()
  return compiled, time.perf_counter() - start


class Timed:
  """A prepared (compiled, warmed-up) run; `time_once()` times one more run of it. A run that
  repeats its work `per_run` times (e.g. a jitted loop of calls) records seconds per repetition."""

  def __init__(self, run: Callable[[], Any], per_run: int = 1):
    self._run = run
    self.per_run = per_run
    self.seconds: list[float] = []

  def warm_up(self):
    """One untimed run: a program's first runs are slower (allocations, thread pools)."""
    self._run()

  def time_once(self):
    start = time.perf_counter()
    self._run()
    self.seconds.append((time.perf_counter() - start) / self.per_run)

  def timing(self) -> Timing:
    return Timing.of(self.seconds)


def call_timer(call, params, carry, min_calls: int = 1) -> Timed:
  """`carry = call(params, carry)` repeated n times inside one jitted loop, timed per call (see
  `speculative.call_costs`); params are arguments, never constants folded into the program.

  The loop copies its carry in once per run (the argument is not donated), so with a large carry
  (a KV cache) ask for enough calls (`min_calls`) that the copy is a small share of the run.
  """
  single = jax.jit(call)
  jax.block_until_ready(single(params, carry))
  once = time_runs(lambda: jax.block_until_ready(single(params, carry)), repeats=3,
                   warmup=0).median
  calls = int(max(min_calls, min(200, max(1, 0.2 // max(once, 1e-6)))))
  loop = jax.jit(lambda p, c: jax.lax.fori_loop(0, calls, lambda _, c: call(p, c), c))
  run = lambda: jax.block_until_ready(loop(params, carry))
  run()
  return Timed(run, per_run=calls)


def interleaved(timed, repeats: int):
  """Times every run `repeats` times, round-robin, so drift in the machine's speed (a shared VM
  varies by tens of percent over minutes) falls on all of them alike."""
  for _ in range(repeats):
    for run in timed:
      run.time_once()


PROBE_WIDTH = 4096  # Columns of the probes' matrices.


def bandwidth_probes(num_bytes: int = 1 << 29) -> dict[str, Timed]:
  """Kernels that each read `num_bytes` (far past the caches) once per run, on the executor the
  decoder runs on: a jitted sum over float32, a float32 matrix-vector product and a bfloat16
  matrix product over three rows with float32 accumulation (the decoding layouts' forms, weights
  [out, in]). Which one streams fastest depends on the host; `read_bandwidth` takes the best."""
  from mmspec_jax.models.layers import matmul  # pylint: disable=import-outside-toplevel
  rows = lambda itemsize: num_bytes // itemsize // PROBE_WIDTH
  flat = jnp.ones((num_bytes // 4,), jnp.float32)  # [N]
  single = jnp.ones((rows(4), PROBE_WIDTH), jnp.float32)  # [out, in]
  half = jnp.ones((rows(2), PROBE_WIDTH), jnp.bfloat16)  # [out, in]
  x32 = jnp.ones((1, PROBE_WIDTH), jnp.float32)
  x16 = jnp.ones((3, PROBE_WIDTH), jnp.bfloat16)
  kernels = {
      'float32 sum': (jax.jit(jnp.sum), flat),
      'float32 matrix-vector': (jax.jit(lambda w: matmul(x32, w, output_major=True)), single),
      'bfloat16 3-row matmul': (jax.jit(lambda w: matmul(x16, w, output_major=True)), half),
  }
  probes = {}
  for name, (kernel, array) in kernels.items():
    run = functools.partial(lambda kernel, array: kernel(array).block_until_ready(), kernel,
                            array)
    run()
    run()
    probes[name] = Timed(run)
  return probes


def best_bandwidth(probes: dict[str, Timed], num_bytes: int) -> dict[str, Any]:
  """The read bandwidth: bytes/s of the fastest run of any probe (a decode step reads its
  weights no faster than the best of these kernels reads as many bytes), with each probe's
  median and best for the record."""
  rates = {name: probe.timing().rate(num_bytes) for name, probe in probes.items()}
  best = max(rates, key=lambda name: rates[name]['high'])
  return {'bytes_per_second': rates[best]['high'], 'kernel': best, 'probes': rates,
          'probe_bytes': num_bytes}


def read_bandwidth(num_bytes: int = 1 << 29, *, repeats: int = 7) -> dict[str, Any]:
  """`best_bandwidth` of `bandwidth_probes`, each timed `repeats` times round-robin."""
  probes = bandwidth_probes(num_bytes)
  interleaved(list(probes.values()), repeats)
  return best_bandwidth(probes, num_bytes)


def parameter_bytes(params) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
