"""The paper's three tasks as LLaVA records, with text generated from the scene alone.

  captioning    (COCO-like)         one question ("Describe the image.", ...), one caption
  sqa           (ScienceQA-like)    a four-option question, "The answer is B. <explanation>"
  conversation  (LLaVA-Instruct)    2-3 turns of questions and descriptive answers

A record is the standard LLaVA JSON object plus what evaluation needs:

  {"id": str, "image": str (file name, relative to the image folder),
   "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...],
   "task": "captioning" | "sqa" | "conversation",
   "scene": Scene.to_json(),
   "question_types": [str, ...]      (sqa: one type; conversation: one per turn)
   "answer": "A".."D", "options": [4 str]      (sqa only)}

The first human turn starts with "<image>\\n", as in LLaVA-Instruct.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmspec_jax.data.world import dialogue, phrases
from mmspec_jax.data.world.multiple_choice import sample_multiple_choice
from mmspec_jax.data.world.phrases import capitalize, count_phrase, pick
from mmspec_jax.data.world.scenes import Scene

TASKS = ('captioning', 'sqa', 'conversation')
IMAGE_PREFIX = '<image>\n'
CAPTION_PROMPTS = (
    'Describe the image.',
    'What do you see?',
    'Describe this picture briefly.',
    'What is in the image?',
    'Give a short caption for the image.',
    'Write a caption for this picture.',
    'Summarize the image in one sentence.',
    'What does this image show?',
    'Provide a brief description of the image.',
    'Caption this image.',
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """One caption naming every shape's colour and kind, from one of seven templates, with or
  without positions and sizes."""
  shapes = phrases.ordered(scene.shapes, rng)
  listing = phrases.shape_list(shapes, rng, positions=rng.random() < 0.7)
  n, bg = len(shapes), phrases.background(scene, rng)
  image = pick(rng, phrases.IMAGE_WORDS)
  template = int(rng.integers(7))
  if template == 0:
    return f'{capitalize(listing)}.'
  if template == 1:
    if n == 1:
      return f'There is one shape: {listing}.'
    return f'There are {count_phrase(n)}: {listing}.'
  if template == 2:
    return f'A {bg} {image} with {listing}.'
  if template == 3:
    return f'{capitalize(listing)} on a {bg} background.'
  if template == 4:
    return f'This {image} shows {listing}.'
  if template == 5:
    what = 'A single shape' if n == 1 else capitalize(count_phrase(n))
    return f'{what} on a {bg} background: {listing}.'
  return f'An {image} of {listing}.' if image == 'image' else f'A {image} of {listing}.'


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
  turns = []
  for index, (question, answer) in enumerate(pairs):
    turns.append({'from': 'human', 'value': (IMAGE_PREFIX if index == 0 else '') + question})
    turns.append({'from': 'gpt', 'value': answer})
  return turns


def make_record(task: str, scene: Scene, rng: np.random.Generator, *, record_id: str,
                image: str) -> dict[str, Any]:
  """One LLaVA record of `task` about `scene` (see the module docstring for the schema).

  Args:
    task: one of TASKS.
    scene: the scene the image shows; all text is derived from it.
    rng: the only source of randomness (wordings, question types, option order).
    record_id: the record's "id".
    image: the image file name, relative to the image folder.
  """
  record: dict[str, Any] = {'id': record_id, 'image': image}
  if task == 'captioning':
    record['conversations'] = _turns([(pick(rng, CAPTION_PROMPTS), caption(scene, rng))])
    extra = {'question_types': ['caption']}
  elif task == 'sqa':
    question = sample_multiple_choice(scene, rng)
    record['conversations'] = _turns([(question.prompt(rng), question.answer())])
    extra = {'question_types': [question.question_type], 'answer': question.letter,
             'options': list(question.options)}
  elif task == 'conversation':
    pairs, types = dialogue.sample_dialogue(scene, rng, num_turns=int(rng.integers(2, 4)))
    record['conversations'] = _turns(pairs)
    extra = {'question_types': types}
  else:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  record.update(task=task, scene=scene.to_json(), **extra)
  return record
