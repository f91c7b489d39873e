"""English for scenes: noun phrases, positions, lists and sentences, with random variation.

Every function takes the facts it states from Shape/Scene objects, never from other text, and the
random choices only pick between equally true wordings. Two conventions keep the text parseable
by scoring.py:
  - a size always comes before the colour ("a small red circle"), so a colour word is directly
    followed by its shape word;
  - a colour is put right before a shape word only for shapes that are in the scene (negative
    statements say "no red shapes" or "no star", never "no red star").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmspec_jax.data.world.scenes import Scene, Shape

NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SIZE_WORDS = {'small': ('small', 'small', 'little'), 'large': ('large', 'large', 'big')}
BACKGROUND_WORDS = {'dark': ('dark', 'black', 'dark gray'), 'light': ('light', 'light gray',
                                                                      'pale gray')}
IMAGE_WORDS = ('image', 'picture', 'scene')
# Prepositional phrases per cell; the first one is the plainest.
CELL_PHRASES = {
    (0, 0): ('in the top left', 'in the top left corner', 'at the top left'),
    (0, 1): ('at the top', 'in the top center', 'at the top center'),
    (0, 2): ('in the top right', 'in the top right corner', 'at the top right'),
    (1, 0): ('on the left', 'in the middle left', 'on the left side'),
    (1, 1): ('in the center', 'in the middle', 'right in the center'),
    (1, 2): ('on the right', 'in the middle right', 'on the right side'),
    (2, 0): ('in the bottom left', 'in the bottom left corner', 'at the bottom left'),
    (2, 1): ('at the bottom', 'in the bottom center', 'at the bottom center'),
    (2, 2): ('in the bottom right', 'in the bottom right corner', 'at the bottom right'),
}
# Relation name -> (phrase, test on (a, b) shapes: "a is <phrase> b").
RELATIONS = {
    'left': ('to the left of', lambda a, b: a.col < b.col),
    'right': ('to the right of', lambda a, b: a.col > b.col),
    'above': ('above', lambda a, b: a.row < b.row),
    'below': ('below', lambda a, b: a.row > b.row),
}


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  """One of options, uniformly."""
  return options[int(rng.integers(len(options)))]


def number(count: int) -> str:
  """'no', 'one', ..., 'nine'."""
  return NUMBER_WORDS[count]


def plural(kind: str, count: int = 2) -> str:
  """'circle' -> 'circles' for counts other than one."""
  return kind if count == 1 else kind + 's'


def capitalize(text: str) -> str:
  return text[:1].upper() + text[1:]


def join(items: Sequence[str], rng: np.random.Generator | None = None) -> str:
  """'a', 'a and b', 'a, b and c' (with an Oxford comma half of the time when rng is given)."""
  items = list(items)
  if len(items) <= 1:
    return ''.join(items)
  oxford = ',' if rng is not None and len(items) > 2 and rng.random() < 0.5 else ''
  return ', '.join(items[:-1]) + f'{oxford} and ' + items[-1]


def where(shape: Shape, rng: np.random.Generator | None = None) -> str:
  """Where a shape is: 'in the top left' (plain without rng, else a random variant)."""
  options = CELL_PHRASES[(shape.row, shape.col)]
  return options[0] if rng is None else pick(rng, options)


def size_word(shape: Shape, rng: np.random.Generator) -> str:
  return pick(rng, SIZE_WORDS[shape.size])


def noun(shape: Shape, rng: np.random.Generator | None = None, *, size: bool | None = None,
         article: str = 'a') -> str:
  """'a red circle' / 'a small red circle' / 'the red circle'.

  Args:
    shape: the shape named.
    rng: picks whether to name the size (when size is None) and the size word; without it the
      size is left out unless size=True, and named with the plain word.
    size: force naming (True) or leaving out (False) the size.
    article: 'a' (becomes 'an' before a vowel), 'the' or '' (none).
  """
  if size is None:
    size = rng is not None and rng.random() < 0.5
  words = []
  if size:
    words.append(size_word(shape, rng) if rng is not None else shape.size)
  words += [shape.colour, shape.kind]
  if article == 'a' and words[0][0] in 'aeiou':
    article = 'an'  # 'an orange circle'.
  return ' '.join(([article] if article else []) + words)


def noun_where(shape: Shape, rng: np.random.Generator, *, size: bool | None = None,
               article: str = 'a') -> str:
  """'a red circle in the top left'."""
  return f'{noun(shape, rng, size=size, article=article)} {where(shape, rng)}'


def background(scene: Scene, rng: np.random.Generator) -> str:
  """'dark' / 'black' / 'light gray' ..."""
  return pick(rng, BACKGROUND_WORDS[scene.background])


def ordered(shapes: Sequence[Shape], rng: np.random.Generator, p_shuffle: float = 0.3
            ) -> list[Shape]:
  """Reading order most of the time (predictable text), shuffled with probability p_shuffle."""
  shapes = list(shapes)
  if rng.random() < p_shuffle:
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
  return shapes


def shape_list(shapes: Sequence[Shape], rng: np.random.Generator, *, positions: bool,
               sizes: bool | None = None) -> str:
  """'a red circle in the top left and a small blue star in the center'."""
  parts = [noun_where(s, rng, size=sizes) if positions else noun(s, rng, size=sizes)
           for s in shapes]
  return join(parts, rng)


def count_phrase(count: int, what: str = 'shape') -> str:
  """'one shape', 'three shapes', 'no shapes'."""
  return f'{number(count)} {plural(what, count if count else 2)}'


def is_unique_pair(scene: Scene, shape: Shape) -> bool:
  """Whether no other shape in the scene has the same colour and kind."""
  return sum(s.pair == shape.pair for s in scene.shapes) == 1


def is_unique_kind(scene: Scene, shape: Shape) -> bool:
  return sum(s.kind == shape.kind for s in scene.shapes) == 1


def reference(scene: Scene, shape: Shape) -> str:
  """A definite description that picks out exactly this shape: 'the red circle', or with its
  size or position when another shape has the same colour and kind."""
  if is_unique_pair(scene, shape):
    return noun(shape, article='the')
  same = [s for s in scene.shapes if s.pair == shape.pair]
  if sum(s.size == shape.size for s in same) == 1:
    return noun(shape, size=True, article='the')
  return f'{noun(shape, article="the")} {where(shape)}'


def relation_holds(name: str, a: Shape, b: Shape) -> bool:
  """Whether "a is <relation> b" is true ('left', 'right', 'above', 'below')."""
  return RELATIONS[name][1](a, b)


def relation_sentence(name: str, a: Shape, b: Shape, scene: Scene) -> str:
  """'The red circle is to the left of the blue star.' (true by the caller's choice of a, b)."""
  if not relation_holds(name, a, b):
    raise ValueError(f'{a} is not {RELATIONS[name][0]} {b}')
  return f'{capitalize(reference(scene, a))} is {RELATIONS[name][0]} {reference(scene, b)}.'


def true_relations(scene: Scene) -> list[tuple[str, Shape, Shape]]:
  """Every (relation, a, b) that holds between two distinct shapes, both uniquely nameable by
  colour and kind (so that sentences about them are unambiguous)."""
  named = [s for s in scene.shapes if is_unique_pair(scene, s)]
  return [(name, a, b) for name in RELATIONS for a in named for b in named
          if a != b and relation_holds(name, a, b)]


def shape_sentence(shape: Shape, rng: np.random.Generator) -> str:
  """One sentence placing one shape, from several templates."""
  template = int(rng.integers(5))
  if template == 0:
    return f'{capitalize(where(shape, rng))} there is {noun(shape, rng)}.'
  if template == 1:
    return f'{capitalize(noun(shape, rng))} sits {where(shape, rng)}.'
  if template == 2:
    return f'There is {noun(shape, rng)} {where(shape, rng)}.'
  if template == 3:
    return f'{capitalize(noun(shape, rng, size=True))} is {where(shape, rng)}.'
  return f'{capitalize(where(shape, rng))} we can see {noun(shape, rng)}.'
