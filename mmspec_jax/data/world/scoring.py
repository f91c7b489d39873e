"""Answer quality in [0, 1] of a model's text for a world record.

sqa: 1.0 if the predicted letter equals record["answer"], else 0.0. The predicted letter is the
  first A-D after "answer is" (e.g. "The answer is (B)."), or failing that the first standalone
  capital A-D anywhere in the text (so "B" or "B. 3" count; note that a leading article "A"
  counts as the letter A).

captioning, conversation: F1 of colour+kind mentions.
  A mention is a colour word directly followed by a kind word, singular or plural,
  case-insensitive: "red circle", "Blue stars" (sizes come before the colour in the world's
  text, as in "a small red circle"). "the circle is red" or "red shapes" are not mentions.
  With P the set of (colour, kind) pairs mentioned in the prediction, S the pairs of the scene
  and E the pairs the reference answer mentions (E is a subset of S; for captions every shape of
  the scene is named, so E = S):
    precision = |P & S| / |P|   (1 if P is empty: nothing false was said)
    recall    = |P & E| / |E|   (1 if E is empty: nothing was expected)
    F1        = 2 precision recall / (precision + recall)   (0 if both are 0)
  Precision is measured against the whole scene, so a true mention the reference did not make
  costs nothing, while a hallucinated shape does. The reference answer always scores 1.0.
  For a conversation the reference is the assistant turn `turn` (default 0, the first answer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mmspec_jax.data.world.scenes import COLOURS, KINDS, Scene
from mmspec_jax.data.world.tasks import TASKS

_MENTION = re.compile(r'\b(' + '|'.join(COLOURS) + r')\s+(' + '|'.join(KINDS) + r')s?\b',
                      re.IGNORECASE)
_ANSWER_IS = re.compile(r'answer is\W*([A-D])\b', re.IGNORECASE)
_STANDALONE = re.compile(r'\b([A-D])\b')


def mentions(text: str) -> set[tuple[str, str]]:
  """(colour, kind) pairs mentioned in text (see the module docstring), lower case."""
  return {(c.lower(), k.lower()) for c, k in _MENTION.findall(text)}


def predicted_letter(text: str) -> str | None:
  """The option letter a prediction chooses, or None."""
  match = _ANSWER_IS.search(text) or _STANDALONE.search(text)
  return match.group(1).upper() if match else None


def mention_f1(predicted: set, scene_pairs: set, expected: set) -> float:
  """F1 of predicted mentions: precision against the scene, recall against the expected set."""
  precision = len(predicted & scene_pairs) / len(predicted) if predicted else 1.0
  recall = len(predicted & expected) / len(expected) if expected else 1.0
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def reference_answer(record: Mapping[str, Any], turn: int = 0) -> str:
  """The text of the record's assistant turn `turn` (0 = first answer, -1 = last)."""
  answers = [t['value'] for t in record['conversations'] if t['from'] in ('gpt', 'assistant')]
  if not answers:
    raise ValueError(f'record {record.get("id")!r} has no assistant turn')
  try:
    return answers[turn]
  except IndexError:
    raise ValueError(f'record {record.get("id")!r} has {len(answers)} assistant turn(s); '
                     f'turn={turn} is out of range') from None


def score(task: str, prediction: str, record: Mapping[str, Any], *, turn: int = 0) -> float:
  """Quality in [0, 1] of `prediction` as the answer to `record` (see the module docstring).

  Args:
    task: 'captioning', 'sqa' or 'conversation' (normally record["task"]).
    prediction: the model's answer text (special tokens removed).
    record: a world record (with "scene", and "answer" for sqa).
    turn: which assistant turn the prediction answers (conversation records have 2-3).
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  if task == 'sqa':
    if 'answer' not in record:
      raise ValueError(f'sqa record {record.get("id")!r} has no "answer" letter')
    return float(predicted_letter(prediction) == record['answer'])
  if 'scene' not in record:
    raise ValueError(f'record {record.get("id")!r} has no "scene" to score against')
  scene = Scene.from_json(record['scene'])
  scene_pairs = {s.pair for s in scene.shapes}
  if task == 'captioning':
    expected = scene_pairs
  else:
    expected = mentions(reference_answer(record, turn)) & scene_pairs
  return mention_f1(mentions(prediction), scene_pairs, expected)
