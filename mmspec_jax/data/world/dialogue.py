"""LLaVA-Instruct-like questions about a scene with longer descriptive answers.

Each question type is a function (scene, rng) -> (question, answer), or None when it does not
apply (e.g. asking where "the red circle" is needs exactly one red circle). Answers name every
shape they mention with its colour directly before its kind, and only shapes of the scene
(see phrases.py), which is what scoring relies on.
"""

from __future__ import annotations

import numpy as np

from mmspec_jax.data.world import phrases
from mmspec_jax.data.world.phrases import (capitalize, count_phrase, noun, noun_where, number,
                                           pick, plural, where)
from mmspec_jax.data.world.scenes import COLOURS, GRID, KINDS, ROW_NAMES, Scene

# Types that make a good opening question: they are about the whole image.
OPENING_TYPES = ('describe', 'count', 'colours', 'background')


def _listing(shapes, rng, sizes=None) -> str:
  return phrases.shape_list(phrases.ordered(shapes, rng), rng, positions=True, sizes=sizes)


def _size_summary(scene: Scene, rng) -> str:
  large = sum(s.size == 'large' for s in scene.shapes)
  small = len(scene.shapes) - large
  if len(scene.shapes) == 1:
    return f'It is {phrases.size_word(scene.shapes[0], rng)}.'
  if small == 0 or large == 0:
    return f'All of them are {"large" if small == 0 else "small"}.'
  return (f'{capitalize(number(large))} of them {"is" if large == 1 else "are"} large and '
          f'{number(small)} {"is" if small == 1 else "are"} small.')


def describe(scene: Scene, rng: np.random.Generator) -> str:
  """A paragraph: the count and background, one sentence per shape, maybe a relation and the
  sizes."""
  n, bg, image = len(scene.shapes), phrases.background(scene, rng), pick(rng,
                                                                         phrases.IMAGE_WORDS)
  opener = pick(rng, (
      f'The {image} shows {count_phrase(n)} on a {bg} background.',
      f'This is a {bg} {image} with {count_phrase(n)}.',
      f'In this {image} there {"is" if n == 1 else "are"} {count_phrase(n)} against a {bg} '
      'background.',
  ))
  sentences = [opener] + [phrases.shape_sentence(s, rng)
                          for s in phrases.ordered(scene.shapes, rng)]
  relations = phrases.true_relations(scene)
  if relations and rng.random() < 0.6:
    name, a, b = relations[int(rng.integers(len(relations)))]
    sentences.append(phrases.relation_sentence(name, a, b, scene))
  if rng.random() < 0.4:
    sentences.append(_size_summary(scene, rng))
  return ' '.join(sentences)


def _describe(scene, rng):
  question = pick(rng, ('What do you see in this image?', 'Can you describe the image in detail?',
                        'What is shown in the picture?', 'Describe the scene.',
                        'What is in this image?'))
  return question, describe(scene, rng)


def _count(scene, rng):
  question = pick(rng, ('How many shapes are there?', 'How many objects can you count in the '
                        'image?', 'How many shapes does the picture contain?'))
  n = len(scene.shapes)
  answer = (f'There {"is" if n == 1 else "are"} {count_phrase(n)} in the '
            f'{pick(rng, phrases.IMAGE_WORDS)}: {_listing(scene.shapes, rng)}.')
  if rng.random() < 0.5:
    answer += ' ' + _size_summary(scene, rng)
  return question, answer


def _colours(scene, rng):
  question = pick(rng, ('What colors are the shapes?', 'Which colors appear in the image?',
                        'What colors can you see?'))
  colours = list(dict.fromkeys(s.colour for s in scene.shapes))
  listing = _listing(scene.shapes, rng)
  if len(scene.shapes) == 1:
    answer = f'The only shape is {colours[0]}: it is {listing}.'
  elif len(colours) == 1:
    answer = f'All the shapes are {colours[0]}: {listing}.'
  else:
    answer = f'The image has {phrases.join(colours, rng)} shapes: {listing}.'
  return question, answer


def _unique_pair_shape(scene, rng):
  candidates = [s for s in scene.shapes if phrases.is_unique_pair(scene, s)]
  return candidates[int(rng.integers(len(candidates)))] if candidates else None


def _where(scene, rng):
  shape = _unique_pair_shape(scene, rng)
  if shape is None:
    return None
  name = f'{shape.colour} {shape.kind}'
  question = pick(rng, (f'Where is the {name}?', f'Where is the {name} located?',
                        f'In which part of the image is the {name}?'))
  sentences = [f'The {name} is {where(shape, rng)}.']
  related = [r for r in phrases.true_relations(scene) if r[1] == shape]
  for index in rng.permutation(len(related))[:2]:
    name_rel, a, b = related[int(index)]
    sentences.append(phrases.relation_sentence(name_rel, a, b, scene))
  sentences.append(f'It is a {phrases.size_word(shape, rng)} shape.')
  return question, ' '.join(sentences)


def _colour_of_kind(scene, rng):
  candidates = [s for s in scene.shapes if phrases.is_unique_kind(scene, s)]
  if not candidates:
    return None
  shape = candidates[int(rng.integers(len(candidates)))]
  question = pick(rng, (f'What color is the {shape.kind}?',
                        f'Which color does the {shape.kind} have?'))
  answer = (f'The {shape.kind} is {shape.colour}. It is {noun(shape, rng, size=True)} '
            f'{where(shape, rng)}.')
  return question, answer


