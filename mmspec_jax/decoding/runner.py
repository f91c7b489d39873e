"""A decoding run over a JSONL file: validate, load, compile, decode, write (what decode.py runs).

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

import jax
import numpy as np
import tqdm

from mmspec_jax.convert.loading import read_config
from mmspec_jax import artifacts, distributed, sharding
from mmspec_jax.decoding import inputs, placement, statistics
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import (AdapterDraftConfig, LlamaConfig, LlavaConfig, build,
                               parameter_count, text_config)
from mmspec_jax.models.config import SUPPORTED_DTYPES, ModelConfig, with_dtype
from mmspec_jax.processing import TOKENIZER_FILES, MultimodalProcessor
from mmspec_jax.vocabulary import check_compatible_vocabularies


def summary_path(output: str) -> str:
  """OUT.jsonl -> OUT.summary.json."""
  return os.path.splitext(output)[0] + '.summary.json'


def sampling_config(config) -> SamplingConfig:
  """The validated sampling settings (SamplingConfig raises on out-of-range values)."""
  return SamplingConfig(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)


def use_demo_checkpoints(config):
  """No target given: decode with the checkpoints `make demo` trained, if there are any."""
  if config.target:
    return
  if not artifacts.is_trained(artifacts.DEMO_TARGET_STAGE):
    raise ValueError('config.target is empty and there are no demo checkpoints under '
                     f'{artifacts.ROOT!r}: pass --config.target=DIR, or run `make demo` first')
  config.target = artifacts.export_dir(artifacts.DEMO_TARGET_STAGE)
  if not config.draft and artifacts.is_trained(artifacts.DEMO_DRAFT_STAGE):
    config.draft = artifacts.export_dir(artifacts.DEMO_DRAFT_STAGE)
  logging.warning('no target given: using the demo checkpoints %s and %s', config.target,
                  config.draft or '(no draft)')


def check_settings(config):
  """Refuses settings that are wrong on their own, before any file is read."""
  for name in ('target', 'prompts', 'output'):
    if not config[name]:
      raise ValueError(f'config.{name} is empty: pass --config.{name}=PATH')
  sampling_config(config)
  if config.draft and config.num_draft_tokens < 1:
    raise ValueError(f'num_draft_tokens (gamma) must be >= 1 with a draft, got '
                     f'{config.num_draft_tokens}')
  for name in ('max_new_tokens', 'batch_size'):
    if config[name] < 1:
      raise ValueError(f'{name} must be >= 1, got {config[name]}')
  if config.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f'unsupported dtype {config.dtype!r}; expected one of {SUPPORTED_DTYPES}')
  inputs.check_buckets(config.length_buckets)
  output = os.path.abspath(config.output)
  if os.path.isdir(output):
    raise ValueError(f'output {config.output!r} is a directory; give a file path')
  if not os.path.isdir(os.path.dirname(output)):
    raise ValueError(f'the output directory {os.path.dirname(output)!r} does not exist')
  if os.path.abspath(config.prompts) in (output, os.path.abspath(summary_path(output))):
    raise ValueError(f'output {config.output!r} would overwrite the prompts file')


def model_configs(config) -> tuple[ModelConfig, ModelConfig | None]:
  """Target and draft configs (in the run's dtype), read without loading any weights."""
  target = with_dtype(read_config(config.target), config.dtype)
  if not isinstance(target, (LlavaConfig, LlamaConfig)):
    raise ValueError(f'target {config.target!r} must be a LLaVA or LLaMA model, not an adapter '
                     'draft')
  if not config.draft:
    return target, None
  draft = with_dtype(read_config(config.draft), config.dtype)
  if not isinstance(draft, (LlamaConfig, AdapterDraftConfig)):
    raise ValueError(f'draft {config.draft!r} must be a LLaMA or adapter draft model, not '
                     f'{type(draft).__name__}')
  if isinstance(draft, AdapterDraftConfig) and isinstance(target, LlavaConfig):
    # The adapter reads the target's vision features and fills the target's placeholders.
    if draft.vision_hidden_size != target.vision.hidden_size:
      raise ValueError(f'adapter draft {config.draft!r} expects vision features of width '
                       f'{draft.vision_hidden_size}, the target\'s vision tower gives '
                       f'{target.vision.hidden_size}')
    if draft.image_token_index != target.image_token_index:
      raise ValueError(f'adapter draft {config.draft!r} uses image token '
                       f'{draft.image_token_index}, the target {target.image_token_index}')
  return target, draft


def check_draft_vocabulary(config, processor: MultimodalProcessor, target: ModelConfig,
                            draft: ModelConfig):
  directory = config.draft
  has_tokenizer = any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)
  # A draft directory without tokenizer files is taken to share the target's tokenizer.
  draft_tokenizer = (MultimodalProcessor.from_pretrained(directory).tokenizer if has_tokenizer
                     else processor.tokenizer)
  try:
    check_compatible_vocabularies(processor.tokenizer, draft_tokenizer,
                                  text_config(draft).vocab_size, text_config(target).vocab_size)
  except ValueError as e:
    raise ValueError(f'draft {directory!r}: {e}') from e


