"""train.py end to end at tiny scale: every stage, bad inputs (kill -9, SIGTERM and restarts:
test_training_restarts.py).

Every stage runs in the paper's vocabulary layout: the drafts have the base vocabulary (128 ids),
`<image>` (128) and `<pad>` (129) lie past it, the target's text vocabulary is 136. Each stage's
loss must stay finite (an out-of-range id reaching an embedding or a gather would make it NaN)
and fall.
"""

import os

import jax
import numpy as np
import pytest

import training_fixtures as fx
from mmspec_jax.convert.loading import load_model
from mmspec_jax.decoding.engine import SpeculativeDecoder
from mmspec_jax.decoding.sampling import SamplingConfig
from mmspec_jax.models import FeatureDraftConfig, build, default_feature_layers
from mmspec_jax.testing import tiny_hf
from mmspec_jax.training.loop import Trainer


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('train')
  tokenizer = str(root / 'tokenizer')
  tiny_hf.word_tokenizer().save_pretrained(tokenizer)
  json_file, images = fx.write_conversations(str(root / 'conversations'))
  return {'root': root, 'tokenizer': tokenizer,
          'corpus': fx.write_corpus(str(root / 'corpus')),
          'json': json_file, 'images': images,
          'target': fx.write_target(str(root / 'target')),
          'data_dir': str(root / 'tfds')}


def pretrain_config(world, **overrides):
  config = fx.load_stage_config('draft_pretrain')
  config.model.vocab_size = fx.DRAFT_VOCAB
  config.tokenizer = world['tokenizer']
  config.data.data_dir = world['data_dir']
  config.data.prepare.builder = 'text_corpus'
  config.data.prepare.files = world['corpus']
  config.update_from_flattened_dict(overrides)
  return config


def conversation_config(world, stage, **overrides):
  config = fx.load_stage_config(stage)
  if 'text' in config.model:
    config.model.text.vocab_size = fx.DRAFT_VOCAB
  else:
    config.model.vocab_size = fx.DRAFT_VOCAB
  config.target = world['target']
  config.data.data_dir = world['data_dir']
  config.data.prepare.builder = 'llava_conversations'
  config.data.prepare.config_name = 'conversations'
  config.data.prepare.json_files = world['json']
  config.data.prepare.image_folder = world['images']
  config.data.prepare.validation_fraction = 0.2
  config.data.seq_len = 32
  config.update_from_flattened_dict(overrides)
  return config


def first_batch(trainer):
  """The first training batch the trainer's data gives (what its first step trains on)."""
  with trainer.data.train_iterator() as iterator:
    return next(iterator)


def assert_padded_past_the_draft(batch):
  """Some row is padded with <pad>, an id the draft does not have."""
  assert tiny_hf.PAD_TOKEN >= fx.DRAFT_VOCAB
  padding = batch['inputs'] == tiny_hf.PAD_TOKEN
  assert padding.any() and not batch['loss_mask'][padding].any()


def assert_finite_and_falling(history, stage):
  """Finite losses, the last two logged (on other batches) below the first two on average."""
  losses = [loss for _, loss in history]
  print(stage, 'loss curve', [round(x, 3) for x in losses])
  assert len(losses) >= 4 and np.isfinite(losses).all(), (stage, losses)
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), (stage, losses)


@pytest.fixture(scope='module')
def pretrained(world):
  workdir = str(world['root'] / 'pretrain')
  trainer = Trainer(pretrain_config(world, num_train_steps=60, log_every_steps=5,
                                    eval_every_steps=30, warmup_steps=5), workdir)
  trainer.run()
  return workdir, trainer.history, first_batch(trainer)


