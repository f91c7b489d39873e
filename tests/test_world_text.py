"""Tests for the world's scenes, pictures, task texts and scoring: every fact a text states is
recomputed from the Scene object it was generated from."""

import re

import numpy as np
import pytest

from mmspec_jax.data.world import corpus, dialogue, phrases, scoring
from mmspec_jax.data.world.multiple_choice import QUESTION_TYPES, sample_multiple_choice
from mmspec_jax.data.world.scenes import (BACKGROUNDS, COLOURS, KINDS, Scene, Shape, render,
                                          sample_scene, shape_center)
from mmspec_jax.data.world.tasks import TASKS, caption, make_record

NUM_SCENES = 150
SIZE_WORDS = {'small': 'small', 'little': 'small', 'large': 'large', 'big': 'large'}
NUMBERS = {'no': 0, 'one': 1, 'two': 2, 'three': 3, 'four': 4}
_C, _K = '|'.join(COLOURS), '|'.join(KINDS)
_PHRASE_CELL = {p: cell for cell, ps in phrases.CELL_PHRASES.items() for p in ps}
_P = '|'.join(sorted(map(re.escape, _PHRASE_CELL), key=len, reverse=True))  # Longest first.
_SIZED = re.compile(rf'\b({"|".join(SIZE_WORDS)}) ({_C}) ({_K})\b', re.I)
_PLACED_AFTER = re.compile(rf'\b(?:({"|".join(SIZE_WORDS)}) )?({_C}) ({_K})(?: is| sits)? ({_P})\b',
                           re.I)
_PLACED_BEFORE = re.compile(rf'\b({_P}) (?:there is|we can see|is) an? '
                            rf'(?:({"|".join(SIZE_WORDS)}) )?({_C}) ({_K})\b', re.I)
_REL = '|'.join(v[0] for v in phrases.RELATIONS.values())
_RELATION = re.compile(rf'\bthe ({_C}) ({_K}) is ({_REL}) the ({_C}) ({_K})\b', re.I)


def scenes(seed=0, count=NUM_SCENES):
  rng = np.random.default_rng(seed)
  return [sample_scene(rng) for _ in range(count)]


def relation_of(phrase):
  return next(name for name, (p, _) in phrases.RELATIONS.items() if p == phrase.lower())


def assert_true_of(scene: Scene, text: str):
  """Every colour/kind/size/position/relation/count statement in text holds in scene."""
  pairs = {s.pair for s in scene.shapes}
  assert scoring.mentions(text) <= pairs, text
  for size, colour, kind in _SIZED.findall(text):
    assert any(s.pair == (colour, kind) and s.size == SIZE_WORDS[size] for s in scene.shapes), \
        (size, colour, kind, text)
  placed = [(size, colour, kind, phrase) for size, colour, kind, phrase in
            _PLACED_AFTER.findall(text)]
  placed += [(size, colour, kind, phrase) for phrase, size, colour, kind in
             _PLACED_BEFORE.findall(text)]
  for size, colour, kind, phrase in placed:
    row, col = _PHRASE_CELL[phrase.lower()]
    shape = next((s for s in scene.shapes if (s.row, s.col) == (row, col)), None)
    assert shape is not None and shape.pair == (colour.lower(), kind), (phrase, text)
    assert not size or shape.size == SIZE_WORDS[size.lower()], text
  for colour_a, kind_a, relation, colour_b, kind_b in _RELATION.findall(text):
    a, b = (next(s for s in scene.shapes if s.pair == p)
            for p in ((colour_a.lower(), kind_a), (colour_b, kind_b)))
    assert phrases.relation_holds(relation_of(relation), a, b), text
  for word in re.findall(r'\b(one|two|three|four) shapes?\b', text, re.I):
    assert NUMBERS[word.lower()] == len(scene.shapes), text
  for kind in re.findall(rf'there is no ({_K})\b', text):
    assert kind not in {s.kind for s in scene.shapes}, text
  for colour in re.findall(rf'(?:none of the shapes is|there are no) ({_C})\b', text, re.I):
    assert colour.lower() not in {s.colour for s in scene.shapes}, text


def test_sample_scene_is_valid_and_deterministic():
  first, again = scenes(0), scenes(0)
  assert first == again and first != scenes(1)
  for scene in first:
    assert 1 <= len(scene.shapes) <= 4
    assert len({(s.row, s.col) for s in scene.shapes}) == len(scene.shapes)
    assert Scene.from_json(scene.to_json()) == scene
  counts = {len(s.shapes) for s in first}
  kinds = {x.kind for s in first for x in s.shapes}
  colours = {x.colour for s in first for x in s.shapes}
  assert counts == {1, 2, 3, 4} and kinds == set(KINDS) and colours == set(COLOURS)
  assert len(KINDS) >= 5 and {'red', 'green', 'blue', 'yellow', 'purple', 'orange',
                              'white'} <= set(COLOURS)


