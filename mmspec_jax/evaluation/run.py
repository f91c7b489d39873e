"""The paper's evaluation: block efficiency and MBSU per task x draft x gamma x sampling.

One decoder is built per (draft, gamma or shape, sampling), plus the target alone (gamma 0,
greedy) for its answer quality and a tokens/s baseline. Each decoder decodes through one
continuous-batching scheduler (decoding/scheduler.py) of `batch_size` slots, a task's examples
submitted together, each slot refilled as its example ends. Every prompt of every task is padded
to one length, so each decoder compiles its programs exactly once per run; compile time is kept
apart from decode time. The same scheduler then runs every task, one cell per task.

Beside the chains of each gamma, `shapes` adds trees and adaptive lengths (decoding/tree.py's
parse_shape: '3,2,1' a tree, '1,1,1,1,1@0.4' an adaptive chain); their cells carry `shape` (the
label, '3x2x1') and gamma = the depth; chain cells have shape None.

A cell is a dict: what was run (task, draft, draft_kind, gamma, shape, sampling, temperature), the
`statistics.RunStatistics` fields (block_efficiency = tau, mbsu, acceptance_rate_by_position,
tokens_per_second, ...), `wallclock_speedup` over the target alone on the same task, and for the
target-alone cells `quality` (the mean score) and `examples` (id, prediction, reference, score).
`compile_seconds` is the decoder's (compile plus one warm-up batch), shared by all its tasks.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmspec_jax.decoding import inputs, statistics
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.scheduler import Scheduler
from mmspec_jax.decoding.session import DRAFT_KINDS, DecodeSession
from mmspec_jax.decoding.tree import parse_shape, shape_label
from mmspec_jax.evaluation import report, tasks as task_data
from mmspec_jax.models.config import SUPPORTED_DTYPES
from mmspec_jax.data.processing import MultimodalProcessor

DEFAULT_TASKS = ('captioning', 'sqa', 'conversation')
DEFAULT_GAMMAS = (1, 2, 3, 4, 5, 6, 7)
SAMPLINGS = {'greedy': SamplingConfig(temperature=0.0), 'sample': SamplingConfig(temperature=1.0)}
TARGET_ONLY = 'target'  # The `draft` of the target-alone cells.
# Every prompt of the run is padded to the smallest of these that fits them all.
LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
_DRAFT_NAME = re.compile(r'[A-Za-z0-9_.-]+')

ScoreFn = Callable[[str, str, dict], float]


def _stderr(line: str):
  print(line, file=sys.stderr, flush=True)


def parse_drafts(drafts: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
  """'NAME:DIR' strings (or a NAME -> DIR mapping) -> {NAME: DIR}, in order."""
  if isinstance(drafts, Mapping):
    pairs = list(drafts.items())
  else:
    pairs = []
    for spec in drafts:
      name, sep, directory = spec.partition(':')
      if not sep or not directory:
        raise ValueError(f'draft {spec!r}: expected NAME:DIR, e.g. language:runs/chat/export')
      pairs.append((name, directory))
  parsed = {}
  for name, directory in pairs:
    if not _DRAFT_NAME.fullmatch(name) or name == TARGET_ONLY:
      raise ValueError(f'draft name {name!r}: use letters, digits, "_", "." or "-", and not '
                       f'{TARGET_ONLY!r}')
    if name in parsed:
      raise ValueError(f'draft name {name!r} is given twice')
    parsed[name] = directory
  return parsed


def _check_settings(tasks, gammas, samplings, max_new_tokens, batch_size, num_examples, dtype):
  if not tasks or len(set(tasks)) != len(tasks) or not all(tasks):
    raise ValueError(f'tasks must be distinct non-empty names, got {list(tasks)}')
  if not gammas or len(set(gammas)) != len(gammas) or not all(
      isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in gammas):
    raise ValueError(f'gammas must be distinct integers >= 1 (the target alone, gamma 0, always '
                     f'runs), got {list(gammas)}')
  unknown = [s for s in samplings if s not in SAMPLINGS]
  if not samplings or unknown or len(set(samplings)) != len(samplings):
    raise ValueError(f'samplings must be distinct names among {sorted(SAMPLINGS)}, got '
                     f'{list(samplings)}')
  for name, value in (('max_new_tokens', max_new_tokens), ('batch_size', batch_size),
                      ('num_examples', num_examples)):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'unsupported dtype {dtype!r}; expected one of {SUPPORTED_DTYPES}')


def _default_score_fn() -> ScoreFn:
  try:  # Imported here: the world's scorers are only needed when no score_fn is given.
    from mmspec_jax.data.world.scoring import score
  except ImportError as e:
    raise ValueError('answer scoring needs mmspec_jax.data.world.scoring.score(task, prediction, '
                     f'record); pass score_fn= instead ({e})') from e
  return score


def check_draft_kinds(session: DecodeSession):
  """A draft named 'language' must be a LLaMA draft and one named 'adapter' an adapter draft."""
  for name, config in session.draft_configs.items():
    kind = DRAFT_KINDS[type(config)]
    if name in DRAFT_KINDS.values() and name != kind:
      raise ValueError(f'draft {name!r} ({session.draft_dirs[name]}) is of kind {kind!r}: the '
                       f'names {sorted(DRAFT_KINDS.values())} must match the kind')


def _decoder_specs(drafts: Sequence[str], gammas: Sequence[int], samplings: Sequence[str],
                   shapes: Sequence[str] = ()):
  """(draft name or None, gamma, sampling name, tree or None, threshold): the target alone
  first, for its quality; each draft's chains, then its shapes."""
  yield None, 0, 'greedy', None, 0.0
  for name in drafts:
    for sampling in samplings:
      for gamma in sorted(gammas):
        yield name, gamma, sampling, None, 0.0
      for shape in shapes:
        tree, threshold = parse_shape(shape)
        yield name, tree.depth, sampling, tree, threshold