def _has_kind(scene, rng):
  kind = pick(rng, KINDS)
  question = pick(rng, (f'Is there a {kind} in the image?', f'Can you see any {plural(kind)}?'))
  shapes = [s for s in scene.shapes if s.kind == kind]
  if not shapes:
    answer = (f'No, there is no {kind} in the {pick(rng, phrases.IMAGE_WORDS)}. It shows '
              f'{_listing(scene.shapes, rng)}.')
  elif len(shapes) == 1:
    answer = f'Yes, there is {noun_where(shapes[0], rng)}.'
  else:
    answer = f'Yes, there are {number(len(shapes))} {plural(kind)}: {_listing(shapes, rng)}.'
  return question, answer


def _has_colour(scene, rng):
  present = sorted({s.colour for s in scene.shapes})
  colour = pick(rng, present if rng.random() < 0.6 else tuple(COLOURS))
  question = pick(rng, (f'Are there any {colour} shapes?', f'Is anything {colour} in the '
                        'picture?'))
  shapes = [s for s in scene.shapes if s.colour == colour]
  if not shapes:
    answer = (f'No, none of the shapes is {colour}. The image contains '
              f'{_listing(scene.shapes, rng)}.')
  elif len(shapes) == 1:
    answer = f'Yes, there is one {colour} shape: {noun_where(shapes[0], rng)}.'
  else:
    answer = (f'Yes, there are {number(len(shapes))} {colour} shapes: '
              f'{_listing(shapes, rng)}.')
  return question, answer


def _relation(scene, rng):
  shape = _unique_pair_shape(scene, rng)
  if shape is None or len(scene.shapes) < 2:
    return None
  name = pick(rng, tuple(phrases.RELATIONS))
  phrase = phrases.RELATIONS[name][0]
  ref = phrases.reference(scene, shape)
  question = pick(rng, (f'What is {phrase} {ref}?', f'Which shapes are {phrase} {ref}?'))
  found = [s for s in scene.shapes if phrases.relation_holds(name, s, shape)]
  if not found:
    answer = f'There is nothing {phrase} {ref}. {capitalize(ref)} is {where(shape, rng)}.'
  else:
    verb = 'is' if len(found) == 1 else 'are'
    answer = f'{capitalize(phrase)} {ref} there {verb} {_listing(found, rng)}.'
  return question, answer


def _background(scene, rng):
  question = pick(rng, ('What does the background look like?', 'What color is the background?'))
  n = len(scene.shapes)
  answer = (f'The background is {phrases.background(scene, rng)}. {capitalize(count_phrase(n))} '
            f'{"is" if n == 1 else "are"} drawn on it: {_listing(scene.shapes, rng)}.')
  return question, answer


def _sizes(scene, rng):
  question = pick(rng, ('Which shapes are large?', 'Are the shapes big or small?',
                        'How big are the shapes?'))
  groups = {size: [s for s in scene.shapes if s.size == size] for size in ('large', 'small')}
  if not groups['small'] or not groups['large']:
    size = 'large' if groups['large'] else 'small'
    n = len(scene.shapes)
    what = {1: 'The only shape is', 2: 'Both shapes are'}.get(n, f'All {number(n)} shapes are')
    answer = f'{what} {size}: {_listing(scene.shapes, rng, sizes=False)}.'
  else:
    answer = ' '.join(
        f'The {size} {"one is" if len(shapes) == 1 else "ones are"} '
        f'{_listing(shapes, rng, sizes=False)}.' for size, shapes in groups.items())
  return question, answer


def _rows(scene, rng):
  if len(scene.shapes) < 2:
    return None
  question = pick(rng, ('How are the shapes arranged?', 'Can you describe the layout of the '
                        'shapes?'))
  sentences = []
  for row in range(GRID):
    shapes = [s for s in scene.shapes if s.row == row]
    if shapes:
      listing = phrases.join([noun_where(s, rng) for s in shapes], rng)
      sentences.append(f'The {ROW_NAMES[row]} row has {listing}.')
    else:
      sentences.append(f'The {ROW_NAMES[row]} row is empty.')
  return question, ' '.join(sentences)


QA_TYPES = {'describe': _describe, 'count': _count, 'colours': _colours, 'where': _where,
            'colour_of_kind': _colour_of_kind, 'has_kind': _has_kind, 'has_colour': _has_colour,
            'relation': _relation, 'background': _background, 'sizes': _sizes, 'rows': _rows}


def sample_dialogue(scene: Scene, rng: np.random.Generator, num_turns: int
                    ) -> tuple[list[tuple[str, str]], list[str]]:
  """num_turns (question, answer) pairs of distinct types, the first about the whole image.

  Returns:
    (pairs, question_types).
  """
  if not 1 <= num_turns <= len(QA_TYPES):
    raise ValueError(f'num_turns must be in [1, {len(QA_TYPES)}], got {num_turns}')
  first = pick(rng, OPENING_TYPES)
  pairs, types = [QA_TYPES[first](scene, rng)], [first]
  rest = [t for t in QA_TYPES if t != first]
  for index in rng.permutation(len(rest)):
    if len(pairs) == num_turns:
      break
    built = QA_TYPES[rest[int(index)]](scene, rng)
    if built is not None:
      pairs.append(built)
      types.append(rest[int(index)])
  return pairs, types