def test_scene_errors():
  red = Shape(0, 0, 'circle', 'red', 'small')
  with pytest.raises(ValueError, match='share a cell'):
    Scene.create('dark', [red, Shape(0, 0, 'star', 'blue', 'large')])
  with pytest.raises(ValueError, match="unknown colour 'pink'"):
    Shape(0, 0, 'circle', 'pink', 'small')
  with pytest.raises(ValueError, match='outside the 3x3 grid'):
    Shape(3, 0, 'circle', 'red', 'small')
  with pytest.raises(ValueError, match='1 to 4 shapes'):
    Scene.create('dark', [])
  with pytest.raises(ValueError, match='not a scene'):
    Scene.from_json({'shapes': [{'kind': 'circle'}]})


def test_render_puts_each_colour_in_its_cell():
  for scene in scenes(2, 60):
    image = render(scene)
    pixels = np.asarray(image)
    assert image.mode == 'RGB' and pixels.shape == (64, 64, 3)
    occupied = {(s.row, s.col) for s in scene.shapes}
    for shape in scene.shapes:
      x, y = shape_center(shape, 64)
      assert tuple(pixels[y, x]) == COLOURS[shape.colour], (shape, scene)
      # The shape's colour is confined to its cell, and big enough to see.
      cell = pixels[shape.row * 21:(shape.row + 1) * 21, shape.col * 21:(shape.col + 1) * 21]
      area = (cell == COLOURS[shape.colour]).all(-1).sum()
      assert area >= (50 if shape.size == 'small' else 120), (shape, area)
    for row in range(3):
      for col in range(3):
        if (row, col) not in occupied:
          x, y = shape_center(Shape(row, col, 'circle', 'red', 'small'), 64)
          assert tuple(pixels[y, x]) == BACKGROUNDS[scene.background]
  scene = scenes(2, 1)[0]
  assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
  assert render(scene, 96).size == (96, 96)


def test_kinds_differ_in_pixels():
  masks = {}
  for kind in KINDS:
    pixels = np.asarray(render(Scene.create('dark', [Shape(1, 1, kind, 'red', 'small')])))
    masks[kind] = (pixels == COLOURS['red']).all(-1)
  for a in KINDS:
    for b in KINDS:
      if a < b:
        assert (masks[a] != masks[b]).sum() >= 15, (a, b)


def test_captions_name_every_shape_correctly():
  rng = np.random.default_rng(3)
  for scene in scenes(3):
    text = caption(scene, rng)
    assert scoring.mentions(text) == {s.pair for s in scene.shapes}, text
    assert_true_of(scene, text)
  prompts = {make_record('captioning', s, rng, record_id='x', image='x.png')['conversations'][0][
      'value'] for s in scenes(3)}
  assert len(prompts) >= 8 and all(p.startswith('<image>\n') for p in prompts)


def _option_true(mc, option: str, scene: Scene) -> bool:
  """Recomputes from the scene whether option answers mc.question."""
  q, shapes = mc.question, scene.shapes
  if mc.question_type == 'count':
    return int(option) == len(shapes)
  if mc.question_type == 'count_colour':
    colour = re.match(r'How many (\w+) shapes', q).group(1)
    return int(option) == sum(s.colour == colour for s in shapes)
  if mc.question_type == 'count_kind':
    kind = re.match(r'How many (\w+)s are', q).group(1)
    return int(option) == sum(s.kind == kind for s in shapes)
  if mc.question_type == 'colour_of':
    kind = re.match(r'What color is the (\w+)\?', q).group(1)
    return [s.colour for s in shapes if s.kind == kind] == [option]
  if mc.question_type == 'kind_at':
    row, col = _PHRASE_CELL[re.match(r'(?:Which|What) shape is (.+)\?', q).group(1)]
    return any((s.row, s.col, s.kind) == (row, col, option) for s in shapes)
  if mc.question_type == 'position_of':
    colour, kind = re.match(r'Where is the (\w+) (\w+)', q).groups()
    return [s.cell for s in shapes if s.pair == (colour, kind)] == [option]
  if mc.question_type == 'relation':
    phrase, colour, kind = re.match(rf'Which shape is ({_REL}) the (\w+) (\w+)\?', q).groups()
    b = next(s for s in shapes if s.pair == (colour, kind))
    return any(s.pair == tuple(option.split()) and
               phrases.relation_holds(relation_of(phrase), s, b) for s in shapes)
  assert mc.question_type == 'present'
  return tuple(option.split()) in {s.pair for s in shapes}


