"""Sections 2 and 3: batch scaling, and speculative against autoregressive decoding.

Both run the trained demo pair (the world's LLaVA target and its language-only draft) on held-out
world prompts, and section 3 also a copy of the target widened function-preservingly to ~1B
parameters (bench/widen.py), so the draft/target cost ratio is realistic while the learned
agreement, hence tau, is unchanged.

The prediction a measured speedup is held to comes from the cost of each call, timed alone: the
prefills, t_ar one autoregressive step (a 1-token target call), t_draft(w) one draft call on w
tokens and t_verify(n) one n-token target call on a warm cache. In the decode phase alone it is
    tau * t_ar / (t_drafts + t_verify(n)),
t_drafts the draft calls of one step: gamma * t_draft(1) for a chain, t_draft(1) + the sum of
t_draft(W_d) over depths d < D for a tree (W_d nodes at depth d), and for an adaptive length the
calls it made per step. The goal compares against the end-to-end figure, which adds each
prompt's prefills (a large share of a short generation); see `predicted_speedup`. A tree call is
timed as a plain call on as many tokens: its mask changes which keys a token sees, not the work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmspec_jax.bench.timing import Timed, call_timer, interleaved
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding import inputs, statistics
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree, DynamicTree, parse_shape, shape_label
from mmspec_jax.evaluation import tasks as task_data
from mmspec_jax.models import KVCache, build, parameter_count, text_config
from mmspec_jax.data.processing import MultimodalProcessor

GREEDY = SamplingConfig(temperature=0.0)
LENGTH_BUCKETS = (64, 128, 256, 512)


DRAFT = 'draft'  # The pair's draft in its session.


@dataclasses.dataclass
class Pair:
  """A target and a draft in one in-memory DecodeSession, with held-out prompts, every prompt
  padded to one length."""
  session: DecodeSession
  requests: list[inputs.Request]
  length: int

  target_config = property(lambda self: self.session.target_config)
  target_params = property(lambda self: self.session.target_params)
  draft_config = property(lambda self: self.session.draft_configs[DRAFT])
  draft_params = property(lambda self: self.session.draft_params[DRAFT])
  processor = property(lambda self: self.session.processor)
  image_shape = property(lambda self: self.session.image_shape)

  def with_target(self, config, params) -> Pair:
    """The same draft and prompts beside another target (canonical params)."""
    return dataclasses.replace(self, session=self.session.with_target(config, params))

  def batch_arrays(self, batch: inputs.Batch):
    return self.session.batch_arrays(batch)


def load_pair(target_dir: str, draft_dir: str, data_dir: str, tasks: Sequence[str],
              num_examples: int, max_new_tokens: int, dtype: str = 'float32') -> Pair:
  """The pair in `dtype` and `num_examples` prompts of each task, interleaved (so any prefix
  mixes tasks)."""
  processor = MultimodalProcessor.from_pretrained(target_dir)
  target = load_model(target_dir, dtype=dtype)
  session = DecodeSession.from_params(processor, target,
                                      {DRAFT: load_model(draft_dir, dtype=dtype)}, dtype=dtype)
  per_task = [task_data.read_task(data_dir, task, processor, target[0],
                                  num_examples=num_examples, max_new_tokens=max_new_tokens)
              for task in tasks]
  requests = [example.request for row in zip(*per_task) for example in row]
  length = inputs.bucket_length(max(len(r.token_ids) for r in requests), LENGTH_BUCKETS)
  return Pair(session, requests, length)


class DecodeRun(Timed):
  """Greedy decoding of the first `num_prompts` prompts in batches of `batch_size`, compiled and
  warmed up (the warm-up run's outputs are the figures'; first runs of a program are slower).
  gamma 0 decodes with the target alone; `shape` (decoding.tree.parse_shape's: '3,2,1',
  '1,1,1,1,1@0.4') a tree or an adaptive length instead of a chain of gamma. `time_once()` times
  one more pass over all prompts, the inputs placed beforehand."""

  def __init__(self, pair: Pair, gamma: int, batch_size: int, num_prompts: int,
               max_new_tokens: int, shape: str | None = None):
    session, requests = pair.session, pair.requests[:num_prompts]
    self.tree, self.threshold = parse_shape(shape) if shape else (None, 0.0)
    gamma = self.tree.depth if self.tree else gamma
    decoder = session.decoder(DRAFT if gamma else None, num_draft_tokens=gamma,
                              sampling=GREEDY, max_new_tokens=max_new_tokens, requests=requests,
                              draft_tree=self.tree, confidence_threshold=self.threshold)
    self.gamma, self.batch_size = gamma, batch_size
    self.batches = inputs.make_batches(requests, batch_size, (pair.length,))
    draft_length = session.engine(decoder).draft_prompt_length(
        [r.token_ids for r in requests], pair.length)
    self.compile_seconds = session.compile(decoder, self.batches, draft_length)
    key = jax.random.key(0)
    calls = [session.place(decoder, batch, key, draft_length) for batch in self.batches]
    super().__init__(lambda: jax.block_until_ready(
        [program(*arguments) for program, arguments in calls]))
    self.results = self._run()

  def summary(self) -> dict[str, Any]:
    """tokens/s (median, spread), tau, step counts, compile time and each prompt's new tokens."""
    real = [(result, batch.num_real) for result, batch in zip(self.results, self.batches)]
    counts = statistics.concatenate_counts([statistics.row_counts(r, n) for r, n in real])
    generated = counts[0]
    stats = statistics.summarize(*counts, num_draft_tokens=self.gamma, draft_tree=self.tree,
                                 confidence_threshold=self.threshold)
    tokens = [row[:count] for r, n in real
              for row, count in zip(np.asarray(r.tokens)[:n], np.asarray(r.num_generated)[:n])]
    timing = self.timing()
    return {'gamma': self.gamma, 'batch_size': self.batch_size, 'num_prompts': len(generated),
            'shape': shape_label(self.tree, self.threshold) if self.tree else None,
            'verified_tokens': stats.verified_tokens,
            'draft_calls_per_step': stats.draft_calls_per_step,
            'new_tokens': int(generated.sum()),
            'tokens_per_second': timing.rate(int(generated.sum())),
            'timing': timing.as_dict(), 'compile_seconds': self.compile_seconds,
            'tau': stats.block_efficiency if self.gamma else None,
            'verification_steps': stats.verification_steps,
            'acceptance_rate_by_position': stats.acceptance_rate_by_position,
            'tokens': tokens}


