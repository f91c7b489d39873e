"""Section 5: does a decode step cost the live cache or the allocated one?

The same ~60-token prompts, batch 8, decoded autoregressively by one random model in a 256-token
prompt bucket and in a 2048-token one. The cache's capacity is the bucket + the new tokens + 1, so
the larger bucket allocates ~7x the cache for the same live lengths. A step that reads only the
live prefix (blockwise attention) and writes only its new entries in place costs the same in
both; a step that reads or copies the whole cache costs ~capacity.

Timing, round-robin over both buckets: a decode step is one 1-token `extend` of the batch on a
cache holding the prompts and 32 generated tokens, timed inside a jitted loop of calls (as in the
decoder's while_loop; `timing.call_timer`); the prefill is timed apart, and so is the whole jitted
`generate` (prefill + new_tokens - 1 steps), whose decode phase (generate - prefill) per step is
reported too, though the padded prefill dominates its time at the large bucket. The model (22M
parameters, 8 kv heads of 64) is sized so that at the larger bucket its cache (0.28 GB) outweighs
its weights (0.09 GB): a step that read the cache whole would show it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax.bench.autoregressive import kv_cache_bytes
from mmspec_jax.bench.timing import Timed, call_timer, compile_timed, interleaved, parameter_bytes
from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.models import KVCache, LlamaConfig, build, init_params, parameter_count

MODEL = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4,
                    num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=4096)


def _prompts(batch_size: int, mean_length: int, seed: int = 0):
  """Ragged prompts, lengths within +-10 of mean_length: (ids int32[B, max], lengths int32[B])."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(mean_length - 10, mean_length + 11, batch_size).astype(np.int32)
  ids = rng.randint(3, MODEL.vocab_size, (batch_size, lengths.max())).astype(np.int32)
  return ids, lengths


def run_section(*, repeats: int, log: Callable[[str], None], buckets=(256, 2048),
                batch_size: int = 8, prompt_tokens: int = 60,
                new_tokens: int = 64) -> dict[str, Any]:
  session = DecodeSession.from_params(None, (MODEL, init_params(MODEL, jax.random.key(0))))
  layout, params = session.target_layout, session.target_params
  model = build(MODEL, layout)  # The prefill and the step, timed apart from `generate`.
  decoder = session.decoder(None, num_draft_tokens=0, sampling=SamplingConfig(),
                            max_new_tokens=new_tokens, eos_token_ids=())
  ids, lengths = _prompts(batch_size, prompt_tokens)
  requests = [inputs.Request(id=row, line=row + 1, token_ids=tuple(ids[row, :n].tolist()),
                             image=None) for row, n in enumerate(lengths)]
  key = jax.random.key(0)
  one_token = jnp.full((batch_size, 1), 5, jnp.int32)  # [B, 1]

  def extend(params, carry):  # Each call rewrites the same slots: the cache is rolled back.
    cache, total = carry
    logits, grown = model.apply({'params': params}, one_token, cache, method='extend')
    return grown.with_lengths(cache.lengths), total + logits[0, 0, 0]

  runs, compile_seconds = {}, {}
  for bucket in buckets:
    [batch] = inputs.make_batches(requests, batch_size, (bucket,))
    tokens, _, _ = session.batch_arrays(batch)  # [B, bucket]
    capacity = bucket + new_tokens + 1

    def prefill(params, tokens, lengths, capacity=capacity):
      cache = KVCache.init(MODEL, batch_size, capacity, layout=layout)
      return model.apply({'params': params}, tokens, lengths, cache, method='prefill')
    generate_seconds = session.compile(decoder, [batch])
    generate, arguments = session.place(decoder, batch, key)
    prefill_only, prefill_seconds = compile_timed(jax.jit(prefill), params, tokens, lengths)
    compile_seconds[bucket] = generate_seconds + prefill_seconds
    # The step's cache: the prompts and half the new tokens live, in this bucket's capacity.
    _, cache = prefill_only(params, tokens, lengths)
    cache = cache.with_lengths(cache.lengths + new_tokens // 2)
    runs[bucket] = {
        'step': call_timer(extend, params, (cache, jnp.float32(0)), min_calls=100),
        'prefill': Timed(lambda p=prefill_only, t=tokens: jax.block_until_ready(
            p(params, t, lengths))),
        'generate': Timed(lambda g=generate, a=arguments: jax.block_until_ready(g(*a)))}
    for name in ('prefill', 'generate'):
      runs[bucket][name].warm_up()
    log(f'[5/5] bucket {bucket}: compiled in {compile_seconds[bucket]:.1f}s')
  interleaved([timed for run in runs.values() for timed in run.values()], repeats)

  rows = []
  for bucket, run in runs.items():
    step, prefill, generate = (run[name].timing() for name in ('step', 'prefill', 'generate'))
    capacity = bucket + new_tokens + 1
    rows.append({
        'prompt_bucket': bucket, 'cache_capacity': capacity,
        'cache_bytes': kv_cache_bytes(MODEL, capacity, batch_size),
        'step_ms': 1e3 * step.median, 'step_ms_low': 1e3 * step.low,
        'step_ms_high': 1e3 * step.high, 'prefill_ms': 1e3 * prefill.median,
        'generate_ms': 1e3 * generate.median,
        # The decode phase of the whole program: noisier, as the prefill dominates its time.
        'generate_step_ms': 1e3 * (generate.median - prefill.median) / (new_tokens - 1),
        'compile_seconds': compile_seconds[bucket]})
    log(f'[5/5] bucket {bucket}: step {rows[-1]["step_ms"]:.2f} ms '
        f'({rows[-1]["generate_step_ms"]:.2f} ms from generate - prefill), prefill '
        f'{rows[-1]["prefill_ms"]:.1f} ms')
  return {'model': {'parameters': parameter_count(params),
                    'weight_bytes': parameter_bytes(params), 'layout': str(layout)},
          'batch_size': batch_size, 'mean_prompt_tokens': float(lengths.mean()),
          'live_tokens': float(lengths.mean()) + new_tokens // 2, 'new_tokens': new_tokens,
          'rows': rows, 'step_ratio': rows[-1]['step_ms'] / rows[0]['step_ms']}
