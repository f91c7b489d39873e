"""Decoding requests from a JSONL file: parsing, validation and batching, all on the host.

Each non-blank line is one request:
  {"id": ..., "prompt": "...", "image": "path"}     text, wrapped in the chat template
  {"id": ..., "input_ids": [...], "image": "path"}  token ids, used as given
"image" is optional; relative image paths are resolved against the JSONL file's directory.
"max_new_tokens" (optional, at most the run's) is the request's own budget; "temperature",
"top_k" and "top_p" (optional; the run's settings fill in those not given) its own sampling, so
greedy and sampled requests share a batch; "stop" (optional: a string, or a list of strings and
token ids) ends its output at the first stop sequence.
"seed" (optional, an integer in [0, 2**32): a JAX key holds 32 bits of seed) fixes the
request's sampling stream; without it the stream is the run's seed folded with the request's id
(`request_keys`). Either way a request samples the same tokens whatever else is in its batch.
Other keys are ignored, so annotated benchmark files can be used as they are.

Everything that can be wrong with a request is found here, before a model is loaded or anything
is compiled, and reported as a ValueError naming the file, line and id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmspec_jax.decoding import engine
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import LlavaConfig, ModelConfig, text_config
from mmspec_jax.data.processing import MultimodalProcessor

# Prompts longer than every bucket are padded to a multiple of this, so they too share shapes.
LONG_PROMPT_MULTIPLE = 64
# Prompt-length buckets: prompts are right-padded to the smallest that fits (decode.py's default).
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Request:
  id: str | int
  line: int  # 1-based line number in the input file
  token_ids: tuple[int, ...]  # the full prompt, image placeholders expanded
  image: Any  # a resolved image path (or, from the server, a PIL image); None: text only
  seed: int | None = None  # the request's own sampling seed, if it gives one
  max_new_tokens: int | None = None  # the request's own budget (None: the run's)
  sampling: SamplingConfig | None = None  # the request's own settings (None: the run's)
  # Stop sequences: token ids (the output ends after the id) or strings (the output's text ends
  # before the string); checked on the host between chunks (decoding/scheduler.py).
  stop: tuple[int | str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Batch:
  index: int  # position in the run; seeds the batch's PRNG key
  requests: tuple[Request, ...]  # batch_size rows; rows past num_real repeat the first one
  num_real: int
  length: int  # T: the padded prompt length (a bucket)


def _where(path: str, line: int, request_id: Any = None) -> str:
  return f'{path} line {line}' + ('' if request_id is None else f' (id {request_id!r})')


def check_image(image: Any, where: str, prompts_path: str, target: ModelConfig,
                 processor: MultimodalProcessor) -> str:
  """The resolved path of a request's image, refusing what cannot be decoded."""
  if not isinstance(image, str) or not image:
    raise ValueError(f'{where}: "image" must be a non-empty path string, got {image!r}')
  if not isinstance(target, LlavaConfig):
    raise ValueError(f'{where}: has an image but the target is a text-only LLaMA model (no '
                     'vision tower); remove "image" or use a LLaVA target')
  if processor.image_processor is None:
    raise ValueError(f'{where}: has an image but the target directory has no image processor '
                     '(preprocessor_config.json or processor_config.json)')
  path = os.path.join(os.path.dirname(os.path.abspath(prompts_path)), image)
  if not os.path.isfile(path):
    raise ValueError(f'{where}: image file not found: {path}')
  try:  # Reads the header only: a file that is not an image fails now, not mid-run.
    with Image.open(path):
      pass
  except (OSError, Image.UnidentifiedImageError) as e:
    raise ValueError(f'{where}: cannot read image {path}: {e}') from e
  return path


