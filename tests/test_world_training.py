"""The world's tiny configs train: a short run of the target and of the draft, on a small
generated world, gets its loss clearly below chance (the full demo training is not a test)."""

import importlib.util
import math
import os

import pytest

from mmspec_jax.demo import artifacts
from mmspec_jax.data.world import generate_world
from mmspec_jax.training.loop import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def world_config(stage, **overrides):
  spec = importlib.util.spec_from_file_location('world', os.path.join(REPO, 'configs',
                                                                     'world.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(stage)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('artifacts'))
  original = artifacts.ROOT
  artifacts.ROOT = root  # configs/world.py reads its paths from here.
  generate_world(artifacts.world_dir(), num_train_images=120, num_test_images=6,
                 corpus_bytes=60_000)
  yield root
  artifacts.ROOT = original


# The draft at batch 8, half its stage's 16: its loss still falls far below chance, in half the
# time (the target's, at batch 8, ends at about 0.5 x chance: too close).
@pytest.mark.parametrize('stage, steps, batch_size', [('target', 40, 16), ('draft_pretrain', 60, 8)])
def test_short_training_gets_well_below_chance(small_world, stage, steps, batch_size):
  config = world_config(stage, num_train_steps=steps, warmup_steps=5, log_every_steps=10,
                        eval_every_steps=steps, eval_steps=1, export=False, batch_size=batch_size)
  trainer = Trainer(config, artifacts.run_dir(stage))
  trainer.run()
  chance = math.log(config.model.text.vocab_size if 'text' in config.model
                    else config.model.vocab_size)
  losses = [loss for _, loss in trainer.history]
  print(stage, 'chance', round(chance, 2), 'losses', [round(x, 2) for x in losses])
  assert losses[-1] < 0.5 * chance


def test_every_world_stage_config_loads(small_world):
  for stage in ('target', 'draft_pretrain', 'draft_chat', 'draft_distill', 'adapter_stage1',
                'adapter_stage2', 'adapter_distill'):
    config = world_config(stage)
    assert config.stage == stage and config.tokenizer.startswith(small_world)
  # The distilled drafts train on the target's own answers, toward its distributions.
  for stage, task in (('draft_distill', 'distill'), ('adapter_distill', 'adapter')):
    config = world_config(stage)
    assert config.task == task and config.distill_weight > 0 and config.distill_kind == 'tvd'
    assert config.data.prepare.json_files == artifacts.target_answers_path()
  assert world_config('adapter_stage2').distill_weight == 0
