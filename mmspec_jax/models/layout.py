"""How a LLaMA decoder's weights are arranged and its cached attention computed.

This is execution, not architecture: the same checkpoint runs in any layout, and a layout is chosen
by config (`decode.py --config.layout.*`), never guessed from the params tree. Checkpoints, training
and conversion use the canonical layout (`Layout()`: one scanned stack, separate projections);
`arrange_params` turns canonical params into another layout once, at load.

Axis legend: L layers, D model dim, N query heads, K kv heads, G query heads per kv head (N = K*G),
H head dim, F MLP dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmspec_jax.models.config import SUPPORTED_DTYPES

LAYER_STACKS = ('scanned', 'unrolled')
# 'blockwise': pure JAX, online softmax over the cache's live blocks only; runs on every backend
# and is the reference. 'xla' / 'cudnn': jax.nn.dot_product_attention's implementations (cuDNN's
# fused flash kernel on NVIDIA GPUs) over the whole cache, masked by each row's length. 'pallas':
# the TPU paged-attention kernel JAX ships (jax.experimental.pallas.ops.tpu), which reads each
# row's live pages only; it needs the cache stored heads first (see `cache_heads_first`).
ATTENTION_KERNELS = ('blockwise', 'xla', 'cudnn', 'pallas')
# KV slots per page of the 'pallas' kernel's cache: a multiple of 8 sublanes (float32) and of 16
# (bfloat16) on a TPU.
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Layout:
  # 'scanned': params['layers'] stacked [L, ...] and run by nn.scan (one compiled layer body; TPU
  # matmuls read a layer's slice in place). 'unrolled': params['layers_0'], ['layers_1'], ...
  # one array per layer (XLA:CPU and cuBLAS cannot feed a dot from a slice of the stacked array
  # and copy it out first, tripling the bytes a decode step moves).
  layers: str = 'scanned'
  # One q/k/v matmul (kernel [D, K, G + 2, H]) and one gate/up matmul ([D, 2, F]): a decode step's
  # small matmuls are bandwidth-bound, and one wider matmul streams its weights better than three.
  fused_projections: bool = False
  # Every matmul kernel of the language model stored [*out, *in] instead of [*in, *out]. On
  # XLA:CPU a one-row matmul (a decode step) then streams the weights at the read bandwidth
  # (measured 28.9 GB/s against 23.2 input-major, 1B-model shapes), while several rows (a
  # verification) stream slower (11 GB/s against 15-17): so for the draft and autoregressive
  # decoding, not for a target that verifies drafts.
  output_major_kernels: bool = False
  # Matmuls over fewer rows are padded with zero rows up to this many. 8 chained [M, 4480] x
  # [4480, 4480], bfloat16 output-major kernels, float32 accumulation: on a 2-core Xeon with
  # AVX-512 BF16 and AMX 152 ms at M = 1, 15 ms at M = 2 and 12.6-14.3 ms for M = 3..32; on a
  # 2-core AMD EPYC with AVX-512 BF16 (no AMX) 226 ms at M = 1, 19-22 ms for M = 2..6, 29 at 16.
  # One row takes another kernel, whose results differ in the last bits (on the Xeon so do two
  # rows). At 3 a one-token step runs the kernel and the arithmetic of a verification.
  min_matmul_rows: int = 1
  # The KV cache's dtype; '' = the model's compute dtype. XLA:CPU has no bfloat16 scatter: a
  # bfloat16 cache is converted to float32 and back, whole, around every write (2 per layer per
  # call), which costs more than the cache it saves once the cache is long. A float32 cache
  # holds the bfloat16 keys and values exactly.
  cache_dtype: str = ''
  attention: str = 'blockwise'
  # KV slots per block of the blockwise attention (a row's last block may be partly filled), and
  # per compute block of the 'pallas' kernel (a multiple of PAGE_SIZE; the cache's capacity is
  # then rounded up to a multiple of it).
  attention_block_size: int = 256

  def __post_init__(self):
    if self.layers not in LAYER_STACKS:
      raise ValueError(f'unknown layout.layers {self.layers!r}; expected one of {LAYER_STACKS}')
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f'unknown layout.attention {self.attention!r}; expected one of '
                       f'{ATTENTION_KERNELS}')
    if self.cache_dtype not in ('',) + SUPPORTED_DTYPES:
      raise ValueError(f"unknown layout.cache_dtype {self.cache_dtype!r}; expected '' (the "
                       f"model's) or one of {SUPPORTED_DTYPES}")
    if self.min_matmul_rows < 1:
      raise ValueError(f'layout.min_matmul_rows must be >= 1, got {self.min_matmul_rows}')
    if self.attention_block_size < 1:
      raise ValueError(f'layout.attention_block_size must be >= 1, got '
                       f'{self.attention_block_size}')
    if self.attention == 'pallas' and self.attention_block_size % PAGE_SIZE:
      raise ValueError(f"layout.attention='pallas' reads the cache in pages of {PAGE_SIZE} slots: "
                       f'layout.attention_block_size must be a multiple of {PAGE_SIZE}, got '
                       f'{self.attention_block_size}')

  @property
  def cache_heads_first(self) -> bool:
    """Whether the KV cache is stored [K, L, B, S, H] rather than [L, B, S, K, H]: the TPU
    paged kernel reads pages [K, pages, PAGE_SIZE, H], which the heads-first cache is, reshaped
    (no copy), while the sequence-major one would be transposed on every call."""
    return self.attention == 'pallas'

  def cache_capacity(self, max_length: int) -> int:
    """The cache slots per row that hold `max_length` positions in this layout: the 'pallas'
    kernel visits whole compute blocks, so it rounds up to a multiple of one."""
    if self.attention != 'pallas':
      return max_length
    return -(-max_length // self.attention_block_size) * self.attention_block_size

  @property
  def scanned(self) -> bool:
    return self.layers == 'scanned'


CANONICAL = Layout()


# XLA:CPU's fast matmul for bfloat16: output-major kernels, float32 accumulation, at least this
# many rows (`Layout.min_matmul_rows`).
CPU_BFLOAT16_MIN_ROWS = 3


def decoding_default(backend: str | None = None, *, verifies: bool = False,
                     dtype: str = 'float32') -> Layout:
  """The layout decoding uses unless told otherwise: scanned on TPU, unrolled elsewhere; fused.

  On CPU in float32, output-major kernels for a model that only ever runs one token per row at a
  time (a draft, a target decoding alone) and input-major ones for a target that `verifies`
  drafts (float32 streams several rows faster input-major). In bfloat16, output-major kernels for
  every model and matmuls padded to `CPU_BFLOAT16_MIN_ROWS` rows: that form costs about the same
  for 3 to 16 rows, about one float32 row or less (docs/design.md, bfloat16 on CPU)."""
  backend = backend or jax.default_backend()
  low_precision = dtype == 'bfloat16' and backend == 'cpu'
  return Layout(layers='scanned' if backend == 'tpu' else 'unrolled', fused_projections=True,
                output_major_kernels=backend == 'cpu' and (low_precision or not verifies),
                min_matmul_rows=CPU_BFLOAT16_MIN_ROWS if low_precision else 1,
                cache_dtype='float32' if low_precision else '')


def layer_name(index: int) -> str:
  """Where the unrolled layout keeps layer `index`'s params."""
  return f'layers_{index}'