def test_pretraining_loss_falls_and_exports(pretrained):
  workdir, history, batch = pretrained
  # Packed rows are filled to seq_len, the last document cut: no padding (the conversation
  # stages below check that <pad>, past the draft's ids, is masked).
  assert (batch['segment_ids'] > 0).all() and batch['loss_mask'].all()
  losses = [loss for _, loss in history]
  assert_finite_and_falling(history, 'pretrain')
  assert losses[0] > 4.0 and np.mean(losses[-3:]) < 0.6 * losses[0]
  config, params = load_model(os.path.join(workdir, 'export'))
  assert config.vocab_size == fx.DRAFT_VOCAB
  import transformers
  hf = transformers.LlamaForCausalLM.from_pretrained(os.path.join(workdir, 'export_hf'))
  assert hf.config.vocab_size == fx.DRAFT_VOCAB


def test_chat_then_adapter_stages(world, pretrained):
  chat_dir = str(world['root'] / 'chat')
  chat = Trainer(conversation_config(world, 'draft_chat', init_from=os.path.join(
      pretrained[0], 'export'), num_train_steps=10, log_every_steps=1, eval_steps=1), chat_dir)
  assert_padded_past_the_draft(first_batch(chat))
  chat.run()
  assert_finite_and_falling(chat.history, 'chat')
  _, chat_params = load_model(os.path.join(chat_dir, 'export'))

  stage1_dir = str(world['root'] / 'adapter1')
  stage1_trainer = Trainer(conversation_config(
      world, 'adapter_stage1', init_from=os.path.join(chat_dir, 'export'), num_train_steps=8,
      log_every_steps=1, eval_steps=1, warmup_steps=1, learning_rate=3e-3), stage1_dir)
  batch = first_batch(stage1_trainer)
  assert_padded_past_the_draft(batch)
  assert (batch['inputs'] == tiny_hf.IMAGE_TOKEN).any()  # Image placeholders, also past it.
  stage1_trainer.run()
  assert_finite_and_falling(stage1_trainer.history, 'adapter stage 1')
  config, stage1 = load_model(os.path.join(stage1_dir, 'export'))
  # From the target.
  assert config.vision_hidden_size == 32 and config.image_token_index == tiny_hf.IMAGE_TOKEN
  assert config.text.vocab_size == fx.DRAFT_VOCAB
  # Stage 1 trains the adapter only: the language model is the chat draft's, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, stage1['language_model'], chat_params)

  stage2_dir = str(world['root'] / 'adapter2')
  stage2_trainer = Trainer(conversation_config(
      world, 'adapter_stage2', init_from=os.path.join(stage1_dir, 'export'), num_train_steps=8,
      log_every_steps=1, eval_steps=1, warmup_steps=1, learning_rate=1e-3), stage2_dir)
  stage2_trainer.run()
  assert_finite_and_falling(stage2_trainer.history, 'adapter stage 2')
  _, stage2 = load_model(os.path.join(stage2_dir, 'export'))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), stage1, stage2)
  assert any(jax.tree.leaves(changed['language_model']))
  assert any(jax.tree.leaves(changed['multi_modal_projector']))


def test_distillation_stage(world, pretrained):
  workdir = str(world['root'] / 'distill')
  trainer = Trainer(conversation_config(world, 'draft_distill', init_from=os.path.join(
      pretrained[0], 'export'), num_train_steps=12, log_every_steps=3, eval_steps=1,
      warmup_steps=1, learning_rate=3e-3), workdir)
  batch = first_batch(trainer)
  assert_padded_past_the_draft(batch)
  assert (batch['inputs'] == tiny_hf.IMAGE_TOKEN).any()  # The teacher's image rows.
  trainer.run()
  losses = [loss for _, loss in trainer.history]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert_finite_and_falling(trainer.history, 'distill')


def test_workdir_of_another_config_is_refused(world, pretrained):
  config = pretrain_config(world)
  config.model.hidden_size = 32
  with pytest.raises(ValueError, match="holds a run of another config: its 'model' differs"):
    Trainer(config, pretrained[0])


def test_missing_dataset_is_named(world, tmp_path):
  config = pretrain_config(world)
  config.data.prepare.builder = ''
  config.data.name = 'lm1b'
  with pytest.raises(ValueError, match='lm1b'):
    Trainer(config, str(tmp_path / 'run')).run()