def eos_token_ids(target: ModelConfig, processor: MultimodalProcessor) -> tuple[int, ...]:
  """The target's text EOS id(s) (several for LLaMA 3), else the tokenizer's, else none."""
  eos = text_config(target).eos_token_id
  if eos is None:
    eos = processor.eos_token_id
  if eos is None:
    return ()
  return tuple(int(i) for i in eos) if isinstance(eos, (tuple, list)) else (int(eos),)


def check_image_size(processor: MultimodalProcessor, target: LlavaConfig, image: str):
  """The processor must produce what the vision tower was built for; checked on one image."""
  pixels = processor.preprocess_images([image])
  vision = target.vision
  expected = (vision.image_size, vision.image_size, vision.num_channels)
  if pixels.shape[1:] != expected:
    raise ValueError(f'the image processor of {image!r} gives pixels of shape '
                     f'{pixels.shape[1:]}, the target\'s vision tower expects {expected}')


def batch_arrays(batch: inputs.Batch, processor: MultimodalProcessor,
                  image_shape: tuple[int, int, int] | None):
  """(tokens int32[B, T], lengths int32[B], images float32[B, H, W, 3] or None)."""
  tokens, lengths = processor.pad_batch([r.token_ids for r in batch.requests], pad_to=batch.length)
  if image_shape is None:
    return tokens, lengths, None
  # Rows without an image get zeros: they have no placeholders, so the zeros are never read.
  images = np.zeros((len(batch.requests),) + image_shape, np.float32)
  rows = [i for i, r in enumerate(batch.requests) if r.image is not None]
  if rows:
    images[rows] = processor.preprocess_images([batch.requests[i].image for i in rows])
  return tokens, lengths, images


def program_shape(decoder: SpeculativeDecoder, batch: inputs.Batch) -> tuple[int, int | None]:
  """What a batch's program is compiled for: (prompt length T, the draft's prompt width)."""
  return batch.length, decoder.draft_prompt_length([r.token_ids for r in batch.requests],
                                                   batch.length)


def compile_programs(decoder: SpeculativeDecoder, target_params, draft_params, batch_size: int,
                     shapes: list[tuple[int, int | None]], image_shape, mesh, rules):
  """{program_shape: compiled generate} for every shape, and the seconds it took."""
  start = time.perf_counter()
  compiled = {}
  with placement.mesh_context(mesh, rules):
    for length, draft_length in sorted(set(shapes), key=str):
      compiled[length, draft_length] = decoder.generate.lower(
          target_params, draft_params,
          *placement.input_structs(batch_size, length, image_shape, mesh, rules),
          placement.keys_struct(batch_size, mesh, rules),
          draft_prompt_length=draft_length).compile()
  return compiled, time.perf_counter() - start


def _write_batch(out, batch: inputs.Batch, result, processor: MultimodalProcessor):
  """Writes the real rows' output lines; returns their statistics.row_counts (padding rows are
  decoded but discarded)."""
  counts = statistics.row_counts(result, batch.num_real)
  generated, calls, accepted, _ = counts
  for request, row, count, num_calls, row_accepted in zip(
      batch.requests, np.asarray(result.tokens)[:batch.num_real], generated, calls, accepted):
    token_ids = row[:count].tolist()  # New tokens only; entries past num_generated are filler.
    out.write(json.dumps({
        'id': request.id, 'text': processor.decode(token_ids), 'token_ids': token_ids,
        'num_target_calls': int(num_calls), 'num_accepted': int(row_accepted.sum())},
        ensure_ascii=False) + '\n')
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


