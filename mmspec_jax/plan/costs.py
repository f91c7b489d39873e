"""The plan check's cost report: what one decoding call reads and writes, and what that predicts.

Three calls are compiled apart, on the plan's mesh and abstract shapes, at a stated live length
(every row's cache holds `live_length` valid positions): one autoregressive target step (the
target's `extend` of 1 token per row), one verification (`extend` of gamma + 1 tokens) and one
draft step (the draft's `extend` of 1 token). A feature draft (EAGLE-3 style) adds a fourth, run
once per step: `fuse` of the target's features at the gamma + 1 verified positions (its fc
layer); its draft step reads its input projection, one decoder layer and its head, and its cache
holds the image positions, as the target's. For each: XLA's own figures (`cost_analysis()`:
bytes accessed and flops; `memory_analysis()`: temporaries), the ideal bytes (every weight read
once, the live KV read once, the new KV written once), their ratio, and the step times those
bytes predict at each accelerator's HBM bandwidth; then the speculative speedup they predict at
a measured tau.

How each figure is made exact (see README, "Cost of a decoding step"):

- XLA's cost analysis counts a while loop's body once, whatever its trip count. So the calls are
  compiled with the layers unrolled (a scanned stack is a while loop over the layers) and with an
  attention block of exactly the live length (the blockwise attention's loop then runs once, over
  exactly the live prefix).
- XLA counts a scatter's whole operand and result, even when it updates a donated buffer in place.
  A cache write (`LayerCache.write`) is compiled alone on one device with one device's shapes, and
  what XLA counts for it beyond the slots it writes is subtracted once per write (2 per layer).
- XLA:CPU has no bfloat16 scatter: in a bfloat16 program it converts the whole cache to float32
  and back around every write (and some weights around their dots), which TPU and GPU do not. On
  CPU the calls are therefore compiled in float32 (`cost_dtype`), and bytes are scaled to the
  plan's dtype by its item size (weights and KV halve; float32 statistics would not, so the scaled
  figure slightly underestimates).

Every figure is per device: XLA compiles one device's partition of the program.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax import sharding
from mmspec_jax.decoding import placement
from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, KVCache, LlavaConfig,
                               abstract_params, build, presets, text_config)
from mmspec_jax.models.config import resolve_dtype, with_dtype
from mmspec_jax.models import attention
from mmspec_jax.models.kv_cache import LayerCache
from mmspec_jax.models.layout import Layout

# HBM bandwidth per chip, bytes/s (vendor figures).
HBM_BANDWIDTH = (('TPU v5e', 819e9), ('TPU v5p', 2765e9), ('H100 SXM', 3350e9), ('H200', 4800e9))
SPEEDUP_FORMULA = 'speedup = tau * t_step / (gamma * t_draft + t_verify)'
FEATURE_SPEEDUP_FORMULA = 'speedup = tau * t_step / (gamma * t_draft + t_fuse + t_verify)'
MIB = 1024 ** 2


@dataclasses.dataclass(frozen=True)
class CostCall:
  """One compiled call: `model.extend` of `num_tokens` tokens per row into caches of `capacity`
  positions that hold `live` valid ones."""
  name: str
  model: object  # LlamaConfig: the language model that runs (LLaVA's extend is its LM's)
  num_tokens: int
  capacity: int
  live: int
  is_draft: bool = False  # Placed by the draft's logical-axis rules.
  # 'extend': model.extend(tokens, cache); 'feature_extend': a feature draft's extend (tokens
  # beside its own hidden states); 'fuse': a feature draft's fc over the target's features.
  kind: str = 'extend'


def cost_dtype(config) -> str:
  """The dtype the cost calls compile in: `cost_dtype`, or the plan's dtype except on CPU."""
  if config.cost_dtype:
    return config.cost_dtype
  return 'float32' if jax.default_backend() == 'cpu' else config.dtype


def cost_calls(config, dtype: str) -> list[CostCall]:
  """The target step, the verification and the draft step of `config`, in `dtype`."""
  target = with_dtype(presets.get(config.target), dtype)
  gamma = config.num_draft_tokens if config.draft else 0
  capacity = config.prompt_length + config.max_new_tokens + gamma + 1
  live = config.live_length
  calls = [CostCall('target step', text_config(target), 1, capacity, live)]
  if not config.draft:
    return calls
  calls.append(CostCall('verification', text_config(target), gamma + 1, capacity, live))
  draft = with_dtype(presets.get(config.draft), dtype)
  if isinstance(draft, FeatureDraftConfig):
    draft.check_target(text_config(target))
    return calls + [CostCall('draft step', draft, 1, capacity, live, True, 'feature_extend'),
                    CostCall('fuse', draft, gamma + 1, capacity, live, True, 'fuse')]
  # The language-only draft of a LLaVA target reads the text alone: its cache holds no image slots.
  image_slots = 0
  if isinstance(target, LlavaConfig) and not isinstance(draft, AdapterDraftConfig):
    image_slots = target.num_image_tokens
  calls.append(CostCall('draft step', text_config(draft), 1, capacity - image_slots,
                        live - image_slots, is_draft=True))
  return calls


