"""Evaluation tasks: LLaVA-format JSON files of a data directory, read into decoding requests.

`DATA_DIR/test_{task}.json` is a list of records
  {"id": ..., "image": "x.png" (relative to DATA_DIR/images/, optional),
   "conversations": [{"from": "human", "value": "<image>\\nQUESTION"},
                     {"from": "gpt", "value": "ANSWER"}, ...], "task": ...}
The first human turn, its `<image>` placeholder removed, goes through the target's chat template
(which puts the placeholder back when the record has an image); the first answer after it is the
reference. Later turns are ignored: the paper measures single-turn decoding.

Every record is validated as decode.py validates a JSONL line (same checks, same messages), before
a model is loaded or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from mmspec_jax.data.conversation import (IMAGE_PLACEHOLDER, conversation_turns,
                                          question_answer_pairs)
from mmspec_jax.decoding import inputs
from mmspec_jax.models import ModelConfig
from mmspec_jax.data.processing import MultimodalProcessor

IMAGES_SUBDIR = 'images'


@dataclasses.dataclass(frozen=True)
class Example:
  request: inputs.Request  # the prompt, as decode.py would have read it
  reference: str  # the first assistant answer
  record: dict[str, Any]  # the record as read, for the scorer


def task_path(data_dir: str, task: str) -> str:
  return os.path.join(data_dir, f'test_{task}.json')


def _first_exchange(record: dict[str, Any], where: str) -> tuple[str, str]:
  """(question without its image placeholder, reference answer) of the first exchange."""
  if 'conversations' not in record:
    raise ValueError(f'{where}: missing "conversations"')
  try:
    pairs = question_answer_pairs(conversation_turns(record['conversations']))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: bad "conversations": {e}') from e
  if not pairs:
    raise ValueError(f'{where}: "conversations" has no human turn')
  question, answer = pairs[0]
  if answer is None:
    raise ValueError(f'{where}: the first human turn has no answer to score against')
  # '<image>\n' leads the question (or '\n<image>' ends it): the template places the image.
  question = question.replace(IMAGE_PLACEHOLDER, '').strip()
  if not question:
    raise ValueError(f'{where}: the first human turn has no text besides {IMAGE_PLACEHOLDER}')
  return question, answer.strip()


def _request(row: dict[str, Any], where: str, json_path: str, index: int,
             processor: MultimodalProcessor, target: ModelConfig, max_new_tokens: int,
             num_draft_tokens: int, drafts: Sequence[ModelConfig]) -> inputs.Request:
  """What inputs.read_requests does for one JSONL line {"id", "prompt", "image"}.

  The three helpers are private to inputs.py; a public per-row function there would replace this.
  """
  # pylint: disable=protected-access
  image = row.get('image')
  if image is not None:
    image = inputs.check_image(image, where, json_path, target, processor)
  ids = inputs.prompt_ids(row, where, image is not None, False, processor)
  inputs.check_ids(ids, where, image is not None, target, max_new_tokens, num_draft_tokens,
                   drafts)
  return inputs.Request(row['id'], index + 1, tuple(ids), image)


def read_task(data_dir: str, task: str, processor: MultimodalProcessor, target: ModelConfig, *,
              num_examples: int, max_new_tokens: int, num_draft_tokens: int = 0,
              drafts: Sequence[ModelConfig] = ()) -> list[Example]:
  """The first `num_examples` records of `task` (all if fewer), validated and tokenized, in file
  order."""
  path = task_path(data_dir, task)
  if not os.path.isfile(path):
    raise ValueError(f'task {task!r}: data file not found: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      records = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(records, list) or not records:
    raise ValueError(f'{path}: expected a non-empty JSON list of records')
  examples = []
  for index, record in enumerate(records[:num_examples]):
    where = f'{path} record {index}'
    if not isinstance(record, dict):
      raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}')
    record_id = record.get('id', index)
    where += f' (id {record_id!r})'
    question, reference = _first_exchange(record, where)
    row = {'id': record_id, 'prompt': question}
    image = record.get('image')
    if image is not None:
      # Images live under DATA_DIR/images/; inputs resolves paths against the JSON's folder (and
      # reports an image that is not a non-empty string itself).
      valid = isinstance(image, str) and image
      row['image'] = os.path.join(IMAGES_SUBDIR, image) if valid else image
    request = _request(row, where, path, index, processor, target, max_new_tokens,
                       num_draft_tokens, drafts)
    examples.append(Example(request, reference, record))
  return examples
