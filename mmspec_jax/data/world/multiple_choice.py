"""ScienceQA-like multiple-choice questions about a scene: four options, exactly one correct.

Question types (each used only when it applies to the scene):
  count          How many shapes are there?            options: counts
  count_colour   How many red shapes are there?        options: counts (0 allowed)
  count_kind     How many stars are there?             options: counts (0 allowed)
  colour_of      What color is the star?               (a kind that occurs once) options: colours
  kind_at        Which shape is in the top left?       (an occupied cell) options: kinds
  position_of    Where is the red circle?              (a unique colour+kind) options: cells
  relation       Which shape is to the left of ...?    options: colour+kind pairs
  present        Which of these shapes is in the image? options: colour+kind pairs

Distractors are plausible: nearby counts, colours/kinds/cells that occur elsewhere in the scene,
shapes sharing a colour or kind with the scene. Options never include a second true answer.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from mmspec_jax.data.world import phrases
from mmspec_jax.data.world.phrases import capitalize, number, pick, plural, where
from mmspec_jax.data.world.scenes import COLOURS, GRID, KINDS, Scene, cell_name

LETTERS = 'ABCD'
QUESTION_TYPES = ('count', 'count_colour', 'count_kind', 'colour_of', 'kind_at', 'position_of',
                  'relation', 'present')
_INSTRUCTIONS = (
    "Answer with the option's letter from the given choices and explain.",
    'Answer with the letter of the correct option.',
    'Choose the correct option and explain your answer.',
    'Pick A, B, C or D.',
    'Select the right answer.',
)


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A question with four options; options[answer_index] is the only true one."""
  question_type: str
  question: str
  options: tuple[str, ...]
  answer_index: int
  explanation: str

  @property
  def letter(self) -> str:
    return LETTERS[self.answer_index]

  def answer(self) -> str:
    """'The answer is B. There are three shapes: ...'"""
    return f'The answer is {self.letter}. {self.explanation}'

  def prompt(self, rng: np.random.Generator) -> str:
    """The question, its lettered options and an instruction, in one of two layouts."""
    if rng.random() < 0.5:
      lines = [self.question] + [f'{l}. {o}' for l, o in zip(LETTERS, self.options)]
    else:
      lines = [f'Question: {self.question}',
               'Options: ' + ' '.join(f'({l}) {o}' for l, o in zip(LETTERS, self.options))]
    return '\n'.join(lines + [pick(rng, _INSTRUCTIONS)])


def _options(rng, correct: str, preferred, others) -> tuple[tuple[str, ...], int]:
  """Four shuffled options: correct, then distractors from preferred before others."""
  distractors: list[str] = []
  for pool in (preferred, others):
    pool = [p for p in dict.fromkeys(pool) if p != correct and p not in distractors]
    for i in rng.permutation(len(pool)):
      if len(distractors) < 3:
        distractors.append(pool[int(i)])
  if len(distractors) < 3:
    raise ValueError(f'not enough distractors for {correct!r}: {distractors}')
  options = [correct] + distractors
  order = rng.permutation(4)
  shuffled = tuple(options[int(i)] for i in order)
  return shuffled, int(np.flatnonzero(order == 0)[0])


def _count_options(rng, correct: int, lowest: int):
  # Counts within 2 of the truth are the plausible mistakes; the rest of 0/1..5 fill in.
  values = range(lowest, 6)
  near = [str(v) for v in values if 0 < abs(v - correct) <= 2]
  return _options(rng, str(correct), near, [str(v) for v in values])


def _listing(shapes, rng) -> str:
  return phrases.join([phrases.noun_where(s, rng) for s in shapes], rng)


def _count(scene, rng):
  n = len(scene.shapes)
  options = _count_options(rng, n, 1)
  explanation = (f'There is one shape: {_listing(scene.shapes, rng)}.' if n == 1 else
                 f'There are {number(n)} shapes: {_listing(scene.shapes, rng)}.')
  question = pick(rng, ('How many shapes are there in the image?',
                        'How many shapes are in the picture?',
                        'How many shapes can you count?'))
  return question, options, explanation


def _count_matching(scene, rng, shapes, what: str, none: str):
  n = len(shapes)
  if n == 0:
    explanation = none
  elif n == 1:
    explanation = f'There is one {what}: {_listing(shapes, rng)}.'
  else:
    explanation = f'There are {number(n)} {plural(what)}: {_listing(shapes, rng)}.'
  return _count_options(rng, n, 0), explanation


def _count_colour(scene, rng):
  present = sorted({s.colour for s in scene.shapes})
  colour = pick(rng, present if rng.random() < 0.75 else tuple(COLOURS))
  shapes = [s for s in scene.shapes if s.colour == colour]
  options, explanation = _count_matching(scene, rng, shapes, f'{colour} shape',
                                         f'There are no {colour} shapes in the image.')
  return f'How many {colour} shapes are there?', options, explanation