def test_sqa_exactly_one_option_is_true():
  rng = np.random.default_rng(4)
  letters, types = [], set()
  for scene in scenes(4):
    for question_type in QUESTION_TYPES:
      try:
        mc = sample_multiple_choice(scene, rng, question_type)
      except ValueError:  # Does not apply to this scene (e.g. no unique kind).
        continue
      types.add(mc.question_type)
      truth = [_option_true(mc, o, scene) for o in mc.options]
      assert truth.count(True) == 1 and truth[mc.answer_index], (mc, scene)
      assert len(set(mc.options)) == 4
      assert mc.answer().startswith(f'The answer is {mc.letter}. ')
      assert_true_of(scene, mc.explanation)
      letters.append(mc.letter)
  assert types == set(QUESTION_TYPES)
  shares = [letters.count(l) / len(letters) for l in 'ABCD']
  assert min(shares) > 0.18, shares  # The correct letter is not predictable.
  record = make_record('sqa', scenes(4, 1)[0], rng, record_id='r', image='r.png')
  assert record['answer'] in 'ABCD' and len(record['options']) == 4
  assert record['conversations'][1]['value'].startswith(f'The answer is {record["answer"]}.')
  assert record['options']['ABCD'.index(record['answer'])] in record['conversations'][0]['value']


def test_conversations_are_true_and_well_formed():
  rng = np.random.default_rng(5)
  seen_types = set()
  for scene in scenes(5):
    record = make_record('conversation', scene, rng, record_id='c', image='c.png')
    turns = record['conversations']
    assert [t['from'] for t in turns] == ['human', 'gpt'] * (len(turns) // 2)
    assert 2 <= len(turns) // 2 <= 3 and len(record['question_types']) == len(turns) // 2
    assert turns[0]['value'].startswith('<image>\n')
    assert not any('<image>' in t['value'] for t in turns[1:])
    assert record['question_types'][0] in dialogue.OPENING_TYPES
    for question_type, (question, answer) in zip(record['question_types'],
                                                 zip(turns[::2], turns[1::2])):
      seen_types.add(question_type)
      assert_true_of(scene, answer['value'])
      if question_type == 'has_kind':
        kind = re.search(rf'({_K})', question['value']).group(1)
        assert answer['value'].startswith('Yes') == any(s.kind == kind for s in scene.shapes)
      if question_type == 'colour_of_kind':
        kind, colour = re.match(r'The (\w+) is (\w+)\.', answer['value']).groups()
        assert [s.colour for s in scene.shapes if s.kind == kind] == [colour]
  assert seen_types == set(dialogue.QA_TYPES)


def test_corpus_documents():
  rng = np.random.default_rng(6)
  docs = list(corpus.documents(rng, 30_000))
  assert sum(len(d) + 2 for d in docs) >= 30_000
  assert all(d.strip() and '\n\n' not in d and '<image>' not in d for d in docs)
  for kind in corpus.DOCUMENT_KINDS:  # Text-only, and true of the scene it describes.
    scene = scenes(6, 1)[0]
    assert_true_of(scene, corpus.document(scene, rng, kind))
  assert docs == list(corpus.documents(np.random.default_rng(6), 30_000))


def test_score():
  rng = np.random.default_rng(7)
  scene = Scene.create('dark', [Shape(0, 0, 'circle', 'red', 'large'),
                                Shape(1, 1, 'star', 'blue', 'small')])
  for task in TASKS:
    record = make_record(task, scene, rng, record_id='s', image='s.png')
    for turn in range(len(record['conversations']) // 2):
      assert scoring.score(task, scoring.reference_answer(record, turn), record, turn=turn) == 1.0
  caption_record = make_record('captioning', scene, rng, record_id='s', image='s.png')
  score = lambda text: scoring.score('captioning', text, caption_record)  # noqa: E731
  assert score('A red circle and a blue star.') == 1.0
  assert score('A red circle and a green star.') == pytest.approx(0.5)  # P 1/2, R 1/2.
  assert score('A red circle.') == pytest.approx(2 / 3)  # P 1, R 1/2.
  assert score('Some shapes.') == 0.0
  sqa = make_record('sqa', scene, rng, record_id='q', image='q.png')
  wrong = next(l for l in 'ABCD' if l != sqa['answer'])
  assert scoring.score('sqa', f'The answer is {sqa["answer"]}.', sqa) == 1.0
  assert scoring.score('sqa', f'The answer is {wrong}. The answer is {sqa["answer"]}', sqa) == 0
  assert scoring.predicted_letter('The answer is (C).') == 'C'
  assert scoring.predicted_letter('B. 3 shapes') == 'B'
  assert scoring.predicted_letter('no idea') is None
  assert scoring.mentions('Two Blue stars and a red circle') == {('blue', 'star'),
                                                                 ('red', 'circle')}
  with pytest.raises(ValueError, match="unknown task 'vqa'"):
    scoring.score('vqa', '', sqa)
  with pytest.raises(ValueError, match='turn=5 is out of range'):
    scoring.reference_answer(sqa, 5)
