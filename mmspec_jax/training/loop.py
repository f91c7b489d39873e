"""The training loop: set up mesh, data, model and state; train, evaluate, checkpoint, export.

Restartable at any point: the newest checkpoint in the workdir (state and data position) is
resumed automatically; SIGTERM (TPU preemption) saves the current step before exiting.

On several processes (config.multihost) every process runs this same loop: the data position
saved is every host's, merged (so a run resumes exactly on any number of hosts); a SIGTERM on
any host stops every host after the same step, which they all save; the export gathers the
parameters and process 0 writes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import distributed, sharding
from mmspec_jax.convert.loading import load_model, read_config, save_converted
from mmspec_jax.data.pipeline import merge_states
from mmspec_jax.models import (AdapterDraftConfig, FeatureDraftConfig, LlamaConfig, LlavaConfig,
                               abstract_params, build, default_feature_layers, initialize,
                               parameter_count, text_config)
from mmspec_jax.models.config import from_dict, with_dtype
from mmspec_jax.training import data_setup
from mmspec_jax.training.defaults import EXPORT_SUBDIR, HF_EXPORT_SUBDIR
from mmspec_jax.training.checkpointing import (Checkpointer, check_workdir_config,
                                               write_workdir_config)
from mmspec_jax.training.optimizer import learning_rate_schedule, make_optimizer
from mmspec_jax.training.step import (Objective, TrainState, create_state, eval_step,
                                      state_shardings, train_step)

TRAINABLE = {'': None, 'adapter': lambda path: path[0] == 'multi_modal_projector'}


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log(message: str):
  if distributed.is_primary():  # Only process 0 speaks on multi-host runs.
    print(message, flush=True)


def _model_config(config):
  model_config = from_dict(config.model.to_dict())
  expected = {'llava': (LlavaConfig,), 'feature': (FeatureDraftConfig,)}.get(
      config.task, (LlamaConfig, AdapterDraftConfig))
  if not isinstance(model_config, expected):
    raise ValueError(f'task {config.task!r} trains {" or ".join(c.__name__ for c in expected)}'
                     f' models; config.model is a {type(model_config).__name__}')
  # float32 parameters; compute in config.dtype (bfloat16 on TPU).
  return with_dtype(model_config, config.dtype, 'float32')


def _device_batch(batch, mesh):
  """Host-local numpy rows -> global arrays sharded over the batch axes."""
  return {key: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, value.ndim), value) for key, value in batch.items()}


class Trainer:
  """Holds what a run needs; `run()` trains to config.num_train_steps."""

  def __init__(self, config, workdir: str):
    distributed.initialize(config)
    self.config, self.workdir = config, workdir
    self.rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    self.mesh = sharding.make_mesh(config.mesh.to_dict())
    self.model_config = _model_config(config)
    identity = {'stage': config.stage, 'task': config.task, 'model': config.model.to_dict(),
                'config': config.to_dict()}
    # Every process checks before process 0 writes: all refuse a foreign workdir alike.
    check_workdir_config(workdir, identity)
    distributed.barrier('workdir checked')
    if distributed.is_primary():
      write_workdir_config(workdir, identity)
    self.teacher_config, self.teacher_params = self._load_teacher()
    if isinstance(self.model_config, AdapterDraftConfig):
      self.model_config = _fit_adapter_to_target(self.model_config, self.teacher_config)
    if isinstance(self.model_config, FeatureDraftConfig):
      self.model_config = _fit_feature_draft_to_target(
          self.model_config, self.teacher_config, config.feature_layers)
    # Multimodal batches follow the LLaVA whose image tokens they carry: the target being
    # trained, or the frozen target a draft learns from.
    image_model = self.model_config if config.task == 'llava' else self.teacher_config
    self.data = data_setup.DataSetup(config, image_model)
    self.objective = Objective(
        build(self.model_config), task=config.task,
        teacher=build(self.teacher_config) if self.teacher_config else None,
        distill_kind=config.distill_kind, distill_weight=config.distill_weight,
        distill_gamma=config.distill_gamma, unroll_steps=config.unroll_steps)
    if config.trainable not in TRAINABLE:
      raise ValueError(f'unknown config.trainable {config.trainable!r}; expected one of '
                       f'{sorted(TRAINABLE)}')
    self.optimizer = make_optimizer(config, TRAINABLE[config.trainable])
    self.schedule = learning_rate_schedule(config)
    self.checkpointer = Checkpointer(workdir, save_every=config.checkpoint_every_steps,
                                     keep=config.keep_checkpoints)
    self._build_state_shardings()
    # Compiled once, on the first evaluation.
    self._eval_fn = jax.jit(functools.partial(eval_step, self.objective))
    self.history: list[tuple[int, float]] = []  # (step, training loss) at each log line.

  def _load_teacher(self):
    if self.config.task in ('lm', 'llava'):
      return None, None
    if not self.config.target:
      raise ValueError(f'task {self.config.task!r} needs config.target (the target model)')
    teacher_config = with_dtype(read_config(self.config.target), self.config.dtype)
    shardings = sharding.param_shardings(abstract_params(teacher_config), self.mesh, self.rules)
    return load_model(self.config.target, dtype=self.config.dtype, shardings=shardings)

  def _build_state_shardings(self):
    self.state_shardings, self.abstract_state = state_shardings(
        self.model_config, self.optimizer, self.mesh, self.rules)

  def _initial_state(self) -> TrainState:
    config = self.config
    if config.init_from:
      init_config, params = load_model(config.init_from)
      if text_dims(init_config) != text_dims(self.model_config):
        raise ValueError(f'init_from {config.init_from!r} holds a different model than '
                         'config.model')
      params = self._adapt_init_params(params)
      params = jax.tree.map(lambda x, s: jax.device_put(x.astype(jnp.float32), s), params,
                            self.state_shardings.params)
      create = jax.jit(lambda p: create_state(p, self.optimizer),
                       out_shardings=self.state_shardings)
      return create(params)
    init = jax.jit(lambda rng: create_state(nn.unbox(initialize(self.model_config, rng)),
                                            self.optimizer),
                   out_shardings=self.state_shardings)
    state = init(jax.random.key(config.seed))
    if isinstance(self.model_config, FeatureDraftConfig):
      state = self._feature_draft_from_target(state)
    return state

  def _feature_draft_from_target(self, state: TrainState) -> TrainState:
    """A new feature draft's embedding and LM head: the target's (cut to the draft's ids), as
    EAGLE's drafts start; the optimizer state is unchanged (its moments are zeros)."""
    vocab = self.model_config.text.vocab_size
    teacher = self.teacher_params['language_model']
    draft = dict(state.params['language_model'])
    draft['embed_tokens'] = {'embedding': teacher['embed_tokens']['embedding'][:vocab]}
    if 'lm_head' in draft:
      head = teacher.get('lm_head', {'kernel': teacher['embed_tokens']['embedding'].T})
      draft['lm_head'] = {'kernel': head['kernel'][:, :vocab]}
    params = dict(state.params, language_model=draft)
    # Copies: the state is donated to each step, the target's arrays are not.
    params = jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, jnp.float32, copy=True), s),
                          params, self.state_shardings.params)
    return state.replace(params=params)

  def _adapt_init_params(self, params):
    # An adapter draft may start from a language-only draft: keep its LM, init the projector.
    if isinstance(self.model_config, AdapterDraftConfig) and 'language_model' not in params:
      fresh = nn.unbox(jax.jit(functools.partial(initialize, self.model_config))(
          jax.random.key(self.config.seed)))
      return {'language_model': params, 'multi_modal_projector': fresh['multi_modal_projector']}
    return params

  def run(self) -> TrainState:
    config = self.config
    start_step = self.checkpointer.latest_step()
    iterator = self.data.train_iterator()
    if start_step is None:
      state, start_step = self._initial_state(), 0
    else:
      state, data_state = self.checkpointer.restore(start_step, self.abstract_state)
      iterator.set_state(data_state)
      _log(f'resumed from step {start_step} in {self.checkpointer.directory}')
    _log(f'{config.stage} (preset {config.get("preset", "?")!r}): '
         f'{parameter_count(state.params):,} parameters, mesh {dict(self.mesh.shape)}, '
         f'{config.num_train_steps} steps of {config.batch_size} x {config.data.seq_len} = '
         f'{config.batch_size * config.data.seq_len:,} tokens')
    step_fn = jax.jit(
        functools.partial(train_step, self.objective, self.optimizer, config.num_micro_batches),
        out_shardings=(self.state_shardings, None), donate_argnums=0)
    writer = _summary_writer(self.workdir)
    step, window_start, window_first_step = start_step, time.time(), start_step
    with _Preemption() as preemption, iterator:
      while step < config.num_train_steps:
        batch = _device_batch(next(iterator), self.mesh)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          state, metrics = step_fn(state, batch, self.teacher_params)
        step += 1
        if self.checkpointer.should_save(step):
          self.checkpointer.save(step, state, _data_state(iterator))
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          metrics = jax.device_get(metrics)  # Waits for the step: the window's time is real.
          seconds_per_step = (time.time() - window_start) / (step - window_first_step)
          rate = config.batch_size * config.data.seq_len / seconds_per_step
          eta = seconds_per_step * (config.num_train_steps - step)
          self.history.append((step, float(metrics['loss'])))
          _log(f'step {step}/{config.num_train_steps}  loss {float(metrics["loss"]):.4f}  '
               f'lr {float(self.schedule(step - 1)):.2e}  {rate:,.0f} tokens/s  '
               f'eta {datetime.timedelta(seconds=int(eta))}')
          if writer:
            for name, value in (('loss', metrics['loss']), ('grad_norm', metrics['grad_norm']),
                                ('learning_rate', self.schedule(step - 1)),
                                ('tokens_per_second', rate)):
              writer.scalar(f'train/{name}', float(value), step)
          window_start, window_first_step = time.time(), step
        if config.data.eval_split and (step % config.eval_every_steps == 0
                                       or step == config.num_train_steps):
          self._evaluate(state, step, writer)
          window_start, window_first_step = time.time(), step  # Keep eval out of tokens/s.
        # Every host agrees, so all leave after the same step, which they all save.
        if distributed.any_process(preemption.requested.is_set()):
          _log(f'SIGTERM at step {step}: saving and exiting')
          break
      self.checkpointer.wait()
      if self.checkpointer.latest_step() != step:
        self.checkpointer.save(step, state, _data_state(iterator), force=True)
    self.checkpointer.close()
    if writer:
      writer.flush()
    if step >= config.num_train_steps and config.export:
      self._export(state)
    return state

  def _evaluate(self, state, step, writer):
    total, count = 0.0, 0.0
    with self.data.eval_iterator() as iterator:
      for _ in range(self.config.eval_steps):
        batch = _device_batch(next(iterator), self.mesh)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          loss_sum, tokens = self._eval_fn(state.params, batch, self.teacher_params)
        total, count = total + float(loss_sum), count + float(tokens)
    loss = total / max(count, 1.0)
    _log(f'eval step {step}: held-out loss {loss:.4f}  perplexity {math.exp(min(loss, 50)):.2f}')
    if writer:
      writer.scalar('eval/loss', loss, step)
      writer.scalar('eval/perplexity', math.exp(min(loss, 50)), step)

  def _export(self, state):
    params = distributed.fetch(state.params)  # Every process takes part in the gather.
    if not distributed.is_primary():
      return
    out = os.path.join(self.workdir, EXPORT_SUBDIR)
    if os.path.exists(out):
      shutil.rmtree(out)
    save_converted(out, self.model_config, params, source_dir=self.data.tokenizer_dir)
    message = f'exported {out} (for decode.py and the next stage\'s init_from)'
    # No HF class holds an adapter or a feature draft.
    if not isinstance(self.model_config, (AdapterDraftConfig, FeatureDraftConfig)):
      from mmspec_jax.convert.export import export_to_hf
      hf_dir = os.path.join(self.workdir, HF_EXPORT_SUBDIR)
      export_to_hf(params, self.model_config, hf_dir, tokenizer_dir=self.data.tokenizer_dir)
      message += f' and {hf_dir} (Hugging Face)'
    _log(message)


