"""`GET /metrics`: Prometheus text, with vLLM's metric names under our own prefix."""

from __future__ import annotations

import prometheus_client as prom

from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.scheduler import Event

PREFIX = 'mmspec:'
# Seconds; the chunk boundary sets the grain of both.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
  """The server's counters, on a registry of its own. `observe` runs on the engine's thread for
  every event; the running and waiting gauges read the engine when scraped."""

  def __init__(self, engine, num_draft_tokens: int, eos_token_ids: tuple[int, ...]):
    self.registry = prom.CollectorRegistry()
    self.num_draft_tokens, self.eos_token_ids = num_draft_tokens, eos_token_ids
    self._steps = self._accepted = 0  # For the mean acceptance length.
    gauge = lambda name, doc: prom.Gauge(PREFIX + name, doc, registry=self.registry)
    counter = lambda name, doc, **kw: prom.Counter(PREFIX + name, doc, registry=self.registry,
                                                   **kw)
    gauge('num_requests_running', 'Requests in a decode slot.').set_function(
        lambda: engine.num_running)
    gauge('num_requests_waiting', 'Requests waiting for a slot.').set_function(
        lambda: engine.num_waiting)
    self.prompt_tokens = counter('prompt_tokens', 'Prompt tokens of finished requests.')
    self.generation_tokens = counter('generation_tokens', 'Tokens generated (streamed out).')
    self.request_success = counter('request_success', 'Finished requests by finish reason.',
                                   labelnames=('finished_reason',))
    self.draft_tokens = counter('spec_decode_num_draft_tokens',
                                'Draft tokens proposed (verification steps x gamma).')
    self.accepted_tokens = counter('spec_decode_num_accepted_tokens', 'Draft tokens accepted.')
    self.verifications = counter('spec_decode_num_drafts', 'Verification steps (target calls '
                                 'after the prefill).')
    gauge('spec_decode_mean_acceptance_length', 'Tokens per verification step, the target\'s '
          'own included (tau); 0 before any.').set_function(self._mean_acceptance_length)
    self.time_to_first_token = prom.Histogram(
        PREFIX + 'time_to_first_token_seconds', 'From submission to the first token.',
        buckets=TTFT_BUCKETS, registry=self.registry)
    self.inter_token_latency = prom.Histogram(
        PREFIX + 'inter_token_latency_seconds', 'Between consecutive tokens (a chunk\'s tokens '
        'arrive together: its gap is shared among them).', buckets=ITL_BUCKETS,
        registry=self.registry)

  def _mean_acceptance_length(self) -> float:
    return (self._steps + self._accepted) / self._steps if self._steps else 0.0

  def observe(self, request: inputs.Request | None, event: Event):
    self.generation_tokens.inc(len(event.new_tokens))
    finished = event.finished
    if finished is None or finished.cancelled:
      return
    steps = finished.num_target_calls - 1
    self.prompt_tokens.inc(len(finished.request.token_ids))
    self.request_success.labels(
        finished_reason=finish_reason(finished, self.eos_token_ids)).inc()
    if self.num_draft_tokens:
      accepted = int(finished.accepted_by_position.sum())
      self.verifications.inc(steps)
      self.draft_tokens.inc(steps * self.num_draft_tokens)
      self.accepted_tokens.inc(accepted)
      self._steps, self._accepted = self._steps + steps, self._accepted + accepted
    if finished.first_token is not None:
      self.time_to_first_token.observe(finished.first_token - finished.submitted)
    times = finished.token_times
    for previous, current, count in _chunks(times):
      for _ in range(count):
        self.inter_token_latency.observe((current - previous) / count)

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


def _chunks(times: list[float]):
  """(previous arrival, arrival, tokens) of each chunk after the first."""
  arrivals: list[tuple[float, int]] = []
  for t in times:
    if arrivals and arrivals[-1][0] == t:
      arrivals[-1] = (t, arrivals[-1][1] + 1)
    else:
      arrivals.append((t, 1))
  return [(a[0], b[0], b[1]) for a, b in zip(arrivals, arrivals[1:])]


def finish_reason(finished, eos_token_ids: tuple[int, ...]) -> str:
  """OpenAI's: 'stop' (EOS or a stop sequence) or 'length' (the budget ran out)."""
  if finished.stopped_by is not None or (finished.token_ids
                                         and finished.token_ids[-1] in eos_token_ids):
    return 'stop'
  budget = finished.request.max_new_tokens
  return 'length' if budget is not None and finished.num_generated >= budget else 'stop'