def decode(pair: Pair, gamma: int, batch_size: int, num_prompts: int, max_new_tokens: int,
           repeats: int) -> dict[str, Any]:
  """One `DecodeRun`, timed `repeats` times; its summary."""
  run = DecodeRun(pair, gamma, batch_size, num_prompts, max_new_tokens)
  interleaved([run], repeats)
  return run.summary()


def call_costs(pair: Pair, context: int, target_sizes: Sequence[int],
               draft_sizes: Sequence[int] = (1,), repeats: int = 5) -> dict[str, float]:
  """Seconds (median of `repeats`, batch 1, measured round-robin) of the calls a decode is made
  of: the target's and the draft's prefill of the first prompt ('target_prefill',
  'draft_prefill'), and on a cache already holding `context` tokens one target call on n tokens
  for each n of `target_sizes` and 1 ('target_{n}'), one draft call on w tokens for each w of
  `draft_sizes` and 1 ('draft_{w}').

  Each is timed inside a jitted loop of n calls, as a decode step runs inside the decoder's
  while_loop where a call costs no dispatch (timed one by one, a tiny model's calls would be all
  dispatch); n makes a loop take ~0.2 s (1 for a 1B model, where dispatch is negligible).
  """
  target_sizes = sorted({1, *target_sizes})
  draft_sizes = sorted({1, *draft_sizes})
  batch = inputs.make_batches(pair.requests[:1], 1, (pair.length,))[0]
  tokens, lengths, images = pair.batch_arrays(batch)
  image_token = getattr(pair.target_config, 'image_token_index', None)
  text = np.array([[t for t in tokens[0, :lengths[0]] if t != image_token]], np.int32)

  def calls(config, layout, params, prompt, prompt_length, prompt_images, step_sizes):
    model = build(config, layout)
    empty = KVCache.init(text_config(config), 1, max(context, pair.length) + max(step_sizes) + 8,
                         layout=layout)
    extra = {} if prompt_images is None else {'images': prompt_images}

    def prefill(params, total):  # The carry feeds the input, so the loop cannot hoist the call.
      shifted = prompt + (total * 0).astype(jnp.int32)
      logits, _ = model.apply({'params': params}, shifted, jnp.array([prompt_length]), empty,
                              method='prefill', **extra)
      return total + logits[0, 0]
    filled = jnp.full((1, context), 5, jnp.int32)  # [1, context]
    _, warm = jax.jit(lambda p, c: model.apply({'params': p}, filled, jnp.array([context]), c,
                                               method='prefill'))(params, empty)

    def step(num_tokens):
      new_tokens = jnp.full((1, num_tokens), 5, jnp.int32)  # [1, k]

      def extend(params, carry):  # Each call rewrites the same slots: the cache is rolled back.
        cache, total = carry
        logits, grown = model.apply({'params': params}, new_tokens, cache, method='extend')
        return grown.with_lengths(cache.lengths), total + logits[0, 0, 0]
      return call_timer(extend, params, (warm, jnp.float32(0)))
    return [call_timer(prefill, params, jnp.float32(0))] + [step(k) for k in step_sizes]
  with_images = images if image_token is not None and image_token in tokens else None
  # The session's layouts, as it arranged the params: the target laid out for verification
  # serves the autoregressive baseline as it is.
  target_calls = calls(pair.target_config, pair.session.target_layout, pair.target_params, tokens,
                       int(lengths[0]), with_images, target_sizes)
  draft_calls = calls(pair.draft_config, pair.session.draft_layout, pair.draft_params, text,
                      text.shape[1], None, draft_sizes)
  names = ('target_prefill', *[f'target_{n}' for n in target_sizes],
           'draft_prefill', *[f'draft_{w}' for w in draft_sizes])
  timed = target_calls + draft_calls
  interleaved(timed, repeats)
  return {name: call.timing().median for name, call in zip(names, timed)}


