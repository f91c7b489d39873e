"""A decoding run over a JSONL file: validate, load, compile, decode, write (what decode.py runs),
through one DecodeSession (decoding/session.py).

`run(config)` takes the ml_collections config of configs/decode.py. Everything that can be checked
is checked before a model is loaded, anything is compiled or any output file exists; errors are
ValueErrors naming the setting, file, line or id at fault. Output is written to a temporary file
next to the destination and moved into place at the end, so a failed run leaves no partial file.

Compilation is timed apart from decoding: every distinct batch shape (one per prompt-length
bucket in use) is compiled ahead of time, and decode time counts only the compiled programs.

On several processes (config.multihost) every process reads the whole input and runs the same
batches, each batch split over all devices of all hosts; the outputs are gathered and process 0
alone writes the output and the summary (and shows progress).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import tqdm

from mmspec_jax import distributed
from mmspec_jax.decoding import inputs, statistics
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.scheduler import check_admission_order, output_text
from mmspec_jax.decoding.text_stream import TextStream
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.decoding.tree import DraftTree, DynamicTree, parse_tree
from mmspec_jax.models import precision
from mmspec_jax.data.processing import MultimodalProcessor

DRAFT = 'draft'  # The session's name for decode.py's one draft.
BATCHING = ('continuous', 'static')


def summary_path(output: str) -> str:
  """OUT.jsonl -> OUT.summary.json."""
  return os.path.splitext(output)[0] + '.summary.json'


def sampling_config(config) -> SamplingConfig:
  """The validated sampling settings (SamplingConfig raises on out-of-range values)."""
  return SamplingConfig(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)


def draft_tree(config) -> DraftTree | DynamicTree | None:
  """config.draft_tree parsed ('2,2,1' -> DraftTree((2, 2, 1)), 'dynamic:6,4,24' -> a
  DynamicTree); None for a chain."""
  return parse_tree(config.draft_tree) if config.draft_tree else None


def check_settings(config):
  """Refuses settings that are wrong on their own, before any file is read."""
  if config.image:
    raise ValueError('config.image goes with config.prompt (one question about one image); in a '
                     'prompts file each line gives its own "image"')
  for name in ('target', 'prompts', 'output'):
    if not config[name]:
      raise ValueError(f'config.{name} is empty: pass --config.{name}=PATH')
  check_decoding_settings(config)
  if config.batching not in BATCHING:
    raise ValueError(f'batching must be one of {BATCHING}, got {config.batching!r}')
  check_admission_order(config.admission_order)
  output = os.path.abspath(config.output)
  if os.path.isdir(output):
    raise ValueError(f'output {config.output!r} is a directory; give a file path')
  if not os.path.isdir(os.path.dirname(output)):
    raise ValueError(f'the output directory {os.path.dirname(output)!r} does not exist')
  if os.path.abspath(config.prompts) in (output, os.path.abspath(summary_path(output))):
    raise ValueError(f'output {config.output!r} would overwrite the prompts file')


def check_decoding_settings(config):
  """The model and decoding settings decode.py and serve.py share."""
  sampling_config(config)
  draft_tree(config)
  if not 0 <= config.confidence_threshold < 1:
    raise ValueError(f'confidence_threshold must be in [0, 1) (0: a fixed draft length), got '
                     f'{config.confidence_threshold}')
  if not config.draft and (config.draft_tree or config.confidence_threshold):
    raise ValueError('draft_tree and confidence_threshold need a draft: pass --config.draft=DIR')
  if config.draft and config.num_draft_tokens < 1 and not config.draft_tree:
    raise ValueError(f'num_draft_tokens (gamma) must be >= 1 with a draft, got '
                     f'{config.num_draft_tokens}')
  for name in ('max_new_tokens', 'batch_size', 'chunk_steps', 'prefill_width'):
    if config[name] < 1:
      raise ValueError(f'{name} must be >= 1, got {config[name]}')
  if config.slot_capacity < 0:
    raise ValueError(f'slot_capacity must be >= 0 (0: what the requests need), got '
                     f'{config.slot_capacity}')
  if config.dtype not in precision.DTYPE_CHOICES:
    raise ValueError(f'unsupported dtype {config.dtype!r}; expected one of '
                     f'{precision.DTYPE_CHOICES}')
  inputs.check_buckets(config.length_buckets)


def _output_line(request: inputs.Request, token_ids, num_calls, accepted, processor,
                 stopped_by: int | str | None = None) -> str:
  return json.dumps({
      'id': request.id, 'text': output_text(processor, token_ids, stopped_by),
      'token_ids': token_ids,
      'num_target_calls': int(num_calls), 'num_accepted': int(accepted)},
      ensure_ascii=False) + '\n'


def _write_batch(out, batch: inputs.Batch, result, processor: MultimodalProcessor):
  """Writes the real rows' output lines; returns their statistics.row_counts (padding rows are
  decoded but discarded)."""
  counts = statistics.row_counts(result, batch.num_real)
  generated, calls, accepted, *_ = counts
  for request, row, count, num_calls, row_accepted in zip(
      batch.requests, np.asarray(result.tokens)[:batch.num_real], generated, calls, accepted):
    token_ids = row[:count].tolist()  # New tokens only; entries past num_generated are filler.
    out.write(_output_line(request, token_ids, num_calls, row_accepted.sum(), processor))
  return counts


@contextlib.contextmanager
def atomic_writer(path: str):
  """A text file that appears at `path` only if the block completes."""
  handle, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                  prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    # mkstemp makes the file private (0600); give it the permissions open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    with os.fdopen(handle, 'w', encoding='utf-8') as f:
      yield f
    os.replace(temp, path)
  except BaseException:
    os.unlink(temp)
    raise


@contextlib.contextmanager
def _discarding_writer(path: str):
  """What a process other than 0 writes to: nothing."""
  del path
  with open(os.devnull, 'w', encoding='utf-8') as f:
    yield f


def open_session(config) -> DecodeSession:
  """The session of config's target and draft (named DRAFT), checked, nothing loaded yet."""
  return DecodeSession(
      config.target, {DRAFT: config.draft} if config.draft else {}, dtype=config.dtype,
      mesh_shape=config.mesh.to_dict(), rules=config.logical_axis_rules,
      draft_rules=config.draft_logical_axis_rules, layout_config=config.layout)