def test_tokenizer_that_does_not_match_the_target_is_refused(world, tmp_path):
  other = str(tmp_path / 'other_tokenizer')
  tiny_hf.word_tokenizer(swap=(7, 8)).save_pretrained(other)
  config = conversation_config(world, 'draft_chat')
  config.tokenizer = other
  with pytest.raises(ValueError, match='incompatible draft vocabulary'):
    Trainer(config, str(tmp_path / 'run'))


def test_tokenizer_with_text_past_the_model_vocabulary_is_refused(world, tmp_path):
  """Regular tokens past the model's ids are refused by name (the special <image> and <pad> past
  a draft's base vocabulary are not: every other test here trains with them)."""
  config = pretrain_config(world)
  config.model.vocab_size = 120
  with pytest.raises(ValueError, match=r"the tokenizer in '.*tokenizer' has the regular token "
                                       r"'w120' at id 120, past the model's 120 ids"):
    Trainer(config, str(tmp_path / 'run'))


def test_target_llava_trains_from_scratch_and_exports(world):
  config = conversation_config(world, 'target', num_train_steps=30, log_every_steps=5,
                               eval_steps=1, warmup_steps=3, learning_rate=3e-3)
  config.target = ''
  config.tokenizer = world['target']  # Tokenizer and image processor.
  config.model.text.vocab_size = fx.TARGET_VOCAB
  config.model.text.pad_token_id = tiny_hf.PAD_TOKEN
  config.model.image_token_index = tiny_hf.IMAGE_TOKEN  # The word tokenizer's <image>.
  config.model.vision.image_size = 28  # What the processor produces.
  workdir = str(world['root'] / 'target_run')
  trainer = Trainer(config, workdir)
  assert (first_batch(trainer)['inputs'] == tiny_hf.PAD_TOKEN).any()
  trainer.run()
  losses = [loss for _, loss in trainer.history]
  assert_finite_and_falling(trainer.history, 'target')
  assert losses[-1] < 0.7 * losses[0]
  import transformers
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(os.path.join(workdir,
                                                                               'export_hf'))
  assert hf.config.image_token_index == tiny_hf.IMAGE_TOKEN
  assert hf.config.text_config.vocab_size == fx.TARGET_VOCAB


def test_feature_distillation_stage(world):
  """The feature draft from nothing: one decoder layer at the target's width on its layer
  outputs, unrolled 2 positions past them (training-time test); its embedding and head start
  from the target's; the export reads the target's default layers and decodes exactly."""
  workdir = str(world['root'] / 'feature')
  trainer = Trainer(conversation_config(world, 'feature_distill', num_train_steps=12,
                                        log_every_steps=3, eval_steps=1, warmup_steps=1,
                                        learning_rate=3e-3), workdir)
  batch = first_batch(trainer)
  assert_padded_past_the_draft(batch)
  assert (batch['inputs'] == tiny_hf.IMAGE_TOKEN).any()  # The target's features of images.
  assert trainer.objective.unroll_steps == 2
  trainer.run()
  assert_finite_and_falling(trainer.history, 'feature_distill')
  target_config, target_params = load_model(world['target'])
  config, params = load_model(os.path.join(workdir, 'export'))
  assert isinstance(config, FeatureDraftConfig)
  assert config.target_hidden_size == target_config.text.hidden_size
  assert config.feature_layers == default_feature_layers(target_config.text.num_layers)
  assert config.text.num_layers == 1 and config.text.vocab_size == fx.DRAFT_VOCAB
  decoder = SpeculativeDecoder(build(target_config), build(config), 3, SamplingConfig(), 12,
                               (-1,))
  autoregressive = SpeculativeDecoder(build(target_config), None, 0, SamplingConfig(), 12, (-1,))
  rows = (batch['inputs'][:2, :24], np.array([24, 17], np.int32), batch['images'][:2])
  outputs = [model.generate(target_params, draft, *rows, jax.random.key(0)).tokens
             for model, draft in ((decoder, params), (autoregressive, None))]
  np.testing.assert_array_equal(*outputs)