def prompt_ids(row: dict[str, Any], where: str, has_image: bool, raw_prompt: bool,
                processor: MultimodalProcessor) -> list[int]:
  if 'prompt' in row:
    prompt = row['prompt']
    if not isinstance(prompt, str):
      raise ValueError(f'{where}: "prompt" must be a string, got {type(prompt).__name__}')
    text = prompt if raw_prompt else processor.format_prompt(prompt, has_image=has_image)
    try:
      return processor.encode(text, num_images=int(has_image))
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e
  ids = row['input_ids']
  if (not isinstance(ids, list) or not ids
      or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
    raise ValueError(f'{where}: "input_ids" must be a non-empty list of integers')
  return ids


def check_ids(ids: Sequence[int], where: str, has_image: bool, target: ModelConfig,
              max_new_tokens: int, num_draft_tokens: int = 0, drafts: Sequence[ModelConfig] = ()):
  text_ids = ids
  if isinstance(target, LlavaConfig):
    placeholders = sum(1 for i in ids if i == target.image_token_index)
    expected = target.num_image_tokens if has_image else 0
    if placeholders != expected:
      needs = 'its image needs' if has_image else 'without an image it needs'
      raise ValueError(f'{where}: the prompt has {placeholders} image placeholder token(s) (id '
                       f'{target.image_token_index}) but {needs} {expected}')
    # Placeholders are never looked up in the vocabulary, so the image id may lie outside it.
    text_ids = [i for i in ids if i != target.image_token_index]
  vocab_size = text_config(target).vocab_size
  bad = [i for i in text_ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f'{where}: token id {bad[0]} is outside the target vocabulary '
                     f'[0, {vocab_size})')
  try:
    engine.check_request(target, [ids], max_new_tokens, num_draft_tokens, drafts)
  except ValueError as e:
    # check_request numbers rows within the array it was given (here one row): name the line.
    raise ValueError(f'{where}: {str(e).removeprefix("row 0: ")}') from e


def check_seed(row: dict[str, Any], where: str) -> int | None:
  seed = row.get('seed')
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                           or not 0 <= seed < 2 ** 32):
    raise ValueError(f'{where}: "seed" must be an integer in [0, 2**32), got {seed!r}')
  return seed


def check_max_new_tokens(row: dict[str, Any], where: str, limit: int) -> int | None:
  """A request's own "max_new_tokens": an integer in [1, the run's max_new_tokens]."""
  budget = row.get('max_new_tokens')
  if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                             or not 1 <= budget <= limit):
    raise ValueError(f'{where}: "max_new_tokens" must be an integer in [1, {limit}] (the run\'s '
                     f'max_new_tokens), got {budget!r}')
  return budget


SAMPLING_FIELDS = ('temperature', 'top_k', 'top_p')
MAX_STOP_SEQUENCES = 16


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(row: dict[str, Any], where: str,
                   default: SamplingConfig | None) -> SamplingConfig | None:
  """A request's own sampling settings (the run's filling in those it omits), or None when it
  gives none."""
  given = {name: row[name] for name in SAMPLING_FIELDS if name in row}
  if not given:
    return None
  for name, value in given.items():
    integral = name == 'top_k'
    if not (isinstance(value, int) and not isinstance(value, bool) if integral
            else _is_number(value)):
      raise ValueError(f'{where}: "{name}" must be {"an integer" if integral else "a number"}, '
                       f'got {value!r}')
  try:
    return dataclasses.replace(default or SamplingConfig(), **given)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from e


def check_stop(row: dict[str, Any], where: str, vocab_size: int) -> tuple[int | str, ...]:
  """A request's "stop": a string, or a list of non-empty strings and token ids."""
  stop = row.get('stop')
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES:
    raise ValueError(f'{where}: "stop" must be a string or a list of at most '
                     f'{MAX_STOP_SEQUENCES} strings and token ids, got {row["stop"]!r}')
  for item in stop:
    if isinstance(item, str) and item:
      continue
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < vocab_size:
      continue
    raise ValueError(f'{where}: each "stop" entry must be a non-empty string or a token id in '
                     f'[0, {vocab_size}), got {item!r}')
  return tuple(stop)


def request_keys(requests: Sequence[Request], run_key: jax.Array) -> jax.Array:
  """key[B]: each request's own PRNG key, for `SpeculativeDecoder.generate`.

  key(seed) for a request that gives a "seed", else run_key folded with a hash of its id (not
  its position: the same request in another file, batch or bucket samples the same tokens).
  """
  seeds = np.array([r.seed or 0 for r in requests], np.uint32)
  id_hashes = np.array([zlib.crc32(json.dumps(r.id).encode('utf-8')) for r in requests],
                       np.uint32)
  given = np.array([r.seed is not None for r in requests])
  return _request_keys(run_key, seeds, id_hashes, given)  # One dispatch for the whole batch.


