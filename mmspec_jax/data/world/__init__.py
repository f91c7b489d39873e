"""An offline synthetic multimodal world in which the image matters.

Scenes of 1-4 coloured shapes on a 3x3 grid are drawn as small pictures; all text (captions,
multiple-choice questions, conversations, a text-only corpus) is generated from the scene, so
answers are correct by construction and can be checked against it. It trains a tiny LLaVA
target and its drafts and measures speculative decoding per task at small scale.

  scenes.py           Scene/Shape, sample_scene(), render()
  phrases.py          English for scenes (noun phrases, positions, lists, relations)
  multiple_choice.py  the sqa task's four-option questions
  dialogue.py         the conversation task's questions and descriptive answers
  tasks.py            captions and make_record(): the three tasks as LLaVA records
  corpus.py           the text-only corpus
  scoring.py          score(task, prediction, record) in [0, 1]
  tokenizer.py        train_tokenizer(), write_processor()
  generate.py         generate_world(): everything into one directory
  __main__.py         python -m mmspec_jax.data.world --out_dir=DIR
"""

from mmspec_jax.data.world.generate import generate_world
from mmspec_jax.data.world.scenes import Scene, Shape, render, sample_scene
from mmspec_jax.data.world.scoring import score
from mmspec_jax.data.world.tasks import TASKS, make_record
from mmspec_jax.data.world.tokenizer import train_tokenizer, write_processor

__all__ = ['TASKS', 'Scene', 'Shape', 'generate_world', 'make_record', 'render', 'sample_scene',
           'score', 'train_tokenizer', 'write_processor']
