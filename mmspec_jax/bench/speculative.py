"""Sections 2 and 3: batch scaling, and speculative against autoregressive decoding.

Both run the trained demo pair (the world's LLaVA target and its language-only draft) on held-out
world prompts, and section 3 also a copy of the target widened function-preservingly to ~1B
parameters (bench/widen.py), so the draft/target cost ratio is realistic while the learned
agreement, hence tau, is unchanged.

The prediction a measured speedup is held to comes from the cost of each call, timed alone: the
prefills, t_ar one autoregressive step (a 1-token target call), t_draft one draft step and t_verify
one (gamma+1)-token target call on a warm cache. In the decode phase alone it is
    tau * t_ar / (gamma * t_draft + t_verify);
the goal compares against the end-to-end figure, which adds each prompt's prefills (a large share
of a short generation); see `predicted_speedup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax.bench.timing import compile_timed, time_runs
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding import inputs, runner, statistics
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.evaluation import tasks as task_data
from mmspec_jax.models import KVCache, LlavaConfig, build, parameter_count, text_config
from mmspec_jax.processing import MultimodalProcessor

GREEDY = SamplingConfig(temperature=0.0)
LENGTH_BUCKETS = (64, 128, 256, 512)


@dataclasses.dataclass
class Pair:
  """A target and a draft with held-out prompts, every prompt padded to one length."""
  target_config: Any
  target_params: Any
  draft_config: Any
  draft_params: Any
  processor: MultimodalProcessor
  requests: list[inputs.Request]
  length: int
  image_shape: tuple[int, int, int] | None
  eos: tuple[int, ...]

  def with_target(self, config, params) -> Pair:
    return dataclasses.replace(self, target_config=config, target_params=params)


def load_pair(target_dir: str, draft_dir: str, data_dir: str, tasks: Sequence[str],
              num_examples: int, max_new_tokens: int) -> Pair:
  """The pair and `num_examples` prompts of each task, interleaved (so any prefix mixes tasks)."""
  processor = MultimodalProcessor.from_pretrained(target_dir)
  target_config, target_params = load_model(target_dir, dtype='float32')
  draft_config, draft_params = load_model(draft_dir, dtype='float32')
  per_task = [task_data.read_task(data_dir, task, processor, target_config,
                                  num_examples=num_examples, max_new_tokens=max_new_tokens)
              for task in tasks]
  requests = [example.request for row in zip(*per_task) for example in row]
  length = inputs.bucket_length(max(len(r.token_ids) for r in requests), LENGTH_BUCKETS)
  image_shape = None
  if isinstance(target_config, LlavaConfig):
    vision = target_config.vision
    image_shape = (vision.image_size, vision.image_size, vision.num_channels)
  return Pair(target_config, target_params, draft_config, draft_params, processor, requests,
              length, image_shape, runner.eos_token_ids(target_config, processor))


def decode(pair: Pair, gamma: int, batch_size: int, num_prompts: int, max_new_tokens: int,
           repeats: int) -> dict[str, Any]:
  """Greedy decoding of the first `num_prompts` prompts in batches of `batch_size`.

  gamma 0 decodes with the target alone. Returns tokens/s (median, spread), tau, compile time
  and each prompt's new tokens.
  """
  decoder = SpeculativeDecoder(
      target=build(pair.target_config), draft=build(pair.draft_config) if gamma else None,
      num_draft_tokens=gamma, sampling=GREEDY, max_new_tokens=max_new_tokens,
      eos_token_ids=pair.eos)
  draft_params = pair.draft_params if gamma else None
  batches = inputs.make_batches(pair.requests[:num_prompts], batch_size, (pair.length,))
  arrays = [runner.batch_arrays(batch, pair.processor, pair.image_shape) for batch in batches]
  key = jax.random.key(0)
  compiled, compile_seconds = compile_timed(decoder.generate, pair.target_params, draft_params,
                                            *arrays[0], key)

  def run():
    return jax.block_until_ready([compiled(pair.target_params, draft_params, *batch_arrays, key)
                                  for batch_arrays in arrays])
  results = run()  # The warm-up run (first runs of a program are slower), kept for its figures.
  timing = time_runs(run, repeats=repeats, warmup=0)
  real = [(result, batch.num_real) for result, batch in zip(results, batches)]
  generated = np.concatenate([np.asarray(r.num_generated)[:n] for r, n in real])
  calls = np.concatenate([np.asarray(r.num_target_calls)[:n] for r, n in real])
  accepted = np.concatenate([np.asarray(r.accepted_by_position)[:n] for r, n in real])
  stats = statistics.summarize(generated, calls, accepted, num_draft_tokens=gamma)
  tokens = [row[:count] for r, n in real
            for row, count in zip(np.asarray(r.tokens)[:n], np.asarray(r.num_generated)[:n])]
  return {'gamma': gamma, 'batch_size': batch_size, 'num_prompts': len(generated),
          'new_tokens': int(generated.sum()),
          'tokens_per_second': timing.rate(int(generated.sum())),
          'timing': timing.as_dict(), 'compile_seconds': compile_seconds,
          'tau': stats.block_efficiency if gamma else None,
          'verification_steps': stats.verification_steps,
          'acceptance_rate_by_position': stats.acceptance_rate_by_position,
          'tokens': tokens}


def _median_seconds(function, *args, repeats: int) -> float:
  jitted = jax.jit(function)
  return time_runs(lambda: jax.block_until_ready(jitted(*args)), repeats=repeats,
                   warmup=2).median


def call_costs(pair: Pair, gamma: int, context: int, repeats: int = 5) -> dict[str, float]:
  """Seconds (median of `repeats`, batch 1) of the calls a decode is made of: the target's and the
  draft's prefill of the first prompt, and on a cache already holding `context` tokens one target
  call on 1 and on gamma + 1 tokens and one 1-token draft call."""
  batch = inputs.make_batches(pair.requests[:1], 1, (pair.length,))[0]
  tokens, lengths, images = runner.batch_arrays(batch, pair.processor, pair.image_shape)
  image_token = getattr(pair.target_config, 'image_token_index', None)
  text = np.array([[t for t in tokens[0, :lengths[0]] if t != image_token]], np.int32)

  def costs(config, params, prompt, prompt_length, prompt_images):
    model = build(config)
    cache = KVCache.init(text_config(config), 1, max(context, pair.length) + gamma + 8)
    extra = {} if prompt_images is None else {'images': prompt_images}
    prefill = lambda p, c: model.apply({'params': p}, prompt, jnp.array([prompt_length]), c,
                                       method='prefill', **extra)
    filled = jnp.full((1, context), 5, jnp.int32)  # [1, context]
    _, warm = jax.jit(lambda p, c: model.apply({'params': p}, filled, jnp.array([context]), c,
                                               method='prefill'))(params, cache)
    extend = lambda p, t, c: model.apply({'params': p}, t, c, method='extend')
    step = lambda k: _median_seconds(extend, params, jnp.full((1, k), 5, jnp.int32), warm,
                                     repeats=repeats)
    return _median_seconds(prefill, params, cache, repeats=repeats), step
  with_images = images if image_token is not None and image_token in tokens else None
  target_prefill, target_step = costs(pair.target_config, pair.target_params, tokens,
                                      int(lengths[0]), with_images)
  draft_prefill, draft_step = costs(pair.draft_config, pair.draft_params, text, text.shape[1],
                                    None)
  return {'target_prefill': target_prefill, 'draft_prefill': draft_prefill,
          'target_1': target_step(1), 'target_verify': target_step(gamma + 1),
          'draft_1': draft_step(1)}


def predicted_speedup(autoregressive: dict[str, Any], speculative: dict[str, Any],
                      costs: dict[str, float]) -> dict[str, float]:
  """Speedups predicted from the measured call costs and the runs' token and step counts.

  end_to_end: per prompt, autoregressive = prefill + (n - 1) 1-token steps; speculative =
  both prefills + its verification steps, each gamma draft steps and one verification.
  steady_state: the decode phase alone, tau * t_ar / (gamma * t_draft + t_verify).
  """
  gamma, prompts = speculative['gamma'], speculative['num_prompts']
  ar_seconds = prompts * costs['target_prefill'] + (
      autoregressive['new_tokens'] - prompts) * costs['target_1']
  spec_seconds = prompts * (costs['target_prefill'] + costs['draft_prefill']) + speculative[
      'verification_steps'] * (gamma * costs['draft_1'] + costs['target_verify'])
  return {'end_to_end': (speculative['new_tokens'] / spec_seconds)
                        / (autoregressive['new_tokens'] / ar_seconds),
          'steady_state': speculative['tau'] * costs['target_1']
                          / (gamma * costs['draft_1'] + costs['target_verify'])}


def compare(pair: Pair, gammas: Sequence[int], num_prompts: int, max_new_tokens: int,
            repeats: int, log, label: str) -> dict[str, Any]:
  """Batch-1 autoregressive against speculative decoding at each gamma, with predictions."""
  log(f'{label}: autoregressive, {num_prompts} prompts x {max_new_tokens} new tokens')
  autoregressive = decode(pair, 0, 1, num_prompts, max_new_tokens, repeats)
  ar_rate = autoregressive['tokens_per_second']['median']
  rows = []
  for gamma in gammas:
    log(f'{label}: speculative, gamma {gamma}')
    result = decode(pair, gamma, 1, num_prompts, max_new_tokens, repeats)
    costs = call_costs(pair, gamma, pair.length + max_new_tokens // 2)
    predicted = predicted_speedup(autoregressive, result, costs)
    measured = result['tokens_per_second']['median'] / ar_rate
    identical = all(np.array_equal(a, b)
                    for a, b in zip(result.pop('tokens'), autoregressive['tokens']))
    rows.append({**result, 'call_seconds': costs,
                 'cost_ratio': costs['draft_1'] / costs['target_1'],
                 'measured_speedup': measured, 'predicted_speedup': predicted['end_to_end'],
                 'predicted_steady_state_speedup': predicted['steady_state'],
                 'measured_over_predicted': measured / predicted['end_to_end'],
                 'tokens_identical_to_autoregressive': identical})
    log(f'{label}: gamma {gamma}: tau {result["tau"]:.2f}, measured {measured:.2f}x, '
        f'predicted {predicted["end_to_end"]:.2f}x ({measured / predicted["end_to_end"]:.0%})')
  return {'target_parameters': parameter_count(pair.target_params),
          'draft_parameters': parameter_count(pair.draft_params),
          'autoregressive': autoregressive, 'speculative': rows}


def batch_scaling(pair: Pair, batch_sizes: Sequence[int], gamma: int, num_prompts: int,
                  max_new_tokens: int, repeats: int, log) -> list[dict[str, Any]]:
  """tokens/s of autoregressive and speculative decoding over the same prompts at each batch."""
  rows = []
  for batch_size in batch_sizes:
    for g in (0, gamma):
      result = decode(pair, g, batch_size, num_prompts, max_new_tokens, repeats)
      result.pop('tokens')
      rows.append(result)
      log(f'[2/4] batch {batch_size} {"speculative" if g else "autoregressive"}: '
          f'{result["tokens_per_second"]["median"]:.0f} tokens/s')
  return rows
