r"""The offline world's models and training stages: `--config=configs/world.py:STAGE`.

  python -m mmspec_jax.data.world --out_dir=artifacts/world
  python train.py --config=configs/world.py:target --workdir=artifacts/runs/target
  python train.py --config=configs/world.py:draft_pretrain --workdir=artifacts/runs/draft_pretrain
  ... draft_chat, adapter_stage1, adapter_stage2 (in this order); then, on the target's own
  answers (python -m mmspec_jax.distillation.target_answers, see make demo), draft_distill,
  adapter_distill and feature_distill

`make demo` runs all of it (and caches it under artifacts/). Paths follow
mmspec_jax/demo/artifacts.py; the world's tokenizer has 512 ids with `<image>` = 4.
"""

from mmspec_jax.demo import artifacts
import dataclasses

from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, LlamaConfig, LlavaConfig,
                               VisionConfig, presets)
from mmspec_jax.training.defaults import stage_config

VOCAB = 512
IMAGE_TOKEN = 4
# The target: a small LLaVA (CLIP-style ViT on 64 px images, 8 px patches: 64 image tokens).
TARGET = LlavaConfig(
    text=LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_layers=4,
                     num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3),
    vision=VisionConfig(hidden_size=96, intermediate_size=384, num_layers=4, num_heads=4,
                        image_size=64, patch_size=8),
    image_token_index=IMAGE_TOKEN)
# The language-only draft: several times smaller than the target's language model.
DRAFT = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_layers=2,
                    num_heads=2, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3)

ANSWERS = 'target answers'  # Stands for artifacts.target_answers_path().
# stage -> (previous stage to start from, conversations file or None for the text corpus,
#           steps, learning rate)
STAGES = {
    # 1e-3, not 3e-3: at 3e-3 the from-scratch ViT's residual stream blows up (feature std ~40)
    # and the target learns to ignore its images (caption loss gap right vs wrong image 0.08
    # nats/token at 3e-3, 0.37 at 1e-3 after 300 caption steps).
    'target': (None, 'train_all.json', 1500, 1e-3),
    'draft_pretrain': (None, None, 400, 3e-3),
    'draft_chat': ('draft_pretrain', 'train_all.json', 300, 1e-3),
    # Distilled on the target's own answers (mmspec_jax/distillation/target_answers.py) toward its
    # distributions: the language-only draft from its chat stage, the adapter draft from stage 2.
    'draft_distill': ('draft_chat', ANSWERS, 150, 3e-4),
    'adapter_distill': ('adapter_stage2', ANSWERS, 150, 2e-4),
    # The feature draft: one decoder layer at the target's width, its embedding and head from
    # the target's, trained from there on the target's answers and layer outputs.
    'feature_distill': (None, ANSWERS, 300, 1e-3),
    'adapter_stage1': ('draft_chat', 'train_captioning.json', 150, 2e-3),
    'adapter_stage2': ('adapter_stage1', 'train_all.json', 200, 5e-4),
}


def get_config(stage: str = 'target'):
  if stage not in STAGES:
    raise ValueError(f'unknown world stage {stage!r}; expected one of {list(STAGES)}')
  previous, conversations, steps, learning_rate = STAGES[stage]
  if stage == 'adapter_distill':  # Stage 2 again, now toward the target's distributions.
    config = stage_config('adapter_stage2', 'tiny')
    config.stage, config.distill_weight, config.distill_kind = stage, 0.9, 'tvd'
  else:
    config = stage_config(stage, 'tiny')
  config.preset = f'world:{stage}'  # The demo world's own sizes, not the tiny preset's.
  world = artifacts.world_dir()
  config.tokenizer = f'{world}/tokenizer'
  config.num_train_steps = steps
  config.learning_rate = learning_rate
  config.warmup_steps = max(10, steps // 20)
  config.batch_size = 16
  config.log_every_steps = 25
  config.eval_every_steps = steps
  config.eval_steps = 4
  config.checkpoint_every_steps = 100
  if previous:
    config.init_from = artifacts.export_dir(previous)
  if config.task in ('distill', 'adapter', 'feature'):
    config.target = artifacts.export_dir('target')
  # The feature draft's width and layers are fitted to the target when it trains.
  feature = FeatureDraftConfig(text=dataclasses.replace(DRAFT, num_layers=1),
                               target_hidden_size=TARGET.text.hidden_size, feature_layers=(0,))
  model = {'llava': TARGET, 'adapter': AdapterDraftConfig(text=DRAFT),
           'feature': feature}.get(config.task, DRAFT)
  config.model = presets.as_config_dict(model)

  data = config.data
  data.data_dir = f'{artifacts.ROOT}/tfds'
  data.prepare.validation_fraction = 0.05
  if conversations is None:
    data.seq_len = 128
    data.prepare.builder = 'text_corpus'
    data.prepare.config_name = 'world_text'
    data.prepare.files = f'{world}/text_corpus.txt'
  else:
    data.seq_len = 128  # 64 image tokens and the text; long conversations are cut.
    data.prepare.builder = 'llava_conversations'
    data.prepare.image_folder = f'{world}/images'
    if conversations == ANSWERS:
      data.prepare.config_name = 'target_answers'
      data.prepare.json_files = artifacts.target_answers_path()
    else:
      data.prepare.config_name = conversations.removesuffix('.json')
      data.prepare.json_files = f'{world}/{conversations}'
  return config