def speculation(config) -> tuple[str | None, int, DraftTree | DynamicTree | None, float]:
  """(the draft's name or None, gamma, the tree or None, the confidence threshold)."""
  if not config.draft:
    return None, 0, None, 0.0
  tree = draft_tree(config)
  return DRAFT, tree.depth if tree else config.num_draft_tokens, tree, config.confidence_threshold


def _summarize(config, session: DecodeSession, counts, timing: dict) -> statistics.RunStatistics:
  """The run's statistics from its counts (statistics.row_counts' order) and timing figures."""
  draft, gamma, tree, threshold = speculation(config)
  parameters = session.parameter_counts()
  return statistics.summarize(
      *counts, num_draft_tokens=gamma, draft_tree=tree, confidence_threshold=threshold,
      draft_parameters=parameters[draft] if draft else None, target_parameters=parameters[None],
      **timing)


def run_prompt(config, write) -> tuple[statistics.RunStatistics, Any]:
  """Decodes config.prompt (with config.image, if any) in one slot, handing its text to `write`
  piece by piece as chunks finish; returns (its statistics, its Finished)."""
  distributed.initialize(config)
  check_decoding_settings(config)
  sampling = sampling_config(config)
  session = open_session(config)
  draft, gamma, tree, threshold = speculation(config)
  request = session.prompt_request(config.prompt, config.image or None,
                                   max_new_tokens=config.max_new_tokens, num_draft_tokens=gamma,
                                   raw_prompt=config.raw_prompt, sampling=sampling)
  decoder = session.decoder(draft, num_draft_tokens=gamma, sampling=sampling,
                            max_new_tokens=config.max_new_tokens, requests=[request],
                            draft_tree=tree, confidence_threshold=threshold)
  scheduler = session.scheduler(
      decoder, num_slots=1, capacity=len(request.token_ids) + config.max_new_tokens,
      chunk_steps=config.chunk_steps, buckets=config.length_buckets, prefill_width=1,
      key=jax.random.key(config.seed))
  compile_seconds = scheduler.compile([scheduler.bucket(request)])
  text = TextStream(session.processor)
  start = time.perf_counter()
  for event in scheduler.run([(request, config.max_new_tokens)]):
    write(text.add(event.new_tokens))
    if event.finished is not None:
      finished = event.finished
      write(text.finish(finished.stopped_by))
  timing = statistics.latency_figures([finished], start)
  timing.update(decode_seconds=time.perf_counter() - start, compile_seconds=compile_seconds)
  return _summarize(config, session, statistics.finished_counts([finished]), timing), finished