def _decode_task(scheduler: Scheduler, requests: Sequence[inputs.Request], max_new_tokens: int,
                 key: jax.Array):
  """Runs one task's requests through the scheduler, each drawing from inputs.request_keys under
  `key`.

  Returns (new tokens: a list of ints per request, in order; statistics.finished_counts over them;
  the seconds from the first submission until the last request finished).
  """
  # Read when a request enters a slot: the scheduler is idle between tasks, so this task's
  # requests, and only they, draw under this task's key.
  scheduler.run_key = key
  start = time.perf_counter()
  finished = {}
  for event in scheduler.run([(r, max_new_tokens) for r in requests]):
    if event.finished is not None:
      finished[event.handle] = event.finished
  seconds = time.perf_counter() - start
  done = [finished[handle] for handle in sorted(finished)]  # Handles grow with submission.
  return [f.token_ids for f in done], statistics.finished_counts(done), seconds


def _score(examples: Sequence[task_data.Example], tokens, processor: MultimodalProcessor,
           task: str, score_fn: ScoreFn) -> tuple[float, list[dict]]:
  """(mean score, per-example rows) of the target's greedy answers."""
  rows = []
  for example, row_tokens in zip(examples, tokens):
    prediction = processor.decode(row_tokens)
    value = float(score_fn(task, prediction, example.record))
    if not 0 <= value <= 1:
      raise ValueError(f'task {task!r}, id {example.request.id!r}: score {value} is outside '
                       '[0, 1]')
    rows.append({'id': example.request.id, 'prediction': prediction,
                 'reference': example.reference, 'score': value})
  return float(np.mean([r['score'] for r in rows])), rows


