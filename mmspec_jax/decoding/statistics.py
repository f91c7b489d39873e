"""Run statistics: block efficiency, acceptance by draft position, MBSU, throughput.

Block efficiency tau counts the tokens each verification step produces, the target's own
correction or bonus token included (vLLM's and SGLang's "mean acceptance length"), so
1 <= tau <= gamma + 1. The prefill's first token is left out of tau: it is not speculative.

Steps cut short. A row's last step may end early: at its first EOS, or at max_new_tokens. Such
a step counts as one verification step, and only the tokens the row keeps count (up to and
including the EOS, within the budget): tau = (kept tokens - 1) / steps. The acceptance rate at
draft position i is accepted / reached over all steps (the engine counts both per row): position
i is reached in a step when every draft before it was accepted and the row still wanted a token
at i (i < the tokens it keeps), and accepted when, moreover, the target accepted it. So a cut
step counts the positions it needed and nothing past them: positions the row no longer wanted
are neither rejected nor accepted. A row that is done takes no further steps and counts nothing.

Trees (decoding/tree.py): position i is depth i + 1, so the same counts hold, with G the depth.

MBSU, the memory-bound speedup, generalized to trees and adaptive lengths:
    MBSU = tau / (c * k + v(n))
k: draft calls per verification step (gamma for a chain, the depth for a tree, the mean calls
made for an adaptive length); c: draft parameters / target parameters (a call reads the draft's
weights once however many tokens it feeds); v(n): the cost of one target call on the n tokens a
step verifies (gamma + 1 for a chain, N + 1 for a tree of N nodes), in 1-token target calls. A
memory-bound accelerator reads the weights once for any small n, so v(n) = 1 (the paper's
tau / (c * gamma + 1)); on a machine where verification costs grow with n, pass the measured
v(n) (`make bench` section 3 measures it).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def expected_block_efficiency(acceptance_rate: float, num_draft_tokens: int) -> float:
  """tau when each draft token is accepted independently with probability alpha."""
  alpha, gamma = acceptance_rate, num_draft_tokens
  if alpha == 1:
    return gamma + 1.0
  return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def memory_bound_speedup(block_efficiency: float, draft_calls_per_step: float,
                         draft_parameters: int, target_parameters: int,
                         verification_cost: float = 1.0) -> float:
  """MBSU = tau / (c * k + v(n)): k draft calls per step, c = draft parameters / target
  parameters, v(n) = `verification_cost` (module doc). With k = gamma and v = 1 it is the
  paper's tau / (c * gamma + 1)."""
  cost_ratio = draft_parameters / target_parameters
  return block_efficiency / (cost_ratio * draft_calls_per_step + verification_cost)


@dataclasses.dataclass
class RunStatistics:
  num_rows: int
  num_draft_tokens: int  # gamma, or the tree's depth
  new_tokens: int
  target_calls: int  # prefills included
  verification_steps: int
  block_efficiency: float  # tau
  acceptance_rate_by_position: list[float]  # P(draft position i accepted | reached)
  accepted_per_step: float
  mbsu: float | None
  draft_parameters: int | None
  target_parameters: int | None
  draft_calls_per_step: float = 0.0  # k in the MBSU
  verified_tokens: int = 1  # n: tokens each verification reads
  draft_tree: str | None = None  # '2x2x1'; None for a chain
  confidence_threshold: float = 0.0
  decode_seconds: float | None = None
  compile_seconds: float | None = None
  tokens_per_second: float | None = None
  # Continuous batching (decoding/scheduler.py): active row-steps / slot-steps; seconds from a
  # request's submission to its first token, and between consecutive tokens, at percentiles.
  slot_utilization: float | None = None
  requests_per_second: float | None = None
  time_to_first_token: dict[str, float] | None = None
  per_token_latency: dict[str, float] | None = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# The per-row counts of a DecodeResult that `summarize` takes, in its order.
COUNT_FIELDS = ('num_generated', 'num_target_calls', 'accepted_by_position', 'reached_by_position',
                'draft_calls')


def row_counts(result, num_rows: int) -> tuple[np.ndarray, ...]:
  """A DecodeResult's COUNT_FIELDS for its first `num_rows` rows (the real ones of a padded
  batch), as numpy arrays."""
  return tuple(np.asarray(getattr(result, name))[:num_rows] for name in COUNT_FIELDS)


