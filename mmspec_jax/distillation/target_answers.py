r"""The data stage that asks the target: its own answers to a stage's training prompts, written in
the LLaVA JSON format the builders read, for distilling a draft toward what the target says.

  mmspec-target-answers --config.target=runs/target/export \
      --config.json_files=train_all.json --config.image_folder=images \
      --config.out=answers/train_all.json [--config.sampling=greedy|sample --config.seed=0
      --config.max_new_tokens=128 --config.batch_size=16 --config.draft=DIR
      --config.slot_capacity=N]   (every setting: configs/target_answers.py)

Every human turn of every record is answered by the target, turn after turn: the prompt of turn
t holds the record's image, its questions and the target's own answers to turns before t (the
conversation it would have had). The output keeps each record's id, image and questions and
replaces the assistant turns by the target's answers.

It runs on decode.py's engine through one DecodeSession and one continuous-batching scheduler
(decoding/scheduler.py), sharded over the mesh (and over several processes with --config.multihost, every
process running the same command and so making the same submissions; process 0 writes). Every
record's first unanswered turn is submitted at the start; when a turn's answer arrives, the
record's next turn (whose prompt holds that answer) is submitted at once, so it decodes beside the
other records' turns instead of waiting for every record to finish the turn before. With config.draft
the target's answers come from speculative decoding, which leaves them unchanged (greedy: the same
tokens; sampled: the same distribution) and faster. Greedy answers are the target's argmax;
sampled ones (temperature 1) use each turn's own key, fold_in(key(seed), hash(id, turn)), so an
answer does not depend on which slot or chunk it was decoded in.

Slot capacity (prompt + new tokens a slot holds): a later turn's prompt holds answers not given
yet, and an answer's length in tokens is not bounded by max_new_tokens (it is decoded to text,
stripped and encoded again inside the conversation). So while any record has a turn after its
first unanswered one, the slots hold the target's max_position_embeddings, which no prompt that
inputs.check_ids accepts can exceed; otherwise every prompt is known, and they hold the longest
plus max_new_tokens. config.slot_capacity sets a smaller one (the caches hold batch_size x capacity
positions); a later turn it cannot hold is then refused by record and turn.

Progress: the answers that arrive in each chunk are appended to OUT.partial.jsonl at once, and a
rerun skips every (record, turn) already there, so an interrupted stage loses at most one chunk.
OUT appears (by an atomic rename) only when every turn is answered; the partial file is then
removed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import tqdm

from mmspec_jax import cli, distributed
from mmspec_jax.data.conversation import (ConversationEncoder, conversation_turns,
                                          question_answer_pairs)
from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.runner import atomic_writer
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.models import LlavaConfig, text_config

SAMPLINGS = {'greedy': SamplingConfig(temperature=0.0), 'sample': SamplingConfig(temperature=1.0)}


def read_records(json_files: Sequence[str]) -> list[dict[str, Any]]:
  """Every record of the LLaVA JSON files, in order, each with its human turns checked."""
  records, seen = [], {}
  for path in json_files:
    try:
      with open(path, encoding='utf-8') as f:
        rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: cannot read a LLaVA JSON list ({e})') from e
    if not isinstance(rows, list):
      raise ValueError(f'{path}: expected a JSON list of records')
    for index, record in enumerate(rows):
      where = f'{path} record {index}'
      if not isinstance(record, dict) or 'id' not in record or 'conversations' not in record:
        raise ValueError(f'{where}: expected an object with "id" and "conversations"')
      if record['id'] in seen:
        raise ValueError(f'{where}: duplicate id {record["id"]!r} (first in {seen[record["id"]]})')
      seen[record['id']] = where
      try:
        questions = [q for q, _ in question_answer_pairs(conversation_turns(
            record['conversations']))]
      except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: bad "conversations": {e}') from e
      if not questions:
        raise ValueError(f'{where}: "conversations" has no human turn')
      records.append({**record, 'questions': questions})
  if not records:
    raise ValueError(f'no records in {list(json_files)}')
  return records


def _turn_id(record_id: Any, turn: int) -> str:
  return json.dumps([record_id, turn])


def _where(record: dict[str, Any], turn: int) -> str:
  return f'record {record["id"]!r} turn {turn}'


def _next_turn(record: dict[str, Any], turn: int, answers: dict[str, str]) -> int | None:
  """The record's first turn from `turn` on that has no answer yet (None: none is left)."""
  return next((t for t in range(turn, len(record['questions']))
               if _turn_id(record['id'], t) not in answers), None)


