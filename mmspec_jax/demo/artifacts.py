"""Where `make demo` keeps what it generates and trains (git ignores `artifacts/`), so reruns
reuse it and `decode.py` without a target can find the demo checkpoints."""

from __future__ import annotations

import logging
import os

from mmspec_jax.training.defaults import EXPORT_SUBDIR, HF_EXPORT_SUBDIR

def _default_root() -> str:
  """MMSPEC_ARTIFACTS, else the repository's artifacts/ when the package runs from a checkout
  (so every command finds the demo's files from any directory), else ./artifacts."""
  if os.environ.get('MMSPEC_ARTIFACTS'):
    return os.environ['MMSPEC_ARTIFACTS']
  checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.path.isfile(os.path.join(checkout, 'setup.py')):
    return os.path.join(checkout, 'artifacts')
  return os.path.abspath('artifacts')


ROOT = _default_root()


def world_dir(root: str | None = None) -> str:
  return os.path.join(root or ROOT, 'world')


def run_dir(stage: str, root: str | None = None) -> str:
  return os.path.join(root or ROOT, 'runs', stage)


def export_dir(stage: str, root: str | None = None) -> str:
  """A stage's converted export (what decode.py and the next stage load)."""
  return os.path.join(run_dir(stage, root), EXPORT_SUBDIR)


def hf_export_dir(stage: str, root: str | None = None) -> str:
  """A stage's Hugging Face export (LLaMA and LLaVA models; what transformers loads)."""
  return os.path.join(run_dir(stage, root), HF_EXPORT_SUBDIR)


def is_trained(stage: str, root: str | None = None) -> bool:
  return os.path.isfile(os.path.join(export_dir(stage, root), 'mmspec_config.json'))


def target_answers_path(root: str | None = None) -> str:
  """The target's own answers to the world's training prompts (LLaVA JSON), which the distilled
  drafts train on."""
  return os.path.join(root or ROOT, 'runs', 'target_answers', 'train.json')


def results_dir(root: str | None = None) -> str:
  return os.path.join(root or ROOT, 'results')


DEMO_TARGET_STAGE = 'target'
DEMO_DRAFT_STAGE = 'draft_chat'  # The benchmarks' draft (their figures are this one's).
# decode.py's and serve.py's draft when none is given: the best `make demo` trained first (the
# distilled ones accept the most tokens in its evaluation), else the chat draft.
DEMO_DECODE_DRAFT_STAGES = ('adapter_distill', 'draft_distill', DEMO_DRAFT_STAGE)


# The name the server gives the demo pair (clients send it as "model").
DEMO_MODEL_NAME = 'mmspec-demo'


def use_demo_checkpoints(config) -> bool:
  """No target given: decode (or serve) with the checkpoints `make demo` trained, and its best
  draft unless one is given. Returns whether it did."""
  if config.target:
    return False
  if not is_trained(DEMO_TARGET_STAGE):
    raise ValueError('config.target is empty and there are no demo checkpoints under '
                     f'{ROOT!r}: pass --config.target=DIR, or run `make demo` first')
  config.target = export_dir(DEMO_TARGET_STAGE)
  trained = [s for s in DEMO_DECODE_DRAFT_STAGES if is_trained(s)]
  if not config.draft and trained:
    config.draft = export_dir(trained[0])
  logging.warning('no target given: using the demo checkpoints %s and %s', config.target,
                  config.draft or '(no draft)')
  return True