def concatenate_counts(batches: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
  """`row_counts` of several batches -> the same over all their rows."""
  return tuple(np.concatenate(field) for field in zip(*batches))


def summarize(num_generated, num_target_calls, accepted_by_position, reached_by_position,
              draft_calls=None, *, num_draft_tokens: int, draft_tree=None,
              confidence_threshold: float = 0.0,
              draft_parameters: int | None = None, target_parameters: int | None = None,
              decode_seconds: float | None = None, compile_seconds: float | None = None,
              slot_utilization: float | None = None,
              time_to_first_token: dict[str, float] | None = None,
              per_token_latency: dict[str, float] | None = None) -> RunStatistics:
  """Statistics over rows: num_generated, num_target_calls, draft_calls int[R];
  accepted_by_position and reached_by_position int[R, G] (the engine's DecodeResult).
  draft_tree: the decoding/tree.DraftTree decoded with (None: a chain of num_draft_tokens)."""
  num_generated = np.asarray(num_generated, np.int64)
  num_target_calls = np.asarray(num_target_calls, np.int64)
  accepted = np.asarray(accepted_by_position, np.int64).reshape(len(num_generated), -1)
  reached = np.asarray(reached_by_position, np.int64).reshape(accepted.shape)
  steps = int((num_target_calls - 1).sum())
  speculative_tokens = int((num_generated - 1).sum())
  tau = speculative_tokens / steps if steps else 1.0
  rates = [float(a / r) if r else 0.0 for a, r in zip(accepted.sum(0), reached.sum(0))]
  if draft_calls is None or not steps:
    calls_per_step = float(num_draft_tokens)
  else:
    calls_per_step = float(np.asarray(draft_calls, np.int64).sum() / steps)
  mbsu = None
  if draft_parameters and target_parameters:
    mbsu = memory_bound_speedup(tau, calls_per_step, draft_parameters, target_parameters)
  num_nodes = draft_tree.num_nodes if draft_tree is not None else num_draft_tokens
  new_tokens = int(num_generated.sum())
  return RunStatistics(
      num_rows=len(num_generated), num_draft_tokens=num_draft_tokens, new_tokens=new_tokens,
      target_calls=int(num_target_calls.sum()), verification_steps=steps,
      block_efficiency=tau, acceptance_rate_by_position=rates,
      accepted_per_step=float(accepted.sum() / steps) if steps else 0.0, mbsu=mbsu,
      draft_parameters=draft_parameters, target_parameters=target_parameters,
      draft_calls_per_step=calls_per_step, verified_tokens=num_nodes + 1,
      draft_tree=None if draft_tree is None else str(draft_tree),
      confidence_threshold=confidence_threshold, decode_seconds=decode_seconds,
      compile_seconds=compile_seconds,
      tokens_per_second=new_tokens / decode_seconds if decode_seconds else None,
      slot_utilization=slot_utilization,
      requests_per_second=(len(num_generated) / decode_seconds
                           if decode_seconds and slot_utilization is not None else None),
      time_to_first_token=time_to_first_token, per_token_latency=per_token_latency)


def finished_counts(finished) -> tuple[np.ndarray, ...]:
  """COUNT_FIELDS over the scheduler's Finished requests."""
  return (np.array([f.num_generated for f in finished]),
          np.array([f.num_target_calls for f in finished]),
          np.stack([f.accepted_by_position for f in finished]),
          np.stack([f.reached_by_position for f in finished]),
          np.array([f.draft_calls for f in finished]))


def percentiles(values) -> dict[str, float] | None:
  """{'p50', 'p90', 'p99'} of `values` (seconds), None when there are none."""
  if len(values) == 0:
    return None
  return {f'p{q}': float(np.percentile(values, q)) for q in (50, 90, 99)}


def latency_figures(finished, start: float) -> dict:
  """Time to first token (from the later of submission and `start`, the first admission) and
  per-token latency (a request's time per output token after its first, vLLM's TPOT: tokens of
  one chunk arrive together, so single gaps say little) over the scheduler's Finished requests."""
  first = [f.first_token - max(f.submitted, start) for f in finished if f.first_token is not None]
  per_token = [(f.token_times[-1] - f.token_times[0]) / (len(f.token_times) - 1)
               for f in finished if len(f.token_times) > 1]
  return {'time_to_first_token': percentiles(first), 'per_token_latency': percentiles(per_token)}


def _shape(stats: RunStatistics) -> str:
  shape = (f'tree {stats.draft_tree} ({stats.verified_tokens} tokens verified)'
           if stats.draft_tree else f'gamma {stats.num_draft_tokens}')
  if stats.confidence_threshold:
    shape += (f'  adaptive (threshold {stats.confidence_threshold:g}, '
              f'{stats.draft_calls_per_step:.2f} draft calls/step)')
  return shape


def format_table(stats: RunStatistics) -> str:
  """A human-readable summary block."""
  lines = [
      f'rows {stats.num_rows}  new tokens {stats.new_tokens}  target calls {stats.target_calls}',
      f'{_shape(stats)}  tau (block efficiency) {stats.block_efficiency:.3f}  '
      f'accepted/step {stats.accepted_per_step:.3f}'
      + (f'  MBSU {stats.mbsu:.3f}' if stats.mbsu is not None else ''),
  ]
  if stats.acceptance_rate_by_position:
    rates = ' '.join(f'{r:.2f}' for r in stats.acceptance_rate_by_position)
    lines.append(f'acceptance rate by draft {"depth" if stats.draft_tree else "position"}: '
                 f'{rates}')
  if stats.tokens_per_second is not None:
    lines.append(f'{stats.tokens_per_second:.1f} tokens/s over {stats.decode_seconds:.2f}s '
                 f'(compile {stats.compile_seconds or 0:.2f}s, reported apart)')
  return '\n'.join(lines)
