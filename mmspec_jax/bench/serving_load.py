"""Section 7: the server under load, against decode.py's offline throughput on the same requests.

The demo pair is served from its exported directories (serve.py's Server on 127.0.0.1, 8 slots)
and a bounded load generator sends the same 64 chat requests (world prompts, each with its image
as a base64 data URL, greedy, 64 tokens at most) from 1, 4 and 16 concurrent streaming clients.
Offline is the same Server's scheduler run over the same requests (inputs.Request objects built by
the server's own request builder) with no HTTP: what decode.py does. Figures: tokens/s,
requests/s, time to first token and inter-token latency (between a stream's events; speculative
decoding sends several tokens per event) p50/p99, and the server's tokens/s over offline's. Each
client count runs `repeats` times, each run right after an offline run of its own (a shared VM
drifts by tens of percent between minutes): the figures are the median run's, the ratio the median
of the paired ratios, with their range.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import multiprocessing
import time
from collections.abc import Callable

import numpy as np

from mmspec_jax.bench import timing
from mmspec_jax.demo import artifacts
from mmspec_jax.decoding import statistics
from mmspec_jax.evaluation import tasks as task_data
from mmspec_jax.serving import local, protocol
from mmspec_jax.serving.app import Server
from mmspec_jax.serving.defaults import serve_config
from mmspec_jax.serving.local import httpx

CLIENTS = (1, 4, 16)
NUM_REQUESTS = 64
MAX_TOKENS = 64
NUM_SLOTS = 8
GAMMA = 3
MODEL = 'demo'
REQUEST_TIMEOUT_SECONDS = 300
STARTUP_SECONDS = 600


def chat_bodies(server: Server, num: int) -> list[dict]:
  """`num` chat requests: the world's tasks' questions with their images, interleaved."""
  per_task = []
  for task in ('captioning', 'sqa', 'conversation'):
    examples = task_data.read_task(artifacts.world_dir(), task, server.session.processor,
                                   server.session.target_config, num_examples=num,
                                   max_new_tokens=MAX_TOKENS)
    per_task.append(examples)
  bodies = []
  for example in [e for row in zip(*per_task) for e in row][:num]:
    question, _ = task_data._first_exchange(example.record, '')  # pylint: disable=protected-access
    content = [{'type': 'text', 'text': question}]
    if example.request.image is not None:
      with open(example.request.image, 'rb') as f:
        url = 'data:image/png;base64,' + base64.b64encode(f.read()).decode()
      content.append({'type': 'image_url', 'image_url': {'url': url}})
    bodies.append({'model': MODEL, 'messages': [{'role': 'user', 'content': content}],
                   'max_tokens': MAX_TOKENS, 'temperature': 0})
  return bodies


def offline(server: Server, bodies: list[dict]) -> dict:
  """decode.py's way over the same requests: the scheduler, no HTTP; after a warm-up."""
  work = [server._chat_request(protocol.ChatCompletionRequest.model_validate(b), f'offline-{i}')
          for i, b in enumerate(bodies)]  # pylint: disable=protected-access
  scheduler = server.session.scheduler(
      server.decoder, num_slots=NUM_SLOTS, capacity=server.engine.scheduler.programs.capacity,
      chunk_steps=server.config.chunk_steps, buckets=server.config.length_buckets,
      prefill_width=server.config.prefill_width)
  compile_seconds = scheduler.compile([scheduler.bucket(r) for r, _ in work])
  for _ in scheduler.run(work[:2 * NUM_SLOTS]):
    pass
  start = time.perf_counter()
  done = [e.finished for e in scheduler.run(work) if e.finished is not None]
  seconds = time.perf_counter() - start
  tokens = sum(f.num_generated for f in done)
  return {'tokens_per_second': tokens / seconds, 'requests_per_second': len(done) / seconds,
          'new_tokens': tokens, 'compile_seconds': compile_seconds,
          'slot_utilization': scheduler.utilization}


def load(base: str, bodies: list[dict], clients: int) -> dict:
  """_load, run in a process of its own (see run_section)."""
  return asyncio.run(_load(base, bodies, clients))