def _per_device(struct) -> int:
  return math.prod(struct.sharding.shard_shape(struct.shape)) * np.dtype(struct.dtype).itemsize


def _shard_shape(struct) -> tuple[int, ...]:
  return tuple(struct.sharding.shard_shape(struct.shape))


_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')


def collectives(compiled) -> dict[str, int]:
  """How many of each cross-device collective the compiled program runs (its HLO text): a
  tensor-parallel step needs all-reduces only; an all-gather means a sharded weight was made
  whole."""
  text = compiled.as_text()
  return {name: len(re.findall(rf'\s{name}(?:-start)?\(', text)) for name in _COLLECTIVES}


def _xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'bytes': float(cost.get('bytes accessed', 0.0)), 'flops': float(cost.get('flops', 0.0))}


def write_accounting(cache_shard: tuple[int, ...], num_tokens: int, dtype: str) -> dict:
  """XLA's count for the model's cache write alone (`LayerCache.write`: keys and values, one
  layer), compiled on one device with one device's shapes, the buffers donated.

  Returns the buffer and update bytes (one of keys/values), XLA's bytes for the two writes, the
  temporaries (about 0 when the write is in place), whether it is, and the excess per write: XLA's
  count beyond the bytes an in-place write touches (the update read and its slots written), 0
  when the write is not in place."""
  layers, batch, capacity, kv_heads, head_dim = cache_shard
  dtype = resolve_dtype(dtype)
  buffer = jax.ShapeDtypeStruct(cache_shard, dtype)
  new = jax.ShapeDtypeStruct((batch, num_tokens, kv_heads, head_dim), dtype)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)

  def write(keys, values, lengths, new_keys, new_values):
    view = LayerCache(keys=keys, values=values, lengths=lengths, layer=layers // 2)
    positions = lengths[:, None] + jnp.arange(num_tokens)[None, :]
    written = view.write(new_keys, new_values, positions)
    return written.keys, written.values

  compiled = jax.jit(write, donate_argnums=(0, 1)).lower(buffer, buffer, lengths, new,
                                                        new).compile()
  update_bytes = math.prod(new.shape) * np.dtype(dtype).itemsize
  buffer_bytes = math.prod(cache_shard) * np.dtype(dtype).itemsize
  xla_bytes = _xla_cost(compiled)['bytes']
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  # Not in place (e.g. XLA:CPU in bfloat16 converts the buffer): the excess is real traffic, and
  # the same write inside the model may be fused otherwise; nothing is subtracted then.
  in_place = temp < buffer_bytes
  excess = max(0.0, (xla_bytes - 2 * 2 * update_bytes) / 2) if in_place else 0.0
  return {'buffer_bytes': buffer_bytes, 'update_bytes': update_bytes, 'xla_bytes': xla_bytes,
          'in_place': in_place, 'excess_per_write': excess, 'temp_size_in_bytes': temp}


def read_accounting(cache_shard: tuple[int, ...], num_tokens: int, dtype: str) -> dict:
  """XLA's count for the model's read of each token's recent slots (`LayerCache.gather` of
  RECENT_SLOTS + 1 slots per token, one layer: a short call's blockwise attention reads them
  from the cache), compiled on one device with one device's shapes. XLA counts a gather's whole
  operand, as a scatter's; the excess per read is its count beyond the slots read and written."""
  layers, batch, capacity, kv_heads, head_dim = cache_shard
  dtype = resolve_dtype(dtype)
  buffer = jax.ShapeDtypeStruct(cache_shard, dtype)
  slots = jax.ShapeDtypeStruct((batch, num_tokens * (attention.RECENT_SLOTS + 1)), jnp.int32)

  def read(keys, slots):
    view = LayerCache(keys=keys, values=keys, lengths=jnp.zeros((batch,), jnp.int32),
                      layer=layers // 2)
    return view.gather(slots)[0]

  xla_bytes = _xla_cost(jax.jit(read).lower(buffer, slots).compile())['bytes']
  read_bytes = math.prod(slots.shape) * kv_heads * head_dim * np.dtype(dtype).itemsize
  return {'xla_bytes': xla_bytes, 'read_bytes': read_bytes,
          'excess_per_read': max(0.0, xla_bytes - 2 * read_bytes)}


def ideal_bytes(params, cache, num_tokens: int, live: int) -> dict:
  """One device's bytes for a call that reads every weight once (of the embedding table, only the
  rows it gathers), reads the live KV once and writes the new KV once.

  params: the model's placed abstract params (a feature draft's: its language model's inside);
  cache: its placed abstract KVCache."""
  layers, batch, _, kv_heads, head_dim = _shard_shape(cache.keys)
  itemsize = np.dtype(cache.keys.dtype).itemsize
  table = params.get('language_model', params)['embed_tokens']['embedding']
  rows = batch * num_tokens * _shard_shape(table)[1] * np.dtype(table.dtype).itemsize
  weights = sum(_per_device(leaf) for leaf in jax.tree.leaves(params)) - _per_device(table) + rows
  kv_read = 2 * layers * batch * live * kv_heads * head_dim * itemsize
  kv_written = 2 * layers * batch * num_tokens * kv_heads * head_dim * itemsize
  return {'weights': weights, 'kv_read': kv_read, 'kv_written': kv_written,
          'total': weights + kv_read + kv_written}


def measure(call: CostCall, batch_size: int, layout: Layout, mesh, rules) -> dict:
  """Compiles `call` (layers unrolled, one attention block of the live length) and measures it."""
  if not 0 < call.live <= call.capacity - call.num_tokens:
    raise ValueError(f'{call.name}: live length {call.live} must lie in [1, '
                     f'{call.capacity - call.num_tokens}] (cache capacity {call.capacity} minus '
                     f'{call.num_tokens} new tokens); set --config.live_length')
  # The pure-JAX attention, which compiles anywhere: a TPU kernel ('pallas') is opaque to XLA's
  # cost analysis and off TPU would be measured as its interpreter.
  layout = dataclasses.replace(layout, layers='unrolled', attention='blockwise',
                               attention_block_size=call.live)
  params = sharding.placed_structs(nn.unbox(abstract_params(call.model, layout)),
                                   placement.param_shardings(call.model, mesh, rules, layout))
  cache = jax.eval_shape(lambda: KVCache.init(text_config(call.model), batch_size, call.capacity,
                                              layout=layout))
  cache = sharding.placed_structs(cache, sharding.tree_shardings(
      cache, KVCache.logical_axes(layout.cache_heads_first), mesh, rules))
  rows = (batch_size, call.num_tokens)
  tokens = jax.ShapeDtypeStruct(rows, np.int32, sharding=placement.batch_sharding(rows, mesh,
                                                                                   rules))
  model = build(call.model, layout)
  start = time.time()
  with placement.mesh_context(mesh, rules):
    if call.kind == 'fuse':
      return _measure_fuse(call, model, params, rows, mesh, rules, start)
    if call.kind == 'feature_extend':  # Each token beside the draft's own hidden state.
      hidden = jax.ShapeDtypeStruct(rows + (text_config(call.model).hidden_size,),
                                    resolve_dtype(call.model.text.dtype),
                                    sharding=placement.batch_sharding(rows, mesh, rules))
      extend = jax.jit(lambda p, t, h, c: model.apply({'params': p}, t, h, c, method='extend'),
                       donate_argnums=3)
      compiled = extend.lower(params, tokens, hidden, cache).compile()
    else:
      extend = jax.jit(lambda p, t, c: model.apply({'params': p}, t, c, method='extend'),
                       donate_argnums=2)
      compiled = extend.lower(params, tokens, cache).compile()
  seconds = time.time() - start
  text = text_config(call.model)
  write = write_accounting(_shard_shape(cache.keys), call.num_tokens, text.dtype)
  num_writes = 2 * text.num_layers  # Keys and values, per layer.
  excess = num_writes * write['excess_per_write']
  reads = None
  if call.num_tokens <= attention.SHORT_CALL_MAX_TOKENS:  # Recent slots gathered, per layer.
    reads = read_accounting(_shard_shape(cache.keys), call.num_tokens, text.dtype)
    excess += num_writes * reads['excess_per_read']
  # A feature draft's step reads all its weights but fc (`fuse`, once per step).
  read = {k: v for k, v in params.items() if k != 'fc'} if call.kind == 'feature_extend' else params
  ideal = ideal_bytes(read, cache, call.num_tokens, call.live)
  return _call_report(call, compiled, batch_size, seconds, ideal, num_writes=num_writes,
                      excess=excess,
                      kv_cache_bytes=_per_device(cache.keys) + _per_device(cache.values),
                      write=write, reads=reads)


def _measure_fuse(call: CostCall, model, params, rows, mesh, rules, start) -> dict:
  """A feature draft's fc over the target's features at the verified positions (no cache)."""
  draft = call.model
  shape = rows + (len(draft.feature_layers), draft.target_hidden_size)
  features = jax.ShapeDtypeStruct(shape, resolve_dtype(draft.text.dtype),
                                  sharding=placement.batch_sharding(rows, mesh, rules))
  fc = {'fc': params['fc']}
  compiled = jax.jit(lambda p, f: model.apply({'params': p}, f, method='fuse')).lower(
      fc, features).compile()
  seconds = time.time() - start
  weights = sum(_per_device(leaf) for leaf in jax.tree.leaves(fc))
  ideal = {'weights': weights, 'kv_read': 0, 'kv_written': 0, 'total': weights}
  return _call_report(call, compiled, rows[0], seconds, ideal)


def _call_report(call: CostCall, compiled, batch_size: int, seconds: float, ideal: dict, *,
                 num_writes: int = 0, excess: float = 0.0, kv_cache_bytes: int = 0,
                 write: dict | None = None, reads: dict | None = None) -> dict:
  """One call's figures: XLA's cost and memory analysis of `compiled`, its bytes less `excess`
  (what XLA counts of the cache writes and recent-slot reads beyond what they move), against
  `ideal`. A call without a cache (the feature draft's fc) passes none of the keywords."""
  xla = _xla_cost(compiled)
  memory = compiled.memory_analysis()
  corrected = xla['bytes'] - excess
  return {
      'call': call.name, 'tokens_per_row': call.num_tokens, 'batch_size': batch_size,
      'live_length': call.live, 'cache_capacity': call.capacity if kv_cache_bytes else 0,
      'compile_seconds': round(seconds, 1),
      'xla_bytes_accessed': xla['bytes'], 'flops': xla['flops'],
      'num_cache_writes': num_writes, 'cache_write_excess_bytes': excess,
      'bytes_accessed': corrected,
      'ideal_bytes': ideal['total'], 'ideal': ideal, 'ratio': corrected / ideal['total'],
      'temp_size_in_bytes': int(memory.temp_size_in_bytes), 'kv_cache_bytes': kv_cache_bytes,
      'cache_aliased': int(memory.alias_size_in_bytes) >= kv_cache_bytes,
      'write_accounting': write, 'read_accounting': reads, 'collectives': collectives(compiled)}


def report(config, mesh, rules, draft_rules, layout: Layout) -> dict:
  """The cost report of `config`'s calls (see the module docstring); figures per device. The
  draft's call is placed by `draft_rules`, as the decoder runs it."""
  dtype = cost_dtype(config)
  # Bytes at the plan's dtype: every weight and KV byte scales with the item size.
  scale = np.dtype(resolve_dtype(config.dtype)).itemsize / np.dtype(resolve_dtype(dtype)).itemsize
  calls = [measure(call, config.batch_size, layout, mesh,
                   draft_rules if call.is_draft else rules)
           for call in cost_calls(config, dtype)]
  for call in calls:
    call['plan_dtype_bytes'] = call['bytes_accessed'] * scale
    call['predicted_seconds'] = {name: call['plan_dtype_bytes'] / bandwidth
                                 for name, bandwidth in HBM_BANDWIDTH}
  result = {'live_length': config.live_length, 'cost_dtype': dtype, 'plan_dtype': config.dtype,
            'per': 'device', 'calls': calls}
  if config.draft:
    gamma, tau = config.num_draft_tokens, config.tau
    # t = bytes / bandwidth for every call, so the bandwidth cancels: one speedup for all.
    speedup = lambda step, verify, draft, fuse=0.0: tau * step / (gamma * draft + fuse + verify)
    result.update(
        gamma=gamma, tau=tau,
        formula=FEATURE_SPEEDUP_FORMULA if len(calls) == 4 else SPEEDUP_FORMULA,
        speedup=speedup(*(c['bytes_accessed'] for c in calls)),
        ideal_speedup=speedup(*(c['ideal_bytes'] for c in calls)))
  return result


def _mib(value) -> str:
  return f'{value / MIB:,.1f}'


def print_report(costs: dict) -> None:
  calls = costs['calls']
  dtype = costs['cost_dtype']
  print(f"\nCost of one call at live length {costs['live_length']} (per device; compiled in "
        f"{dtype}, layers unrolled, one attention block of the live length, cache donated)")
  if dtype != costs['plan_dtype']:
    print(f"  ({costs['plan_dtype']} bytes = {dtype} bytes scaled by item size: XLA:CPU has no "
          f"bfloat16 scatter and converts the whole cache to float32 around each write)")
  print(f"  {'call':13s} {'rows x tok':>10s} {'live':>5s} {'XLA MiB':>11s} {'writes MiB':>11s} "
        f"{'corrected':>9s} {'ideal MiB':>9s} {'ratio':>5s} {'GFLOP':>6s} {'temp MiB':>8s} "
        f"{'KV MiB':>8s}")
  for c in calls:
    print(f"  {c['call']:13s} {c['batch_size']:>5d} x {c['tokens_per_row']:<2d} "
          f"{c['live_length']:>5d} {_mib(c['xla_bytes_accessed']):>11s} "
          f"{_mib(c['cache_write_excess_bytes']):>11s} {_mib(c['bytes_accessed']):>9s} "
          f"{_mib(c['ideal_bytes']):>9s} {c['ratio']:5.2f} {c['flops'] / 1e9:6.1f} "
          f"{_mib(c['temp_size_in_bytes']):>8s} {_mib(c['kv_cache_bytes']):>8s}"
          + ('' if c['cache_aliased'] else '  (cache NOT updated in place)'))
  print("  corrected = XLA - the cache writes' and reads' excess (writes MiB); ratio = corrected / "
        "ideal; temp = temporaries, against the call's KV cache (KV)")
  for c in calls:
    w, i = c['write_accounting'], c['ideal']
    ran = ', '.join(f'{n} {name}' for name, n in c['collectives'].items() if n)
    print(f"  {c['call']}: collectives {ran or 'none'}")
    if w is None:
      print(f"  {c['call']}: ideal = its weights {_mib(i['weights'])} MiB, once per step (the "
            "target's features it reads are a few KiB)")
      continue
    print(f"  {c['call']}: ideal = weights {_mib(i['weights'])} (of the embedding table only the "
          f"rows gathered) + live KV read {_mib(i['kv_read'])} + new KV written "
          f"{_mib(i['kv_written'])} MiB")
    if w['in_place']:
      print(f"    writes: a lone cache write (LayerCache.write into one device's "
            f"{_mib(w['buffer_bytes'])} MiB buffer, donated) puts {w['update_bytes'] / 1024:,.0f} "
            f"KiB in place (temporaries {w['temp_size_in_bytes'] / 1024:,.0f} KiB), yet XLA "
            f"counts {_mib(w['xla_bytes'] / 2)} MiB: {_mib(w['excess_per_write'])} MiB too many, "
            f"subtracted for each of the {c['num_cache_writes']} writes (keys, values per layer)")
    else:
      print(f"    writes: NOT in place: a lone cache write into one device's "
            f"{_mib(w['buffer_bytes'])} MiB buffer needs {_mib(w['temp_size_in_bytes'])} MiB of "
            f"temporaries; nothing subtracted (on CPU, use --config.cost_dtype=float32)")
    r = c.get('read_accounting')
    if r:
      print(f"    reads: a lone read of the tokens' recent slots (LayerCache.gather, "
            f"{r['read_bytes'] / 1024:,.0f} KiB) is counted as {_mib(r['xla_bytes'])} MiB (XLA "
            f"counts a gather's whole operand): {_mib(r['excess_per_read'])} MiB too many, "
            f"subtracted for each of the {c['num_cache_writes']} reads")
  names = [name for name, _ in HBM_BANDWIDTH]
  print(f"  predicted time per call in {costs['plan_dtype']} (bytes / HBM bandwidth), ms:")
  print('  ' + ' ' * 13 + ''.join(f'{name:>10s}' for name in names))
  for c in calls:
    print(f"  {c['call']:13s}" + ''.join(f"{c['predicted_seconds'][n] * 1e3:10.3f}"
                                        for n in names))
  if 'speedup' in costs:
    print(f"  {costs['formula']}, tau {costs['tau']} at gamma {costs['gamma']}: "
          f"{costs['speedup']:.2f}x from XLA's bytes ({costs['ideal_speedup']:.2f}x from the "
          f"ideal bytes); t = bytes / bandwidth, so the same on every accelerator")