def _fuse(layers, num_kv_heads: int):
  """Stacked canonical layer params -> the same with qkv_proj and gate_up_proj."""
  attention = dict(layers['self_attn'])
  query = attention.pop('q_proj')['kernel']  # [L, D, N, H]
  key = attention.pop('k_proj')['kernel']  # [L, D, K, H]
  value = attention.pop('v_proj')['kernel']
  num_layers, width, num_heads, head_dim = query.shape
  grouped = query.reshape(num_layers, width, num_kv_heads, num_heads // num_kv_heads, head_dim)
  attention['qkv_proj'] = {'kernel': jnp.concatenate(
      [grouped, key[:, :, :, None], value[:, :, :, None]], axis=3)}  # [L, D, K, G + 2, H]
  mlp = dict(layers['mlp'])
  gate, up = mlp.pop('gate_proj')['kernel'], mlp.pop('up_proj')['kernel']  # [L, D, F]
  mlp['gate_up_proj'] = {'kernel': jnp.stack([gate, up], axis=2)}  # [L, D, 2, F]
  return {**layers, 'self_attn': attention, 'mlp': mlp}


# Input axes of each matmul kernel of the language model (the rest are its outputs).
_NUM_INPUT_AXES = {'o_proj': 2}


def _output_major(params, stacked: bool):
  """Every Dense kernel (a leaf named 'kernel') moved from [*in, *out] to [*out, *in]."""
  def move(path, kernel):
    names = [getattr(entry, 'key', None) for entry in path]
    if names[-1] != 'kernel':
      return kernel
    lead = 1 if stacked and 'layers' in names else 0  # The scanned [L] axis stays first.
    num_in = _NUM_INPUT_AXES.get(names[-2], 1)
    axes_in = list(range(lead, lead + num_in))
    axes_out = list(range(lead + num_in, kernel.ndim))
    if names[-2] == 'gate_up_proj':  # [D, 2, F] -> [F, 2, D]: F major (llama.Mlp says why).
      axes_out = axes_out[::-1]
    return jnp.transpose(kernel, list(range(lead)) + axes_out + axes_in)
  return jax.tree_util.tree_map_with_path(move, params)


def _arrange(params, layout: Layout, num_kv_heads: int):
  layers = params['layers']
  if layout.fused_projections:
    layers = _fuse(layers, num_kv_heads)
  if layout.output_major_kernels:
    params = _output_major({**params, 'layers': layers}, stacked=True)
    layers = params['layers']
  rest = {name: value for name, value in params.items() if name != 'layers'}
  if layout.scanned:
    return {**rest, 'layers': layers}
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  return {**rest, **{layer_name(i): jax.tree.map(lambda x, i=i: x[i], layers)
                     for i in range(num_layers)}}


def arrange_params(params, layout: Layout, num_kv_heads: int, shardings=None):
  """A Llama's canonical params (scanned, separate projections) in `layout`.

  One jitted program (not one per layer slice) placing every new array on `shardings` (the
  layout's own, from `abstract_params(config, layout)`) when given. Done once, outside the decode
  program; the canonical arrays are freed when the caller drops them.
  """
  if layout == CANONICAL:
    return params
  if 'layers' not in params:
    raise ValueError('arrange_params expects canonical params (a stacked "layers" entry); got '
                     f'entries {sorted(params)}')
  arrange = lambda p: _arrange(p, layout, num_kv_heads)
  return jax.jit(arrange, out_shardings=shardings)(params)
