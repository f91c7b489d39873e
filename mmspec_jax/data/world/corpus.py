"""The text-only corpus: documents about scenes with no image, to pretrain the draft's LM.

Each document is generated from a fresh scene and has no blank line inside (documents are
separated by blank lines in text_corpus.txt, which TextCorpus splits on). Four kinds:
  description   a prose description of a picture (as a conversation answer would give);
  captions      a caption followed by a longer description of the same picture;
  dialogue      the picture described in words, then 2-3 questions and answers, written as
                "Question:/Answer:" lines or as "USER: ... ASSISTANT: ..." chat turns;
  quiz          the picture described in words, then a multiple-choice question and
                "The answer is C. ..." as in the sqa task.
Since the reader cannot see the picture, the words that describe it come first: the answers then
follow from the text, which is what a language-only draft can learn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mmspec_jax.data.world import dialogue, phrases
from mmspec_jax.data.world.multiple_choice import sample_multiple_choice
from mmspec_jax.data.world.scenes import Scene, sample_scene
from mmspec_jax.data.world.tasks import caption

DOCUMENT_KINDS = ('description', 'captions', 'dialogue', 'quiz')
_OPENERS = ('Imagine a picture.', 'Here is a description of a picture.',
            'Consider the following image.', 'A simple drawing.', 'Look at this picture.')


def _context(scene: Scene, rng: np.random.Generator) -> str:
  return caption(scene, rng) if rng.random() < 0.5 else dialogue.describe(scene, rng)


def document(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> str:
  """One text-only document about `scene` of `kind` (random when None)."""
  kind = kind or phrases.pick(rng, DOCUMENT_KINDS)
  if kind == 'description':
    return f'{phrases.pick(rng, _OPENERS)} {dialogue.describe(scene, rng)}'
  if kind == 'captions':
    return f'{caption(scene, rng)}\n{dialogue.describe(scene, rng)}'
  if kind == 'dialogue':
    pairs, _ = dialogue.sample_dialogue(scene, rng, num_turns=int(rng.integers(2, 4)))
    context = _context(scene, rng)
    if rng.random() < 0.5:
      lines = [context] + [f'Question: {q}\nAnswer: {a}' for q, a in pairs]
      return '\n'.join(lines)
    turns = [f'USER: {context} {q} ASSISTANT: {a}' if i == 0 else f'USER: {q} ASSISTANT: {a}'
             for i, (q, a) in enumerate(pairs)]
    return '\n'.join(turns)
  if kind == 'quiz':
    question = sample_multiple_choice(scene, rng)
    return f'{_context(scene, rng)}\n{question.prompt(rng)}\nAnswer: {question.answer()}'
  raise ValueError(f'unknown document kind {kind!r}; expected one of {DOCUMENT_KINDS}')


def documents(rng: np.random.Generator, num_bytes: int) -> Iterator[str]:
  """Documents about fresh random scenes until their UTF-8 size (with the blank-line
  separators of text_corpus.txt) reaches num_bytes."""
  if num_bytes < 0:
    raise ValueError(f'num_bytes must be >= 0, got {num_bytes}')
  total = 0
  while total < num_bytes:
    text = document(sample_scene(rng), rng)
    total += len(text.encode('utf-8')) + 2
    yield text
