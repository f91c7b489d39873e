"""The fields every training config has, with their defaults; configs/*.py override them."""

from __future__ import annotations

import ml_collections

from mmspec_jax import sharding


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Which stage: draft_pretrain | draft_chat | draft_distill | adapter_stage1 | adapter_stage2.
  config.stage = 'draft_pretrain'
  # Objective: 'lm' (next-token), 'distill' (from the target's logits), 'adapter'.
  config.task = 'lm'
  # The trained model's config (models/config.py to_dict form), e.g. a preset's.
  config.model = ml_collections.ConfigDict()
  # A converted directory (a previous stage's export) to start from; '' = random init.
  config.init_from = ''
  # The target (HF or converted directory): teacher for distill, vision features for the adapter
  # stages, and the tokenizer the draft must share. '' for pretraining without a target.
  config.target = ''
  # Directory with the tokenizer (HF format); '' = the target's.
  config.tokenizer = ''

  config.data = ml_collections.ConfigDict()
  # 'pretrain' (packed text), 'chat' (conversations, images dropped), 'multimodal' (with images).
  config.data.kind = 'pretrain'
  # TFDS data directory holding prepared datasets (nothing is downloaded).
  config.data.data_dir = ''
  # Prepared dataset to read, 'NAME[/CONFIG]': 'lm1b', 'c4/en', 'text_corpus/NAME', ...
  config.data.name = ''
  # Local sources to prepare into data_dir first (skipped when builder is ''):
  # builder 'text_corpus' with files (glob), or 'llava_conversations' with json_files and
  # image_folder; validation_fraction holds documents out for evaluation.
  config.data.prepare = ml_collections.ConfigDict(dict(
      builder='', config_name='default', files='', json_files='', image_folder='',
      validation_fraction=0.0))
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'  # '' disables evaluation.
  config.data.text_key = 'text'  # The text feature of a text dataset.
  config.data.seq_len = 128  # Tokens per row.
  config.data.prefetch = 2  # Batches prepared ahead by the input thread.

  # Optimization.
  config.batch_size = 8  # Global rows per update (all hosts together).
  config.num_micro_batches = 1  # Gradient accumulation: the batch is split into this many.
  config.num_train_steps = 100
  config.learning_rate = 1e-3  # Peak, after linear warmup; cosine decay afterwards.
  config.warmup_steps = 10
  config.end_learning_rate_factor = 0.1  # Final learning rate, as a fraction of the peak.
  config.adam_b1 = 0.9
  config.adam_b2 = 0.95
  config.adam_eps = 1e-8
  config.weight_decay = 0.1  # Decoupled (AdamW); never on norm scales or biases.
  config.max_grad_norm = 1.0  # Global-norm clipping.
  config.distill_kind = 'kl'  # distill: 'kl' or 'tvd'.
  config.distill_weight = 1.0  # distill: weight of the distillation term against CE.
  # Which parameters train: '' = all; 'adapter' = only the adapter draft's projector.
  config.trainable = ''

  # Precision: compute dtype; parameters stay float32 (bfloat16 compute on TPU).
  config.dtype = 'float32'

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 10
  config.eval_every_steps = 50
  config.eval_steps = 4  # Held-out batches per evaluation.
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 3
  config.export = True  # At the end: converted directory (+ HF directory for LLaMA drafts).

  # Devices: mesh axis sizes (-1 takes the rest) and the logical-axis rules (sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = sharding.DEFAULT_RULES
  # Call jax.distributed.initialize() (multi-host TPU pods, multi-node GPU).
  config.multihost = False
  return config
