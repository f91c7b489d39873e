"""The data stage that asks the target (mmspec_jax/target_answers.py): LLaVA JSON the builders read,
every turn answered, speculative answers equal to the target's own, resumable, seeded sampling."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmspec_jax.data import builders
from mmspec_jax.data.pipeline import make_iterator
from mmspec_jax.decoding.session import DecodeSession
from mmspec_jax.processing import MultimodalProcessor
from mmspec_jax.target_answers import TargetAnswers, read_records
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
def greedy(world):
  return _run(world, 'greedy')


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
  # What an interrupted run leaves: the first batch of turn 0 written, then a torn line.
  first = [{'id': r['id'], 'turn': 0, 'answer': r['conversations'][1]['value']}
           for r in answered[:2]]
  with open(out + '.partial.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row) + '\n' for row in first)
    f.write('{"id": "c", "tu')
  resumed, counts, _ = _run(world, 'resumed')
  assert counts['resumed'] == 2 and resumed == answered
  assert not os.path.exists(out + '.partial.jsonl')


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
