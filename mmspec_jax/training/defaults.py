"""The fields every training config has, with their defaults; configs/*.py override them."""

from __future__ import annotations

import dataclasses

import ml_collections

from mmspec_jax import distributed, sharding

# Under a run's workdir: the model for decode.py, and the same as a Hugging Face directory.
EXPORT_SUBDIR = 'export'
HF_EXPORT_SUBDIR = 'export_hf'


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Which stage: draft_pretrain | draft_chat | draft_distill | adapter_stage1 | adapter_stage2 |
  # feature_distill (or target, the world's LLaVA).
  config.stage = 'draft_pretrain'
  # The preset the stage's config was made at: 'tiny' (CPU smoke scale) | 'paper' (the 115M
  # draft on a TPU slice); informational, printed before the first step.
  config.preset = 'tiny'
  # Objective: 'lm' (next-token), 'distill' (from the target's logits), 'adapter', 'feature' (the
  # feature draft on the target's layer outputs; training/step.py).
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
  config.data.prefetch = 2  # Batches read ahead (grain, in a thread or in the workers).
  # grain worker processes that read, tokenize and preprocess images (0: a thread of the training
  # process). Any count gives the same batches; on a TPU or GPU host give it spare cores (2
  # workers read the world's images 2.2x faster than none on 2 cores; each takes seconds to start).
  config.data.workers = 0

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
  # distill (and adapter stages when distill_weight > 0): the objective toward the target's
  # distributions, one of 'kl', 'tvd', 'tvd++', 'acceptance' (training/losses.py).
  config.distill_kind = 'kl'
  config.distill_weight = 1.0  # Weight of the distillation term against cross-entropy.
  config.distill_gamma = 5  # 'acceptance': the draft block length whose accepted tokens count.
  # Which parameters train: '' = all; 'adapter' = only the adapter draft's projector.
  config.trainable = ''
  # feature: the target layers the draft reads, comma-separated ('' = EAGLE-3's low, middle and
  # high for the target's depth), and the positions it is trained to draft past them on its own
  # hidden states (training-time test; 0 = teacher-forced only). Its width, heads and MLP are the
  # target's (config.model.text gives its layer count and vocabulary), and its embedding and LM
  # head start from the target's when it starts from nothing.
  config.feature_layers = ''
  config.unroll_steps = 0

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
  # Several processes (multi-host TPU slices, multi-node GPU): config.multihost and
  # config.distributed (see mmspec_jax/distributed.py).
  distributed.add_config(config)
  return config


# Per stage: the objective, the data, and the settings of each scale. `tiny` runs in a minute on
# a CPU; `paper` is the paper's 115M draft on a TPU slice (bfloat16 compute, FSDP over the slice).
_PAPER_RUNTIME = dict(dtype='bfloat16', log_every_steps=50, eval_every_steps=500,
                      checkpoint_every_steps=500, mesh=dict(data=1, fsdp=-1, tensor=1))
STAGES = {
    # A whole LLaVA from scratch: the offline world's target (configs/world.py sizes it).
    'target': dict(
        task='llava', kind='multimodal',
        tiny=dict(seq_len=128, batch_size=8, num_train_steps=400, learning_rate=2e-3,
                  warmup_steps=40),
        paper=None),
    'draft_pretrain': dict(
        task='lm', kind='pretrain',
        tiny=dict(seq_len=64, batch_size=8, num_train_steps=200, learning_rate=3e-3,
                  warmup_steps=20, validation_fraction=0.1),
        paper=dict(seq_len=2048, batch_size=256, num_train_steps=100_000, learning_rate=3e-4,
                   warmup_steps=2000, log_every_steps=100, eval_every_steps=2000,
                   checkpoint_every_steps=1000)),
    'draft_chat': dict(
        task='lm', kind='chat',
        tiny=dict(seq_len=96, batch_size=8, num_train_steps=100, learning_rate=1e-3,
                  validation_fraction=0.1),
        paper=dict(seq_len=2048, batch_size=128, num_train_steps=5_000, learning_rate=1e-4,
                   warmup_steps=200)),
    'draft_distill': dict(
        task='distill', kind='multimodal', distill_kind='tvd', distill_weight=0.9,
        tiny=dict(seq_len=128, batch_size=8, num_train_steps=100, learning_rate=5e-4),
        paper=dict(seq_len=2048, batch_size=64, num_train_steps=5_000, learning_rate=5e-5,
                   warmup_steps=200)),
    'adapter_stage1': dict(
        task='adapter', kind='multimodal', trainable='adapter', distill_weight=0.0,
        tiny=dict(seq_len=128, batch_size=8, num_train_steps=100, learning_rate=1e-3),
        paper=dict(seq_len=1024, batch_size=256, num_train_steps=2_000, learning_rate=1e-3,
                   warmup_steps=60)),
    # The feature draft (EAGLE-3 style): one decoder layer at the target's width.
    'feature_distill': dict(
        task='feature', kind='multimodal', distill_kind='tvd', distill_weight=0.9, unroll_steps=2,
        tiny=dict(seq_len=128, batch_size=8, num_train_steps=100, learning_rate=1e-3),
        paper=dict(seq_len=2048, batch_size=64, num_train_steps=10_000, learning_rate=1e-4,
                   warmup_steps=300)),
    'adapter_stage2': dict(
        task='adapter', kind='multimodal', trainable='', distill_weight=0.0,
        tiny=dict(seq_len=128, batch_size=8, num_train_steps=100, learning_rate=3e-4),
        paper=dict(seq_len=2048, batch_size=128, num_train_steps=5_000, learning_rate=2e-5,
                   warmup_steps=150)),
}
_DATA_FIELDS = ('seq_len',)
_PREPARE_FIELDS = ('validation_fraction',)


def stage_config(stage: str, scale: str) -> ml_collections.ConfigDict:
  """The config of a stage at a scale ('tiny' or 'paper')."""
  from mmspec_jax.models import AdapterDraftConfig, FeatureDraftConfig, presets
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; expected one of {sorted(STAGES)}')
  if scale not in ('tiny', 'paper'):
    raise ValueError(f"unknown scale {scale!r}; expected 'tiny' or 'paper'")
  spec = dict(STAGES[stage])
  if spec.get(scale) is None:
    raise ValueError(f'stage {stage!r} has no {scale!r} scale')
  config = base_config()
  config.stage = stage
  config.preset = scale
  config.task = spec.pop('task')
  config.data.kind = spec.pop('kind')
  settings = {**(_PAPER_RUNTIME if scale == 'paper' else {}), **spec.pop(scale)}
  spec.pop('tiny' if scale == 'paper' else 'paper')
  for name, value in {**spec, **settings}.items():
    if name in _DATA_FIELDS:
      config.data[name] = value
    elif name in _PREPARE_FIELDS:
      config.data.prepare[name] = value
    elif name == 'mesh':
      config.mesh.update(value)
    else:
      config[name] = value
  text = presets.get('tiny_llama' if scale == 'tiny' else 'draft_115m')
  # The adapter's input width and image token follow the target (filled in at run time).
  model = AdapterDraftConfig(text=text) if config.task == 'adapter' else text
  if config.task == 'feature':  # Fitted to the target at run time (training/loop.py).
    model = FeatureDraftConfig(text=dataclasses.replace(text, num_layers=1),
                               target_hidden_size=text.hidden_size, feature_layers=(0,))
  if config.task == 'llava':
    model = presets.get('tiny_llava')
  config.model = presets.as_config_dict(model)
  return config