def _count_kind(scene, rng):
  present = sorted({s.kind for s in scene.shapes})
  kind = pick(rng, present if rng.random() < 0.75 else KINDS)
  shapes = [s for s in scene.shapes if s.kind == kind]
  options, explanation = _count_matching(scene, rng, shapes, kind,
                                         f'There is no {kind} in the image.')
  return f'How many {plural(kind)} are there in the image?', options, explanation


def _colour_of(scene, rng):
  candidates = [s for s in scene.shapes if phrases.is_unique_kind(scene, s)]
  if not candidates:
    return None
  shape = candidates[int(rng.integers(len(candidates)))]
  options = _options(rng, shape.colour, [s.colour for s in scene.shapes], list(COLOURS))
  explanation = f'The {shape.kind} {where(shape, rng)} is {shape.colour}.'
  return f'What color is the {shape.kind}?', options, explanation


def _kind_at(scene, rng):
  shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
  options = _options(rng, shape.kind, [s.kind for s in scene.shapes], KINDS)
  place = where(shape, rng)
  question = pick(rng, (f'Which shape is {place}?', f'What shape is {place}?'))
  explanation = f'The shape {place} is {phrases.noun(shape, rng)}.'
  return question, options, explanation


def _position_of(scene, rng):
  candidates = [s for s in scene.shapes if phrases.is_unique_pair(scene, s)]
  if not candidates:
    return None
  shape = candidates[int(rng.integers(len(candidates)))]
  all_cells = [cell_name(r, c) for r in range(GRID) for c in range(GRID)]
  options = _options(rng, shape.cell, [s.cell for s in scene.shapes], all_cells)
  name = f'{shape.colour} {shape.kind}'
  question = pick(rng, (f'Where is the {name}?', f'Where is the {name} located?'))
  return question, options, f'The {name} is {where(shape, rng)}.'


def _absent_pairs(scene: Scene) -> tuple[list[str], list[str]]:
  """Colour+kind pairs not in the scene: (those sharing a colour or kind with it, all)."""
  present = {s.pair for s in scene.shapes}
  colours, kinds = {s.colour for s in scene.shapes}, {s.kind for s in scene.shapes}
  absent = [p for p in itertools.product(COLOURS, KINDS) if p not in present]
  near = [f'{c} {k}' for c, k in absent if c in colours or k in kinds]
  return near, [f'{c} {k}' for c, k in absent]


def _relation(scene, rng):
  relations = phrases.true_relations(scene)
  if not relations:
    return None
  name, a, b = relations[int(rng.integers(len(relations)))]
  phrase = phrases.RELATIONS[name][0]
  # Other nameable scene shapes for which the relation is false, then shapes not in the scene.
  false_here = [f'{s.colour} {s.kind}' for s in scene.shapes
                if s not in (a, b) and phrases.is_unique_pair(scene, s)
                and not phrases.relation_holds(name, s, b)]
  near, absent = _absent_pairs(scene)
  options = _options(rng, f'{a.colour} {a.kind}', false_here, near + absent)
  ref_a, ref_b = phrases.reference(scene, a), phrases.reference(scene, b)
  explanation = (f'{capitalize(ref_a)} is {where(a, rng)} and {ref_b} is {where(b, rng)}, so '
                 f'{ref_a} is {phrase} {ref_b}.')
  return f'Which shape is {phrase} {ref_b}?', options, explanation


def _present(scene, rng):
  shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
  near, absent = _absent_pairs(scene)
  options = _options(rng, f'{shape.colour} {shape.kind}', near, absent)
  question = pick(rng, ('Which of these shapes is in the image?',
                        'Which of these shapes can you see in the picture?'))
  explanation = f'The image contains {_listing(scene.shapes, rng)}.'
  return question, options, explanation


_BUILDERS = {'count': _count, 'count_colour': _count_colour, 'count_kind': _count_kind,
             'colour_of': _colour_of, 'kind_at': _kind_at, 'position_of': _position_of,
             'relation': _relation, 'present': _present}


def sample_multiple_choice(scene: Scene, rng: np.random.Generator,
                           question_type: str | None = None) -> MultipleChoice:
  """A random question (of question_type, or of a random type that applies to the scene)."""
  if question_type is not None and question_type not in _BUILDERS:
    raise ValueError(f'unknown question type {question_type!r}; expected one of '
                     f'{QUESTION_TYPES}')
  types = [question_type] if question_type else list(QUESTION_TYPES)
  for index in rng.permutation(len(types)):
    built = _BUILDERS[types[int(index)]](scene, rng)
    if built is not None:
      question, (options, answer_index), explanation = built
      return MultipleChoice(types[int(index)], question, options, answer_index, explanation)
  raise ValueError(f'question type {question_type!r} does not apply to scene {scene}')
