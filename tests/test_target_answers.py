"""The data stage that asks the target (mmspec_jax/distillation/target_answers.py): LLaVA JSON the builders read,
every turn answered, a record's next turn decoded beside the others' as soon as its answer
arrives, speculative answers equal to the target's own, resumable, seeded sampling."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmspec_jax.data import builders
from mmspec_jax.data.pipeline import make_iterator
from mmspec_jax.decoding.scheduler import Scheduler
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.data.processing import MultimodalProcessor
from mmspec_jax.distillation.target_answers import TargetAnswers, read_records
from mmspec_jax.testing import tiny_hf

MAX_NEW_TOKENS = 6


def _records():
  return [
      {'id': 'a', 'image': 'a.png', 'conversations': [
          {'from': 'human', 'value': '<image>\nw10 w11 w12'}, {'from': 'gpt', 'value': 'w20'},
          {'from': 'human', 'value': 'w13 w14'}, {'from': 'gpt', 'value': 'w21'}]},
      {'id': 'b', 'conversations': [
          {'from': 'human', 'value': 'w30 w31'}, {'from': 'gpt', 'value': 'w32'}]},
      {'id': 'c', 'image': 'c.png', 'conversations': [
          {'from': 'human', 'value': 'w40\n<image>'}, {'from': 'gpt', 'value': 'w41 w42'},
          {'from': 'human', 'value': 'w43'}, {'from': 'gpt', 'value': 'w44'},
          {'from': 'human', 'value': 'w45 w46 w47'}, {'from': 'gpt', 'value': 'w48'}]},
      {'id': 'd', 'image': 'a.png', 'conversations': [
          {'from': 'human', 'value': '<image>\nw50'}, {'from': 'gpt', 'value': 'w51'}]},
      {'id': 'e', 'conversations': [
          {'from': 'human', 'value': 'w60 w61 w62 w63'}, {'from': 'gpt', 'value': 'w64'}]},
  ]


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('answers')
  target = str(root / 'target')
  tiny_hf.save_llava_processor(tiny_hf.word_tokenizer(), target)
  llava = tiny_hf.tiny_llava(seed=3)
  tiny_hf.save(llava, target)
  draft = tiny_hf.save_language_draft(llava, str(root / 'draft'))
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a.png', 'c.png'):
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(images / name)
  prompts = root / 'train.json'
  prompts.write_text(json.dumps(_records()))
  session = DecodeSession(target, {'draft': draft})
  return {'root': root, 'session': session, 'json': str(prompts), 'images': str(images)}


def _run(world, name, **kwargs):
  out = str(world['root'] / f'{name}.json')
  counts = TargetAnswers(world['session'], max_new_tokens=MAX_NEW_TOKENS, batch_size=2,
                         **kwargs).run([world['json']], world['images'], out)
  with open(out, encoding='utf-8') as f:
    return json.load(f), counts, out


@pytest.fixture(scope='module')
def recorded(world):
  """The greedy run, and what its scheduler was given and gave back, in order: ('submit', turn
  id, prompt ids), ('chunk',) as a chunk starts, ('finish', turn id) after it."""
  timeline = []
  submit, step = Scheduler.submit, Scheduler.step

  def recording_submit(self, request, max_new_tokens=None):
    timeline.append(('submit', request.id, request.token_ids))
    return submit(self, request, max_new_tokens)

  def recording_step(self):
    timeline.append(('chunk',))
    events = step(self)
    timeline.extend(('finish', e.finished.request.id) for e in events if e.finished)
    return events

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(Scheduler, 'submit', recording_submit)
    patch.setattr(Scheduler, 'step', recording_step)
    return _run(world, 'greedy'), timeline


@pytest.fixture(scope='module')
def greedy(recorded):
  return recorded[0]


def test_every_turn_is_answered_and_the_rest_kept(greedy):
  answered, counts, _ = greedy
  originals = _records()
  assert counts == {'records': 5, 'answers': 8, 'resumed': 0}
  assert [r['id'] for r in answered] == [r['id'] for r in originals]
  for record, original in zip(answered, originals):
    assert record.get('image') == original.get('image')
    turns = record['conversations']
    assert [t['from'] for t in turns] == [t['from'] for t in original['conversations']]
    assert [t['value'] for t in turns[::2]] == [t['value'] for t in original['conversations'][::2]]
    # The answers are the target's words, not the dataset's.
    assert all(isinstance(t['value'], str) for t in turns[1::2])
  assert any(t['value'] != o['value'] for r, o in zip(answered, originals)
             for t, o in zip(r['conversations'][1::2], o['conversations'][1::2]))


def test_a_later_turn_enters_with_its_answer_while_others_decode(world, recorded):
  (answered, _, _), timeline = recorded
  turn_of = lambda entry: tuple(json.loads(entry[1]))
  submitted = {turn_of(e): (i, e[2]) for i, e in enumerate(timeline) if e[0] == 'submit'}
  finished = {turn_of(e): i for i, e in enumerate(timeline) if e[0] == 'finish'}
  assert sorted(submitted) == sorted(finished) == sorted(
      (r['id'], t) for r in answered for t in range(len(r['conversations']) // 2))
  # Every record's turn 0 first, in record order.
  assert [turn_of(e) for e in timeline[:5]] == [(r['id'], 0) for r in _records()]
  encoder = TargetAnswers(world['session']).encoder
  for record in answered:
    turns = record['conversations']
    for turn in range(1, len(turns) // 2):
      index, prompt = submitted[record['id'], turn]
      # Submitted as soon as the answer before it arrived, before the next chunk.
      previous = finished[record['id'], turn - 1]
      assert previous < index and ('chunk',) not in timeline[previous:index]
      # Its prompt holds the conversation so far: the questions and the target's answers.
      assert prompt == tuple(encoder(turns[:2 * turn + 1])[0].tolist())
  # Record 'a' asks its second question while others' first ones are still decoding.
  assert any(finished[r['id'], 0] > submitted['a', 1][0] for r in answered)


def test_speculative_answers_equal_the_target_alone(world, greedy):
  speculative, _, _ = _run(world, 'speculative', draft='draft', gamma=3)
  assert speculative == greedy[0]


def test_the_builders_read_the_answers(world, greedy):
  _, _, out = greedy
  data_dir = world['root'] / 'tfds'
  builders.prepare('llava_conversations', data_dir, config_name='answers', json_files=out,
                   image_folder=world['images'])
  source = builders.load_source('llava_conversations/answers', data_dir)
  assert len(source) == 5
  processor = MultimodalProcessor.from_pretrained(world['session'].target_dir)
  batch = next(make_iterator('chat', source, processor.tokenizer, batch_size=5, seq_len=48,
                             seed=0, prefetch=0))
  assert batch['loss_mask'].sum() > 0


def test_an_interrupted_stage_resumes_where_it_stopped(world, greedy):
  answered, _, _ = greedy
  out = str(world['root'] / 'resumed.json')
  # What an interrupted run leaves: the first answers of turn 0 written, then a torn line.
  first = [{'id': r['id'], 'turn': 0, 'answer': r['conversations'][1]['value']}
           for r in answered[:2]]
  with open(out + '.partial.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row) + '\n' for row in first)
    f.write('{"id": "c", "tu')
  resumed, counts, _ = _run(world, 'resumed')
  assert counts['resumed'] == 2 and resumed == answered
  assert not os.path.exists(out + '.partial.jsonl')


def test_a_later_turn_the_slots_cannot_hold_is_refused_by_name(world, recorded):
  (answered, _, _), timeline = recorded
  out = str(world['root'] / 'small.json')
  # Slots that hold the longest first turn (record a's) but not a's turn 1, its answer added.
  capacity = MAX_NEW_TOKENS + max(len(e[2]) for e in timeline
                                  if e[0] == 'submit' and json.loads(e[1])[1] == 0)
  with pytest.raises(ValueError, match=rf"record 'a' turn 1: .* exceeds the slot capacity "
                                       rf'{capacity} \(pass a larger --slot_capacity'):
    TargetAnswers(world['session'], max_new_tokens=MAX_NEW_TOKENS, batch_size=2,
                  slot_capacity=capacity).run([world['json']], world['images'], out)
  # The answers that arrived before it are kept for a rerun.
  with open(out + '.partial.jsonl', encoding='utf-8') as f:
    kept = [json.loads(line) for line in f]
  assert kept and {(row['id'], row['turn']) for row in kept} >= {('a', 0)}
  by_id = {r['id']: r for r in answered}
  assert all(row['answer'] == by_id[row['id']]['conversations'][2 * row['turn'] + 1]['value']
             for row in kept)


def test_sampled_answers_follow_the_seed(world, greedy):
  first, _, _ = _run(world, 'sampled', sampling='sample', seed=1)
  again, _, _ = _run(world, 'sampled_again', sampling='sample', seed=1)
  other, _, _ = _run(world, 'sampled_other', sampling='sample', seed=2)
  assert first == again
  answers = lambda records: [t['value'] for r in records for t in r['conversations'][1::2]]
  assert answers(first) != answers(other) and answers(first) != answers(greedy[0])


def test_bad_records_are_named(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps([{'id': 'x', 'conversations': [{'from': 'gpt', 'value': 'w5'}]}]))
  with pytest.raises(ValueError, match="record 0: .*no human turn"):
    read_records([str(path)])
  path.write_text(json.dumps([{'id': 'x', 'conversations': [
      {'from': 'human', 'value': 'w5'}]}] * 2))
  with pytest.raises(ValueError, match='duplicate id'):
    read_records([str(path)])