def _progress_line(number: int, total: int, cell: dict) -> str:
  shape = f'tree {cell["shape"]}' if cell.get('shape') else f'gamma={cell["gamma"]}'
  what = f'{cell["task"]} {cell["draft"]} {shape} {cell["sampling"]}'
  line = (f'[{number}/{total}] {what}: tau {cell["block_efficiency"]:.3f}'
          + (f' MBSU {cell["mbsu"]:.3f}' if cell['mbsu'] is not None else ''))
  if cell['acceptance_rate_by_position']:
    line += ' acceptance ' + ' '.join(f'{r:.2f}' for r in cell['acceptance_rate_by_position'])
  if 'quality' in cell:
    line += f' quality {cell["quality"]:.3f}'
  return line + (f' | {cell["tokens_per_second"] or 0:.1f} tokens/s '
                 f'(compile {cell["compile_seconds"]:.1f}s)')


def evaluate(target: str, drafts: Iterable[str] | Mapping[str, str], data_dir: str, *,
             tasks: Sequence[str] = DEFAULT_TASKS, gammas: Sequence[int] = DEFAULT_GAMMAS,
             shapes: Sequence[str] = (), samplings: Sequence[str] = tuple(SAMPLINGS),
             max_new_tokens: int = 64, batch_size: int = 16, num_examples: int = 32, out_dir: str | None = None,
             seed: int = 0, dtype: str = 'float32',
             mesh_shape: Mapping[str, int] | None = None, score_fn: ScoreFn | None = None,
             log: Callable[[str], None] = _stderr) -> list[dict[str, Any]]:
  """Evaluates every draft at every gamma and sampling on every task; see the module docstring.

  Args:
    target: the LLaVA (or LLaMA) target's directory, Hugging Face or converted.
    drafts: 'NAME:DIR' strings or {NAME: DIR}. A draft named 'language' must be a LLaMA
      (language-only) draft and one named 'adapter' an adapter draft; other names may be either.
    data_dir: holds test_{task}.json and images/ (see mmspec_jax/evaluation/tasks.py).
    tasks, gammas, samplings: the grid; samplings among 'greedy' (temperature 0) and 'sample'
      (temperature 1).
    shapes: trees and adaptive lengths beside the gammas, as decoding.tree.parse_shape reads
      them: '3,2,1' (a tree), '1,1,1,1,1@0.4' (a chain of 5, adaptive at threshold 0.4).
    max_new_tokens, batch_size: as decode.py's.
    num_examples: the first this many records of each task.
    out_dir: where results.json, results.md and tau_vs_gamma.png go (created if missing);
      results.json is rewritten after every cell, so an interrupted run keeps what it finished.
    seed: a request of task t decodes with inputs.request_keys under fold_in(key(seed), t), for
      every decoder.
    dtype: compute and parameter dtype of all models.
    mesh_shape: decode.py's mesh (axis -> size, -1 fills); default all devices on `data`.
    score_fn: score(task, prediction, record) -> float in [0, 1]; default
      mmspec_jax.data.world.scoring.score.
    log: receives one progress line per cell.

  Returns:
    The cells, target-alone cells first.
  """
  # --- validation: nothing loaded or compiled yet ------------------------------------------------
  tasks, gammas, samplings, shapes = list(tasks), list(gammas), list(samplings), list(shapes)
  _check_settings(tasks, gammas, samplings, max_new_tokens, batch_size, num_examples, dtype)
  parsed_shapes = [parse_shape(shape) for shape in shapes]
  if len({shape_label(*shape) for shape in parsed_shapes}) != len(shapes):
    raise ValueError(f'shapes must be distinct, got {shapes}')
  depth = max([*gammas, *(tree.depth for tree, _ in parsed_shapes)])
  drafts = parse_drafts(drafts)
  score_fn = score_fn or _default_score_fn()
  if out_dir is not None:
    report.prepare_out_dir(out_dir)
  session = DecodeSession(target, drafts, dtype=dtype, mesh_shape=mesh_shape)
  check_draft_kinds(session)
  processor, target_config = session.processor, session.target_config
  draft_configs = session.draft_configs
  examples = {task: task_data.read_task(data_dir, task, processor, target_config,
                                        num_examples=num_examples, max_new_tokens=max_new_tokens,
                                        num_draft_tokens=depth if draft_configs else 0,
                                        drafts=tuple(draft_configs.values()))
              for task in tasks}
  # One prompt length and one image shape for the whole run: one compile per decoder.
  requests = [e.request for task in tasks for e in examples[task]]
  session.check_images(requests)
  length = inputs.bucket_length(max(len(r.token_ids) for r in requests), LENGTH_BUCKETS)
  capacity = max(len(r.token_ids) for r in requests) + max_new_tokens

  # --- load every model once ---------------------------------------------------------------------
  parameters = session.parameter_counts()
  settings = {
      'target': target, 'target_parameters': parameters[None], 'data_dir': data_dir,
      'drafts': {name: {'dir': drafts[name], 'kind': DRAFT_KINDS[type(config)],
                        'parameters': parameters[name]}
                 for name, config in draft_configs.items()},
      'tasks': tasks, 'gammas': sorted(gammas), 'shapes': [shape_label(*s) for s in parsed_shapes],
      'samplings': samplings,
      'max_new_tokens': max_new_tokens, 'batch_size': batch_size, 'num_examples': num_examples,
      'prompt_length': length, 'seed': seed, 'dtype': dtype}

  # --- decode: one compile per decoder, then every task ------------------------------------------
  specs = list(_decoder_specs(list(drafts), gammas, samplings, shapes))
  cells, baseline_speed = [], {}
  base_key = jax.random.key(seed)
  for name, gamma, sampling, tree, threshold in specs:
    decoder = session.decoder(name, num_draft_tokens=gamma, sampling=SAMPLINGS[sampling],
                              max_new_tokens=max_new_tokens, requests=requests, draft_tree=tree,
                              confidence_threshold=threshold)
    # Every prefill padded to `length`: one prefill program and one chunk program for every task.
    scheduler = session.scheduler(decoder, num_slots=batch_size, capacity=capacity,
                                  buckets=(length,))
    compile_seconds = scheduler.compile([length])
    # A compiled program's first run is several times slower (allocations, thread pools): one
    # warm-up batch, counted with the compile, keeps the first task's tokens/s comparable.
    warm_up = [e.request for e in examples[tasks[0]][:batch_size]]
    compile_seconds += _decode_task(scheduler, warm_up, max_new_tokens, base_key)[-1]
    for task_index, task in enumerate(tasks):
      tokens, counts, seconds = _decode_task(
          scheduler, [e.request for e in examples[task]], max_new_tokens,
          jax.random.fold_in(base_key, task_index))
      stats = statistics.summarize(
          *counts, num_draft_tokens=gamma, draft_tree=tree, confidence_threshold=threshold,
          draft_parameters=None if name is None else parameters[name],
          target_parameters=parameters[None], decode_seconds=seconds,
          compile_seconds=compile_seconds)
      cell = {'task': task, 'draft': name or TARGET_ONLY,
              'draft_kind': None if name is None else settings['drafts'][name]['kind'],
              'gamma': gamma, 'shape': None if tree is None else shape_label(tree, threshold),
              'sampling': sampling,
              'temperature': SAMPLINGS[sampling].temperature, **stats.as_dict()}
      if name is None:
        baseline_speed[task] = stats.tokens_per_second
        cell['quality'], cell['examples'] = _score(examples[task], tokens, processor, task,
                                                   score_fn)
      # Wall-clock, so only meaningful on an accelerator with realistic model sizes.
      cell['wallclock_speedup'] = (stats.tokens_per_second / baseline_speed[task]
                                   if stats.tokens_per_second and baseline_speed[task] else None)
      cells.append(cell)
      log(_progress_line(len(cells), len(specs) * len(tasks), cell))
      if out_dir is not None:
        report.write_json(out_dir, settings, cells, complete=False)
  if out_dir is not None:
    report.write_outputs(out_dir, settings, cells)
  return cells
