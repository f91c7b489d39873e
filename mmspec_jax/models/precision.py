"""`dtype='auto'`: the decoding precision this host runs fastest.

On TPUs and GPUs that is bfloat16. On CPU it depends on the matmul units and on the calls a
session makes. XLA:CPU multiplies bfloat16 weights stored output-major with float32 accumulation
over 3 to 32 rows for about the price of one row (models/layout.py, `Layout.min_matmul_rows`):
on an Intel Xeon with AMX that costs less than one float32 row; on an AMD EPYC with AVX-512 BF16
but no AMX about as much as one float32 row for a square 4480-wide matrix and more for wider ones,
yet still much less than a float32 verification of several rows. So a decoder that only steps one
token at a time may run faster in float32 while a speculative one, whose target verifies several
tokens per call, runs faster in bfloat16. Rather than read CPU flags, a probe times the session's
kind of call in each precision's decoding layout: a chain of matrix products over weights too
large for the caches, one row (a step) or `VERIFY_ROWS` rows (a verification).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax.models.config import SUPPORTED_DTYPES
from mmspec_jax.models.layers import matmul
from mmspec_jax.models.layout import decoding_default

AUTO = 'auto'
DTYPE_CHOICES = SUPPORTED_DTYPES + (AUTO,)
VERIFY_ROWS = 6  # A chain of 5 draft tokens and the root: decode.py's default.


def _chain(dtype: str, rows: int, verifies: bool, width: int, depth: int):
  """A run of `depth` chained products of `rows` rows with [width, width] weights in the CPU
  decoding layout's form for `dtype` (a target that `verifies` drafts, or not)."""
  layout = decoding_default('cpu', verifies=verifies, dtype=dtype)
  shape = (width, width)  # [out, in] when output-major, else [in, out]: square either way.
  weights = [jnp.asarray(np.random.default_rng(i).standard_normal(shape) / width ** 0.5, dtype)
             for i in range(depth)]

  @jax.jit
  def chain(x, weights):
    for w in weights:
      x = matmul(x, w, output_major=layout.output_major_kernels,
                 min_rows=layout.min_matmul_rows)
    return x

  x = jnp.ones((rows, width), dtype)
  return lambda: chain(x, weights).block_until_ready()


def probe_seconds(dtypes, rows: int, *, verifies: bool = False, width: int = 4096,
                  depth: int = 4, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
  """{dtype: best seconds of `repeats`} for each of `dtypes`: `depth` chained products of `rows`
  rows with [width, width] weights (64 MB each in float32 at the default), in the CPU decoding
  layout's form for that dtype. The dtypes' runs alternate, so the host's drift falls on all."""
  runs = {dtype: _chain(dtype, rows, verifies, width, depth) for dtype in dtypes}
  for run in runs.values():
    for _ in range(warmup):  # Compiles, then the first runs' allocations and thread pools.
      run()
  best = dict.fromkeys(runs, float('inf'))
  for _ in range(repeats):
    for dtype, run in runs.items():
      start = time.perf_counter()
      run()
      best[dtype] = min(best[dtype], time.perf_counter() - start)
  return best


@functools.lru_cache(maxsize=None)
def auto_dtype(backend: str | None = None, *, verifies: bool = False) -> str:
  """'bfloat16' on accelerators; on CPU whichever of bfloat16 and float32 the probe finds faster
  for one-token steps or, when the target `verifies` drafts, for verifications (once per
  process and kind). Logs what it picked and why."""
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    logging.info("dtype='auto': bfloat16 on %s", backend)
    return 'bfloat16'
  rows = VERIFY_ROWS if verifies else 1
  seconds = probe_seconds(('float32', 'bfloat16'), rows, verifies=verifies)
  chosen = min(seconds, key=seconds.get)
  logging.info("dtype='auto' picked %s on this CPU: a chain of %d-row matmuls (%s) took %.1f ms "
               'in bfloat16, %.1f ms in float32', chosen, rows,
               'verifications' if verifies else 'one-token steps', seconds['bfloat16'] * 1e3,
               seconds['float32'] * 1e3)
  return chosen


def resolve(dtype: str, *, verifies: bool = False) -> str:
  """A config's dtype, with 'auto' replaced by `auto_dtype()` for a session whose target
  `verifies` drafts or not; anything unknown refused by name."""
  if dtype not in DTYPE_CHOICES:
    raise ValueError(f'unsupported dtype {dtype!r}; expected one of {DTYPE_CHOICES}')
  return auto_dtype(verifies=verifies) if dtype == AUTO else dtype