def run(config) -> statistics.RunStatistics:
  """Decodes config.prompts into config.output and config.output's summary; see module doc."""
  # --- validation: nothing loaded, compiled or written yet ------------------------------------
  distributed.initialize(config)
  check_settings(config)
  sampling = sampling_config(config)
  session = open_session(config)
  draft, gamma, tree, threshold = speculation(config)
  requests = session.read_requests(config.prompts, max_new_tokens=config.max_new_tokens,
                                   num_draft_tokens=gamma, raw_prompt=config.raw_prompt,
                                   sampling=sampling)
  decoder = session.decoder(draft, num_draft_tokens=gamma, sampling=sampling,
                            max_new_tokens=config.max_new_tokens, requests=requests,
                            draft_tree=tree, confidence_threshold=threshold)
  if config.batching == 'static':
    own = next((r for r in requests if r.max_new_tokens is not None or r.stop
                or r.sampling not in (None, sampling)), None)
    if own is not None:
      raise ValueError(f'{config.prompts} line {own.line} (id {own.id!r}) gives its own '
                       '"max_new_tokens", sampling settings or "stop": that needs '
                       '--config.batching=continuous')
  primary = distributed.is_primary()
  progress = tqdm.tqdm(total=len(requests), unit='request', file=sys.stderr, desc='decoding',
                       disable=not primary)
  writer = atomic_writer if primary else _discarding_writer
  decode = _decode_continuous if config.batching == 'continuous' else _decode_static
  with progress, writer(config.output) as out:
    counts, timing = decode(config, session, decoder, requests, out, progress)
    stats = _summarize(config, session, counts, timing)
    # Inside the output's block: the summary and the output appear together or not at all.
    with writer(summary_path(config.output)) as f:
      json.dump(stats.as_dict(), f, indent=2)
  return stats


def _decode_static(config, session, decoder, requests, out, progress):
  """Closed batches in input order, each decoded until its slowest row ends."""
  batches = inputs.make_batches(requests, config.batch_size, config.length_buckets)
  compile_seconds = session.compile(decoder, batches)  # Loads, then compiles every shape.
  counts, decode_seconds, new_tokens = [], 0.0, 0
  base_key = jax.random.key(config.seed)
  for batch in batches:
    result, seconds = session.decode(decoder, batch, base_key)
    decode_seconds += seconds
    counts.append(_write_batch(out, batch, result, session.processor))
    new_tokens += int(counts[-1][0].sum())
    progress.update(batch.num_real)
    progress.set_postfix(tokens_per_s=f'{new_tokens / max(decode_seconds, 1e-9):.1f}')
  return statistics.concatenate_counts(counts), {'decode_seconds': decode_seconds,
                                                  'compile_seconds': compile_seconds}


def _decode_continuous(config, session, decoder, requests, out, progress):
  """Slots refilled as rows finish (decoding/scheduler.py); output in input order."""
  budget = lambda r: r.max_new_tokens or config.max_new_tokens
  capacity = config.slot_capacity or max(len(r.token_ids) + budget(r) for r in requests)
  scheduler = session.scheduler(
      decoder, num_slots=config.batch_size, capacity=capacity, chunk_steps=config.chunk_steps,
      buckets=config.length_buckets, prefill_width=config.prefill_width,
      key=jax.random.key(config.seed), admission_order=config.admission_order)
  for request in requests:  # All checked before anything is compiled.
    scheduler.check(request, budget(request))
  compile_seconds = scheduler.compile([scheduler.bucket(r) for r in requests])
  finished = {}
  new_tokens = 0
  start = time.perf_counter()
  for event in scheduler.run([(r, budget(r)) for r in requests]):
    new_tokens += len(event.new_tokens)
    if event.finished is not None:
      finished[event.handle] = event.finished
      progress.update(1)
      progress.set_postfix(tokens_per_s=f'{new_tokens / (time.perf_counter() - start):.1f}')
  decode_seconds = time.perf_counter() - start
  done = [finished[handle] for handle in range(len(requests))]  # Handles in submission order.
  for f in done:
    out.write(_output_line(f.request, f.token_ids, f.num_target_calls,
                           f.accepted_by_position.sum(), session.processor, f.stopped_by))
  counts = statistics.finished_counts(done)
  timing = statistics.latency_figures(done, start)
  timing.update(decode_seconds=decode_seconds, compile_seconds=compile_seconds,
                slot_utilization=scheduler.utilization)
  return counts, timing