@jax.jit
def _request_keys(run_key, seeds, id_hashes, given):
  def key(seed, id_hash, own):
    return jnp.where(own, jax.random.key_data(jax.random.key(seed)),
                     jax.random.key_data(jax.random.fold_in(run_key, id_hash)))
  return jax.random.wrap_key_data(jax.vmap(key)(seeds, id_hashes, given),
                                  impl=jax.random.key_impl(run_key))


def read_requests(path: str, processor: MultimodalProcessor, target: ModelConfig, *,
                  raw_prompt: bool, max_new_tokens: int, num_draft_tokens: int = 0,
                  drafts: Sequence[ModelConfig] = (),
                  sampling: SamplingConfig | None = None) -> list[Request]:
  """Parses and validates every line of the JSONL file `path`, in order, for a target decoding
  `max_new_tokens` with `drafts` (configs) proposing `num_draft_tokens` a step; `sampling`: the
  run's settings, which fill in those a request omits."""
  if not os.path.isfile(path):
    raise ValueError(f'prompts file not found: {path!r}')
  requests: list[Request] = []
  first_line_of: dict[Any, int] = {}
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = _where(path, line_number)
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e})') from e
      if not isinstance(row, dict):
        raise ValueError(f'{where}: expected a JSON object, got {type(row).__name__}')
      if 'id' not in row:
        raise ValueError(f'{where}: missing "id"')
      request_id = row['id']
      if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ValueError(f'{where}: "id" must be a string or an integer, got {request_id!r}')
      where = _where(path, line_number, request_id)
      if request_id in first_line_of:
        raise ValueError(f'{where}: duplicate id (first on line {first_line_of[request_id]})')
      first_line_of[request_id] = line_number
      requests.append(parse_request(
          row, where, path, line_number, processor, target, raw_prompt=raw_prompt,
          max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, drafts=drafts,
          sampling=sampling))
  if not requests:
    raise ValueError(f'{path}: no requests (the file is empty)')
  return requests


def parse_request(row: dict[str, Any], where: str, path: str, line_number: int,
                  processor: MultimodalProcessor, target: ModelConfig, *, raw_prompt: bool,
                  max_new_tokens: int, num_draft_tokens: int = 0,
                  drafts: Sequence[ModelConfig] = (),
                  sampling: SamplingConfig | None = None) -> Request:
  """One request from its fields (a JSONL line's object, `where` naming it in errors; a relative
  "image" is resolved against `path`'s directory), checked as read_requests checks every line."""
  if ('prompt' in row) == ('input_ids' in row):
    raise ValueError(f'{where}: needs exactly one of "prompt" and "input_ids"')
  image = row.get('image')
  if image is not None:
    image = check_image(image, where, path, target, processor)
  ids = prompt_ids(row, where, image is not None, raw_prompt, processor)
  check_ids(ids, where, image is not None, target, max_new_tokens, num_draft_tokens, drafts)
  return Request(
      row['id'], line_number, tuple(ids), image, check_seed(row, where),
      check_max_new_tokens(row, where, max_new_tokens), check_sampling(row, where, sampling),
      check_stop(row, where, text_config(target).vocab_size))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length, else length rounded up to LONG_PROMPT_MULTIPLE."""
  fitting = [b for b in buckets if b >= length]
  if fitting:
    return min(fitting)
  return -(-length // LONG_PROMPT_MULTIPLE) * LONG_PROMPT_MULTIPLE


def check_buckets(buckets: Sequence[int]):
  if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets):
    raise ValueError(f'length_buckets must be positive integers, got {tuple(buckets)!r}')


def make_batches(requests: Sequence[Request], batch_size: int,
                 buckets: Sequence[int]) -> list[Batch]:
  """Consecutive batches in input order; the last is padded with copies of its first row."""
  batches = []
  for index, start in enumerate(range(0, len(requests), batch_size)):
    rows = list(requests[start:start + batch_size])
    num_real = len(rows)
    rows += [rows[0]] * (batch_size - num_real)
    length = bucket_length(max(len(r.token_ids) for r in rows), buckets)
    batches.append(Batch(index, tuple(rows), num_real, length))
  return batches