def run(config) -> statistics.RunStatistics:
  """Decodes config.prompts into config.output and config.output's summary; see module doc."""
  # --- validation: nothing loaded, compiled or written yet ------------------------------------
  distributed.initialize(config)
  use_demo_checkpoints(config)
  check_settings(config)
  sampling = sampling_config(config)
  target_config, draft_config = model_configs(config)
  processor = MultimodalProcessor.from_pretrained(config.target)
  if draft_config is not None:
    check_draft_vocabulary(config, processor, target_config, draft_config)
  gamma = config.num_draft_tokens if draft_config is not None else 0
  draft_rules = tuple(tuple(rule) for rule in config.draft_logical_axis_rules)
  target_layout = placement.decoding_layout(config.layout, verifies=draft_config is not None)
  draft_layout = placement.decoding_layout(config.layout)
  requests = inputs.read_requests(
      config.prompts, processor, target_config, raw_prompt=config.raw_prompt,
      max_new_tokens=config.max_new_tokens, num_draft_tokens=gamma,
      drafts=() if draft_config is None else (draft_config,))
  decoder = SpeculativeDecoder(
      target=build(target_config, target_layout),
      draft=None if draft_config is None else build(draft_config, draft_layout),
      num_draft_tokens=gamma, sampling=sampling, max_new_tokens=config.max_new_tokens,
      eos_token_ids=eos_token_ids(target_config, processor), draft_rules=draft_rules)
  # Images is None or an array for the whole run, so each length compiles once, not twice.
  image_rows = [r for r in requests if r.image is not None]
  image_shape = None
  if image_rows:
    check_image_size(processor, target_config, image_rows[0].image)
    vision = target_config.vision
    image_shape = (vision.image_size, vision.image_size, vision.num_channels)
  batches = inputs.make_batches(requests, config.batch_size, config.length_buckets)

  # --- load (straight onto the mesh) and compile ----------------------------------------------
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
  logging.info('loading target %s', config.target)
  target_params = placement.load_for_decoding(config.target, target_config, config.dtype, mesh,
                                              rules, layout=target_layout)
  draft_params = None
  if draft_config is not None:
    logging.info('loading draft %s', config.draft)
    draft_params = placement.load_for_decoding(config.draft, draft_config, config.dtype, mesh,
                                               draft_rules, layout=draft_layout)
  compiled, compile_seconds = compile_programs(
      decoder, target_params, draft_params, config.batch_size,
      [program_shape(decoder, b) for b in batches], image_shape, mesh, rules)

  # --- decode --------------------------------------------------------------------------------
  counts = []
  decode_seconds, new_tokens = 0.0, 0
  base_key = jax.random.key(config.seed)
  primary = distributed.is_primary()
  progress = tqdm.tqdm(total=len(requests), unit='row', file=sys.stderr, desc='decoding',
                       disable=not primary)
  writer = atomic_writer if primary else _discarding_writer
  with progress, writer(config.output) as out:
    for batch in batches:
      tokens, lengths, images = placement.place_inputs(
          *batch_arrays(batch, processor, image_shape), mesh, rules)
      rng = placement.place_keys(inputs.request_keys(batch.requests, base_key), mesh, rules)
      start = time.perf_counter()
      result = jax.block_until_ready(
          compiled[program_shape(decoder, batch)](target_params, draft_params, tokens, lengths,
                                                  images, rng))
      decode_seconds += time.perf_counter() - start
      result = distributed.fetch(result)  # Rows live on every host's devices.
      counts.append(_write_batch(out, batch, result, processor))
      new_tokens += int(counts[-1][0].sum())
      progress.update(batch.num_real)
      progress.set_postfix(tokens_per_s=f'{new_tokens / max(decode_seconds, 1e-9):.1f}')

    stats = statistics.summarize(
        *statistics.concatenate_counts(counts), num_draft_tokens=gamma,
        draft_parameters=None if draft_params is None else parameter_count(draft_params),
        target_parameters=parameter_count(target_params), decode_seconds=decode_seconds,
        compile_seconds=compile_seconds)
    # Inside the output's block: the summary and the output appear together or not at all.
    with writer(summary_path(config.output)) as f:
      json.dump(stats.as_dict(), f, indent=2)
  return stats