def logits_difference(pair: Pair, other: Pair, num_prompts: int = 4) -> float:
  """Max |logit difference| between two pairs' targets over full forwards of the first prompts."""
  batch = inputs.make_batches(pair.requests[:num_prompts], num_prompts, (pair.length,))[0]
  tokens, _, images = pair.batch_arrays(batch)
  logits = [jax.jit(build(p.target_config, p.session.target_layout).apply)(
      {'params': p.target_params}, tokens, images) for p in (pair, other)]  # [B, T, V] each
  return float(jnp.max(jnp.abs(logits[0] - logits[1])))


def draft_call_widths(tree: DraftTree | DynamicTree | None) -> list[int]:
  """The tokens of each draft call of one step past the first (which is timed as a 1-token
  call): a chain's are 1, a tree's the nodes W_d of each depth d < D (a dynamic tree's K)."""
  return [] if tree is None else list(tree.draft_call_widths)


def step_draft_seconds(run: dict[str, Any], costs: dict[str, float]) -> float:
  """The draft's seconds per verification step of a `DecodeRun.summary()`: gamma 1-token calls
  for a chain; for a tree its first call and one per depth below the deepest; scaled by the calls
  an adaptive length made per step against its full depth (an approximation for an adaptive
  tree: the calls it skips are its deepest, often its widest)."""
  if not run['shape']:
    return run['gamma'] * costs['draft_1']
  tree, _ = parse_shape(run['shape'].replace('x', ','))
  full = costs['draft_1'] + sum(costs[f'draft_{w}'] for w in draft_call_widths(tree))
  return full * run['draft_calls_per_step'] / tree.depth


def predicted_speedup(autoregressive: dict[str, Any], speculative: dict[str, Any],
                      costs: dict[str, float]) -> dict[str, float]:
  """Speedups predicted from the measured call costs and the runs' token and step counts.

  end_to_end: per prompt, autoregressive = prefill + (n - 1) 1-token steps; speculative =
  both prefills + its verification steps, each its draft calls (`step_draft_seconds`) and one
  verification of its n tokens.
  steady_state: the decode phase alone, tau * t_ar / (t_drafts + t_verify(n)).
  """
  prompts = speculative['num_prompts']
  step = step_draft_seconds(speculative, costs) + costs[
      f'target_{speculative["verified_tokens"]}']
  ar_seconds = prompts * costs['target_prefill'] + (
      autoregressive['new_tokens'] - prompts) * costs['target_1']
  spec_seconds = prompts * (costs['target_prefill'] + costs['draft_prefill']) + speculative[
      'verification_steps'] * step
  return {'end_to_end': (speculative['new_tokens'] / spec_seconds)
                        / (autoregressive['new_tokens'] / ar_seconds),
          'steady_state': speculative['tau'] * costs['target_1'] / step}


