"""Where `make demo` keeps what it generates and trains (git ignores `artifacts/`), so reruns
reuse it and `decode.py` without a target can find the demo checkpoints."""

from __future__ import annotations

import os

ROOT = os.environ.get('MMSPEC_ARTIFACTS', 'artifacts')


HF_EXPORT_SUBDIR = 'export_hf'  # Under a run's workdir, next to `export`.


def world_dir(root: str | None = None) -> str:
  return os.path.join(root or ROOT, 'world')


def run_dir(stage: str, root: str | None = None) -> str:
  return os.path.join(root or ROOT, 'runs', stage)


def export_dir(stage: str, root: str | None = None) -> str:
  """A stage's converted export (what decode.py and the next stage load)."""
  return os.path.join(run_dir(stage, root), 'export')


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
DEMO_DRAFT_STAGE = 'draft_chat'