def _data_state(iterator):
  """Every host's data position, merged: what a checkpoint saves (all processes call this)."""
  return merge_states(distributed.gather_json(iterator.get_state()))


def _fit_adapter_to_target(config: AdapterDraftConfig, target) -> AdapterDraftConfig:
  """The adapter reads the target's vision features and image token: take them from it."""
  if not isinstance(target, LlavaConfig):
    raise ValueError('the adapter draft needs config.target to be a LLaVA model')
  return dataclasses.replace(config, vision_hidden_size=target.vision.hidden_size,
                             image_token_index=target.image_token_index)


def _fit_feature_draft_to_target(config: FeatureDraftConfig, target,
                                 layers: str) -> FeatureDraftConfig:
  """The feature draft at the target's width (heads, MLP, positions: its decoder layer is one
  of the target's shape), reading the target's layers `layers` ('' = EAGLE-3's)."""
  text = text_config(target)
  if config.text.vocab_size > text.vocab_size:
    raise ValueError(f'the feature draft\'s vocabulary ({config.text.vocab_size}) is larger than '
                     f'the target\'s ({text.vocab_size})')
  try:
    chosen = (tuple(int(i) for i in str(layers).split(',')) if str(layers).strip()
              else default_feature_layers(text.num_layers))
  except ValueError:
    raise ValueError(f'config.feature_layers must be comma-separated layer indices, got '
                     f'{layers!r}') from None
  draft_text = dataclasses.replace(text, num_layers=config.text.num_layers,
                                   vocab_size=config.text.vocab_size, tie_word_embeddings=False,
                                   dtype=config.text.dtype, param_dtype=config.text.param_dtype)
  fitted = dataclasses.replace(config, text=draft_text, target_hidden_size=text.hidden_size,
                               feature_layers=chosen)
  fitted.check_target(text)
  return fitted


def text_dims(config):
  text = config if isinstance(config, LlamaConfig) else config.text
  return (text.vocab_size, text.hidden_size, text.num_layers, text.num_heads)


def _summary_writer(workdir):
  if not distributed.is_primary():
    return None
  try:
    from flax.metrics import tensorboard
  except ImportError:  # TensorFlow missing: train without summaries.
    logging.warning('tensorboard is not installed: no TensorBoard summaries (pip install tensorboard)')
    return None
  return tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))


def train_and_evaluate(config, workdir: str) -> TrainState:
  return Trainer(config, workdir).run()
