"""`dtype='auto'`: the decoding precision this host runs fastest.

On TPUs and GPUs that is bfloat16. On CPU it depends on the matmul units: on a Xeon with AVX-512
BF16 and AMX, bfloat16 weights stored output-major and multiplied with float32 accumulation over at
least 3 rows cost less than one float32 row (models/layout.py, `Layout.min_matmul_rows`); on a
CPU without them bfloat16 is several times slower than float32. Rather than read CPU flags, a
probe times one decode step's kind of work in both forms: a chain of matrix-vector products over
weights too large for the caches, as a batch-1 step reads them.
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
from mmspec_jax.models.layout import CPU_BFLOAT16_MIN_ROWS

AUTO = 'auto'
DTYPE_CHOICES = SUPPORTED_DTYPES + (AUTO,)


def probe_seconds(dtype: str, *, width: int = 2048, depth: int = 8, repeats: int = 5) -> float:
  """Best-of-`repeats` seconds of `depth` chained one-row products with [width, width] weights
  (64 MB in float32 at the default), in the decoding layout's form for `dtype` on this backend."""
  low = dtype != 'float32'
  weights = [jnp.asarray(np.random.default_rng(i).standard_normal((width, width)) / width ** 0.5,
                         dtype) for i in range(depth)]  # [out, in] each: output-major.
  min_rows = CPU_BFLOAT16_MIN_ROWS if low else 1

  @jax.jit
  def chain(x, weights):
    for w in weights:
      x = matmul(x, w, output_major=True, min_rows=min_rows)
    return x

  x = jnp.ones((1, width), dtype)
  chain(x, weights).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    chain(x, weights).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


@functools.lru_cache(maxsize=None)
def auto_dtype(backend: str | None = None) -> str:
  """'bfloat16' on accelerators; on CPU whichever of bfloat16 and float32 the probe finds faster
  (once per process). Logs what it picked and why."""
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    logging.info("dtype='auto': bfloat16 on %s", backend)
    return 'bfloat16'
  seconds = {dtype: probe_seconds(dtype) for dtype in ('float32', 'bfloat16')}
  chosen = min(seconds, key=seconds.get)
  logging.info("dtype='auto' picked %s on this CPU: a one-row matmul chain took %.1f ms in "
                  'bfloat16, %.1f ms in float32', chosen, seconds['bfloat16'] * 1e3,
                  seconds['float32'] * 1e3)
  return chosen


def resolve(dtype: str) -> str:
  """A config's dtype, with 'auto' replaced by `auto_dtype()`; anything unknown refused by name."""
  if dtype not in DTYPE_CHOICES:
    raise ValueError(f'unsupported dtype {dtype!r}; expected one of {DTYPE_CHOICES}')
  return auto_dtype() if dtype == AUTO else dtype