async def _load(base: str, bodies: list[dict], clients: int) -> dict:
  """Streams every body from `clients` concurrent clients, each taking the next when done."""
  pending = list(bodies)
  rows = []
  # One connection pool for every client, made before the clock starts (making an HTTP client
  # costs tens of milliseconds: the load generator's cost, not the server's).
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS, limits=limits)

  async def client():  # One request after another, each streamed to its end.
    while pending:
      body = dict(pending.pop(0), stream=True, stream_options={'include_usage': True})
      sent, arrivals, tokens = time.perf_counter(), [], 0
      async with http.stream('POST', f'{base}/v1/chat/completions', json=body) as response:
        if response.status_code != 200:
          raise RuntimeError(f'status {response.status_code}: {await response.aread()}')
        async for line in response.aiter_lines():
          if not line.startswith('data: ') or line == 'data: [DONE]':
            continue
          chunk = json.loads(line[len('data: '):])
          if chunk.get('usage'):
            tokens = chunk['usage']['completion_tokens']
          elif chunk['choices'] and chunk['choices'][0]['delta'].get('content'):
            arrivals.append(time.perf_counter())
      rows.append((sent, arrivals, tokens))

  async with http:
    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    seconds = time.perf_counter() - start
  first = [a[0] - sent for sent, a, _ in rows if a]
  gaps = [g for _, a, _ in rows for g in np.diff(a)]
  tokens = sum(t for _, _, t in rows)
  return {'tokens_per_second': tokens / seconds, 'requests_per_second': len(rows) / seconds,
          'new_tokens': tokens, 'time_to_first_token': statistics.percentiles(first),
          'inter_token_latency': statistics.percentiles(gaps)}


def run_section(*, repeats: int = 1, log: Callable[[str], None]) -> dict:
  results = {}
  for kind, gamma in (('autoregressive', 0), ('speculative', GAMMA)):
    config = serve_config()
    port = local.free_port()
    config.update(
        target=artifacts.export_dir(artifacts.DEMO_TARGET_STAGE),
        draft=artifacts.export_dir(artifacts.DEMO_DRAFT_STAGE) if gamma else '',
        num_draft_tokens=max(gamma, 1), port=port, batch_size=NUM_SLOTS,
        max_new_tokens=MAX_TOKENS, slot_capacity=128 + MAX_TOKENS, length_buckets=(32, 64, 96, 128),
        served_model_name=MODEL, max_waiting=NUM_REQUESTS)
    server = Server(config)
    bodies = chat_bodies(server, NUM_REQUESTS)
    cell, offline_runs = {'clients': {}}, []
    # The clients run in a process of their own, as real clients would: in this one they would
    # take the interpreter lock from the server's HTTP loop and engine thread.
    spawn = multiprocessing.get_context('spawn')
    with (local.serving(server.app, port, STARTUP_SECONDS) as base,
          concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients_process):
      clients_process.submit(load, base, bodies[:2 * NUM_SLOTS], NUM_SLOTS).result()  # Warm-up.
      for clients in CLIENTS:
        runs, baselines = [], []
        for _ in range(repeats):  # The engine idles between runs: offline runs beside it.
          baselines.append(offline(server, bodies))
          runs.append(clients_process.submit(load, base, bodies, clients).result())
        offline_runs += baselines
        ratio, (low, high) = timing.paired_ratio(runs, baselines)
        row = dict(timing.median_run(runs), over_offline=ratio, over_offline_range=(low, high),
                   repeats=repeats)
        cell['clients'][clients] = row
        log(f'[7] {kind}, {clients} clients: {row["tokens_per_second"]:.0f} tokens/s, '
            f'{ratio:.0%} of offline [{low:.0%}-{high:.0%}] (median of {repeats})')
    cell['offline'] = timing.median_run(offline_runs)
    results[kind] = cell
  return results


def markdown(section: dict) -> list[str]:
  repeats = max((row.get('repeats', 1) for cell in section.values()
                 for row in cell['clients'].values()), default=1)
  lines = [f'tokens/s and the latencies: the median run of {repeats}, each run after an offline '
           'run of its own; of offline: the median of the paired server / offline ratios [their '
           'range]; offline: the median offline run.', '',
           '| decoding | clients | tokens/s | of offline | requests/s | TTFT p50 / p99 s | '
           'inter-token p50 / p99 s |', '|---|---|---|---|---|---|---|']
  for kind, cell in section.items():
    off = cell['offline']
    lines.append(f'| {kind} | offline | {off["tokens_per_second"]:.0f} | 100% | '
                 f'{off["requests_per_second"]:.1f} | | |')
    for clients, row in cell['clients'].items():
      ttft, itl = row['time_to_first_token'] or {}, row['inter_token_latency'] or {}
      low, high = row.get('over_offline_range', (row['over_offline'], row['over_offline']))
      spread = f' [{low:.0%}-{high:.0%}]' if row.get('repeats', 1) > 1 else ''
      lines.append(
          f'| {kind} | {clients} | {row["tokens_per_second"]:.0f} | {row["over_offline"]:.0%}'
          f'{spread} | '
          f'{row["requests_per_second"]:.1f} | {ttft.get("p50", 0):.3f} / '
          f'{ttft.get("p99", 0):.3f} | {itl.get("p50", 0):.4f} / {itl.get("p99", 0):.4f} |')
  for kind, cell in section.items():
    most = cell['clients'].get(max(CLIENTS))
    if most:
      met = 'met' if most['over_offline'] >= 0.85 else 'not met'
      lines += ['', f'{kind}: at {max(CLIENTS)} clients the server reaches '
                f'{most["over_offline"]:.0%} of offline tokens/s (goal >= 85%: {met})']
  return lines