def read_partial(path: str) -> dict[str, str]:
  """{turn id: answer} of a previous, interrupted run (empty if none); a torn last line (the
  run died while writing it) is dropped."""
  answers = {}
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        answers[_turn_id(row['id'], row['turn'])] = row['answer']
  return answers


class TargetAnswers:
  """Generates the answers; see the module docstring."""

  def __init__(self, session: DecodeSession, *, draft: str | None = None, gamma: int = 5,
               sampling: str = 'greedy', seed: int = 0, max_new_tokens: int = 128,
               batch_size: int = 16, slot_capacity: int = 0):
    """batch_size: the scheduler's slots; slot_capacity: 0 for the module docstring's rule."""
    if sampling not in SAMPLINGS:
      raise ValueError(f'sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}')
    if slot_capacity < 0:
      raise ValueError(f'slot_capacity must be >= 0 (0: what the prompts can need), got '
                       f'{slot_capacity}')
    self.session, self.draft, self.gamma = session, draft, gamma if draft else 0
    self.sampling, self.seed = sampling, seed
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    self.slot_capacity = slot_capacity
    target = session.target_config
    image_mode = 'expand' if isinstance(target, LlavaConfig) else 'drop'
    self.encoder = ConversationEncoder(
        session.processor.tokenizer, image_mode=image_mode,
        num_image_tokens=target.num_image_tokens if image_mode == 'expand' else None,
        image_token_id=target.image_token_index if image_mode == 'expand' else None)

  def _request(self, record: dict[str, Any], turn: int, answers: dict[str, str],
               image_folder: str) -> inputs.Request:
    turns = []
    for t, question in enumerate(record['questions'][:turn + 1]):
      turns += [{'from': 'human', 'value': question}]
      if t < turn:
        turns += [{'from': 'gpt', 'value': answers[_turn_id(record['id'], t)]}]
    ids, _ = self.encoder(turns)  # Ends with 'ASSISTANT:': the answer is the target's to give.
    image = None
    if record.get('image') and self.encoder.image_mode == 'expand':
      image = os.path.join(image_folder, record['image'])
      if not os.path.isfile(image):
        raise ValueError(f'record {record["id"]!r}: image not found: {image}')
    inputs.check_ids(ids.tolist(), _where(record, turn), image is not None,
                     self.session.target_config, self.max_new_tokens, self.gamma,
                     tuple(self.session.draft_configs.values()))
    return inputs.Request(_turn_id(record['id'], turn), turn + 1, tuple(ids.tolist()), image)

  def _capacity(self, first: Sequence[inputs.Request], later_turns: bool) -> int:
    """The slots' capacity (module docstring): `first` are the turns known now; `later_turns`
    whether any turn after them is still to be asked."""
    if self.slot_capacity:
      return self.slot_capacity
    if later_turns:
      return text_config(self.session.target_config).max_position_embeddings
    return max(len(r.token_ids) for r in first) + self.max_new_tokens

  def run(self, json_files: Sequence[str], image_folder: str, out: str) -> dict[str, Any]:
    """Answers every turn of every record of `json_files` into `out`; returns counts."""
    records = read_records(json_files)
    partial_path = out + '.partial.jsonl'
    answers = read_partial(partial_path)
    resumed = len(answers)
    primary = distributed.is_primary()
    total = sum(len(r['questions']) for r in records)
    progress = tqdm.tqdm(total=total, initial=resumed, unit='answer', file=sys.stderr,
                         desc='target answers', disable=not primary)
    # Each record's first unanswered turn: the turns whose prompts are known now (_answer checks
    # them all before anything is loaded or compiled).
    first = [(r, t) for r in records if (t := _next_turn(r, 0, answers)) is not None]
    with progress:
      if first:
        self._answer(first, answers, image_folder, partial_path if primary else None, progress)
    if primary:
      with atomic_writer(out) as f:
        json.dump([self._answered(r, answers) for r in records], f, ensure_ascii=False,
                  indent=1)
      os.unlink(partial_path)
    distributed.barrier('target answers written')
    return {'records': len(records), 'answers': total, 'resumed': resumed}

  def _answer(self, first: Sequence[tuple[dict[str, Any], int]], answers: dict[str, str],
              image_folder: str, partial_path: str | None, progress: tqdm.tqdm):
    """Answers the (record, turn)s of `first` and every turn after them through one scheduler,
    into `answers` and (on the primary process) `partial_path`."""
    requests = [self._request(record, turn, answers, image_folder) for record, turn in first]
    self.session.check_images(requests)
    # Later turns share their record's image: the first turns tell whether any request has one.
    decoder = self.session.decoder(
        self.draft, num_draft_tokens=self.gamma, sampling=SAMPLINGS[self.sampling],
        max_new_tokens=self.max_new_tokens, requests=requests)
    later_turns = any(_next_turn(record, turn + 1, answers) is not None
                      for record, turn in first)
    scheduler = self.session.scheduler(
        decoder, num_slots=self.batch_size, capacity=self._capacity(requests, later_turns),
        key=jax.random.key(self.seed))
    asked = {}  # handle -> (record, turn)

    def submit(record, turn, request):
      try:
        handle = scheduler.submit(request, self.max_new_tokens)
      except ValueError as e:
        raise ValueError(f'{_where(record, turn)}: {e} (pass a larger --slot_capacity, up to '
                         'the target\'s max_position_embeddings)') from e
      asked[handle] = record, turn

    for (record, turn), request in zip(first, requests):
      submit(record, turn, request)
    # The first turns' prefill lengths now; a later turn's compiles when first needed.
    scheduler.compile([scheduler.bucket(r) for r in requests])
    while not scheduler.idle:
      done = [asked.pop(e.handle) + (e.finished,) for e in scheduler.step() if e.finished]
      lines = []
      for record, turn, finished in done:
        answer = self.session.processor.decode(finished.token_ids).strip()
        answers[_turn_id(record['id'], turn)] = answer
        lines.append(json.dumps({'id': record['id'], 'turn': turn, 'answer': answer},
                                ensure_ascii=False) + '\n')
      if partial_path is not None and lines:
        with open(partial_path, 'a', encoding='utf-8') as f:
          f.writelines(lines)
          f.flush()
          os.fsync(f.fileno())
      progress.update(len(lines))
      # Written first: a later turn refused here leaves every answer that arrived on disk.
      for record, turn, _ in done:
        later = _next_turn(record, turn + 1, answers)
        if later is not None:
          submit(record, later, self._request(record, later, answers, image_folder))

  @staticmethod
  def _answered(record: dict[str, Any], answers: dict[str, str]) -> dict[str, Any]:
    conversations = []
    for turn, question in enumerate(record['questions']):
      conversations += [{'from': 'human', 'value': question},
                        {'from': 'gpt', 'value': answers[_turn_id(record['id'], turn)]}]
    kept = {k: v for k, v in record.items() if k not in ('questions', 'conversations')}
    return {**kept, 'conversations': conversations}


def run(config) -> dict[str, int]:
  """Answers config.json_files into config.out (configs/target_answers.py); returns the counts."""
  for name in ('target', 'json_files', 'out'):
    if not config[name]:
      raise ValueError(f'config.{name} is empty: pass --config.{name}=...')
  distributed.initialize(config)
  out_dir = os.path.dirname(os.path.abspath(config.out))
  if not os.path.isdir(out_dir):
    raise ValueError(f'the output directory {out_dir!r} does not exist')
  session = DecodeSession(config.target, {'draft': config.draft} if config.draft else {},
                          dtype=config.dtype)
  counts = TargetAnswers(
      session, draft='draft' if config.draft else None, gamma=config.gamma,
      sampling=config.sampling, seed=config.seed, max_new_tokens=config.max_new_tokens,
      batch_size=config.batch_size, slot_capacity=config.slot_capacity,
  ).run(config.json_files.split(','), config.image_folder, config.out)
  print(f'{config.out}: {counts["answers"]} answers to {counts["records"]} records '
        f'({counts["resumed"]} from a previous run)')
  return counts


def command():
  cli.run_command(cli.main_running(run), usage=__doc__, default_config='target_answers')


if __name__ == '__main__':
  command()
