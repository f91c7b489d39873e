r"""The data stage that asks the target: its own answers to a stage's training prompts, written in
the LLaVA JSON format the builders read, for distilling a draft toward what the target says.

  python -m mmspec_jax.target_answers --target=runs/target/export \
      --json_files=train_all.json --image_folder=images --out=answers/train_all.json \
      [--sampling=greedy|sample --seed=0 --max_new_tokens=128 --batch_size=16 --draft=DIR]

Every human turn of every record is answered by the target, turn after turn: the prompt of turn
t holds the record's image, its questions and the target's own answers to turns before t (the
conversation it would have had). The output keeps each record's id, image and questions and
replaces the assistant turns by the target's answers.

It runs on decode.py's engine through one DecodeSession: batched, sharded over the mesh (and over
several processes with --multihost, every process running the same command; process 0 writes). With --draft the
target's answers come from speculative decoding, which leaves them unchanged (greedy: the same
tokens; sampled: the same distribution) and faster. Greedy answers are the target's argmax;
sampled ones (temperature 1) use each turn's own key, fold_in(key(seed), hash(id, turn)).

Progress: each answered batch is appended to OUT.partial.jsonl at once, and a rerun skips every
(record, turn) already there, so an interrupted stage loses at most one batch. OUT appears (by an
atomic rename) only when every turn is answered; the partial file is then removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import tqdm

from mmspec_jax import distributed
from mmspec_jax.data.conversation import (ConversationEncoder, conversation_turns,
                                          question_answer_pairs)
from mmspec_jax.decoding import inputs
from mmspec_jax.decoding.runner import atomic_writer
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.models import LlavaConfig

SAMPLINGS = {'greedy': SamplingConfig(temperature=0.0), 'sample': SamplingConfig(temperature=1.0)}
LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048)


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
               batch_size: int = 16):
    if sampling not in SAMPLINGS:
      raise ValueError(f'sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}')
    self.session, self.draft, self.gamma = session, draft, gamma if draft else 0
    self.sampling, self.seed = sampling, seed
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
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
    where = f'record {record["id"]!r} turn {turn}'
    inputs.check_ids(ids.tolist(), where, image is not None, self.session.target_config,
                     self.max_new_tokens, self.gamma,
                     tuple(self.session.draft_configs.values()))
    return inputs.Request(_turn_id(record['id'], turn), turn + 1, tuple(ids.tolist()), image)

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
    key = jax.random.key(self.seed)
    with progress:
      for turn in range(max(len(r['questions']) for r in records)):
        pending = [r for r in records if len(r['questions']) > turn
                   and _turn_id(r['id'], turn) not in answers]
        if not pending:
          continue
        requests = [self._request(r, turn, answers, image_folder) for r in pending]
        self.session.check_images(requests)
        decoder = self.session.decoder(
            self.draft, num_draft_tokens=self.gamma, sampling=SAMPLINGS[self.sampling],
            max_new_tokens=self.max_new_tokens, requests=requests)
        batches = inputs.make_batches(requests, self.batch_size, LENGTH_BUCKETS)
        self.session.compile(decoder, batches)
        for batch in batches:
          result, _ = self.session.decode(decoder, batch, key)
          lines = []
          for request, row, count in zip(batch.requests[:batch.num_real], result.tokens,
                                         result.num_generated):
            record_id, _ = json.loads(request.id)
            answer = self.session.processor.decode(row[:count].tolist()).strip()
            answers[request.id] = answer
            lines.append(json.dumps({'id': record_id, 'turn': turn, 'answer': answer},
                                    ensure_ascii=False) + '\n')
          if primary:
            with open(partial_path, 'a', encoding='utf-8') as f:
              f.writelines(lines)
              f.flush()
              os.fsync(f.fileno())
          progress.update(batch.num_real)
    if primary:
      with atomic_writer(out) as f:
        json.dump([self._answered(r, answers) for r in records], f, ensure_ascii=False,
                  indent=1)
      os.unlink(partial_path)
    distributed.barrier('target answers written')
    return {'records': len(records), 'answers': total, 'resumed': resumed}

  @staticmethod
  def _answered(record: dict[str, Any], answers: dict[str, str]) -> dict[str, Any]:
    conversations = []
    for turn, question in enumerate(record['questions']):
      conversations += [{'from': 'human', 'value': question},
                        {'from': 'gpt', 'value': answers[_turn_id(record['id'], turn)]}]
    kept = {k: v for k, v in record.items() if k not in ('questions', 'conversations')}
    return {**kept, 'conversations': conversations}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', required=True)
  parser.add_argument('--json_files', required=True, help='comma-separated LLaVA JSON files')
  parser.add_argument('--image_folder', default='')
  parser.add_argument('--out', required=True, help='the LLaVA JSON file to write')
  parser.add_argument('--draft', default='', help='a draft to decode speculatively with')
  parser.add_argument('--gamma', type=int, default=5)
  parser.add_argument('--sampling', default='greedy', choices=sorted(SAMPLINGS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_new_tokens', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--dtype', default='float32')
  # Several processes, as train.py's and decode.py's --config.multihost / --config.distributed.*.
  parser.add_argument('--multihost', action='store_true')
  parser.add_argument('--coordinator_address', default='')
  parser.add_argument('--num_processes', type=int, default=-1)
  parser.add_argument('--process_id', type=int, default=-1)
  args = parser.parse_args(argv)
  settings = ml_collections.ConfigDict()
  distributed.add_config(settings)
  settings.multihost = args.multihost
  settings.distributed.update(coordinator_address=args.coordinator_address,
                              num_processes=args.num_processes, process_id=args.process_id)
  distributed.initialize(settings)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise SystemExit(f'the output directory {out_dir!r} does not exist')
  session = DecodeSession(args.target, {'draft': args.draft} if args.draft else {},
                          dtype=args.dtype)
  counts = TargetAnswers(
      session, draft='draft' if args.draft else None, gamma=args.gamma, sampling=args.sampling,
      seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
  ).run(args.json_files.split(','), args.image_folder, args.out)
  print(f'{args.out}: {counts["answers"]} answers to {counts["records"]} records '
        f'({counts["resumed"]} from a previous run)')


if __name__ == '__main__':
  main()