def compare(pair: Pair, gammas: Sequence[int], num_prompts: int, max_new_tokens: int,
            repeats: int, log, label: str, shapes: Sequence[str] = (),
            verify_sizes: Sequence[int] = ()) -> tuple[dict[str, Any], list[np.ndarray]]:
  """Batch-1 autoregressive against speculative decoding at each gamma and each tree or adaptive
  `shape`, with predictions. All runs are timed round-robin, then the cost of every call they
  are made of; with `verify_sizes`, the cost of a target call on n tokens over one on 1 token for
  each n (and for each n a run verifies).

  Returns (the figures, the autoregressive run's new tokens per prompt)."""
  log(f'{label}: autoregressive and speculative (gamma {", ".join(map(str, gammas))}'
      + (f'; {", ".join(shapes)}' if shapes else '') + f'), {num_prompts} prompts x '
      f'{max_new_tokens} new tokens, {repeats} interleaved runs')
  runs = [DecodeRun(pair, gamma, 1, num_prompts, max_new_tokens) for gamma in (0, *gammas)]
  runs += [DecodeRun(pair, 0, 1, num_prompts, max_new_tokens, shape) for shape in shapes]
  interleaved(runs, repeats)
  autoregressive, *speculative_runs = [run.summary() for run in runs]
  ar_tokens = autoregressive.pop('tokens')
  ar_rate = autoregressive['tokens_per_second']['median']
  costs = call_costs(pair, pair.length + max_new_tokens // 2,
                     [*verify_sizes, *(r['verified_tokens'] for r in speculative_runs)],
                     [w for run in runs for w in draft_call_widths(run.tree)])
  verification = {n: costs[f'target_{n}'] / costs['target_1']
                  for n in sorted({*verify_sizes, *(r['verified_tokens'] for r in
                                                    speculative_runs)})}
  log(f'{label}: a target call on n tokens over one on 1: ' + ', '.join(
      f'{n}: {ratio:.2f}x' for n, ratio in verification.items()))
  rows = []
  for result in speculative_runs:
    predicted = predicted_speedup(autoregressive, result, costs)
    measured = result['tokens_per_second']['median'] / ar_rate
    identical = all(np.array_equal(a, b) for a, b in zip(result.pop('tokens'), ar_tokens))
    rows.append({**result, 'cost_ratio': costs['draft_1'] / costs['target_1'],
                 'verification_cost': verification[result['verified_tokens']],
                 'measured_speedup': measured, 'predicted_speedup': predicted['end_to_end'],
                 'predicted_steady_state_speedup': predicted['steady_state'],
                 'measured_over_predicted': measured / predicted['end_to_end'],
                 'tokens_identical_to_autoregressive': identical})
    what = f'tree {result["shape"]}' if result['shape'] else f'gamma {result["gamma"]}'
    log(f'{label}: {what}: tau {result["tau"]:.2f}, measured {measured:.2f}x, '
        f'predicted {predicted["end_to_end"]:.2f}x ({measured / predicted["end_to_end"]:.0%})')
  summary = {'dtype': pair.session.dtype,
             'target_parameters': parameter_count(pair.target_params),
             'draft_parameters': parameter_count(pair.draft_params),
             'autoregressive': autoregressive, 'speculative': rows, 'call_seconds': costs,
             'verification_cost_ratio': verification}
  return summary, ar_tokens


def batch_scaling(pair: Pair, batch_sizes: Sequence[int], gamma: int, num_prompts: int,
                  max_new_tokens: int, repeats: int, log) -> list[dict[str, Any]]:
  """tokens/s of autoregressive and speculative decoding over the same prompts at each batch
  size, all runs timed round-robin."""
  runs = [DecodeRun(pair, g, batch_size, num_prompts, max_new_tokens)
          for batch_size in batch_sizes for g in (0, gamma)]
  interleaved(runs, repeats)
  rows = []
  for run in runs:
    result = run.summary()
    result.pop('tokens')
    rows.append(result)
    log(f'[2/4] batch {result["batch_size"]} '
        f'{"speculative" if result["gamma"] else "autoregressive"}: '
        f'{result["tokens_per_second"]["median"]:.0f} tokens/s')
  return rows
