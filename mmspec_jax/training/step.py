"""The train state and the jitted train/eval steps, for every stage.

Axis legend: A gradient-accumulation micro-batches, B batch, T length, V vocabulary.

Objectives (`task`):
  lm       next-token cross-entropy of a LLaMA draft (pretraining, chat fine-tuning);
  llava    next-token cross-entropy of a whole LLaVA (the target), images through its own tower;
  distill  the draft against the frozen target's logits (KL, TVD, TVD++ or the expected accepted
           length: losses.distillation) plus a weighted CE term;
           the target reads the multimodal sequence, the draft the same text with the image
           placeholders removed, and the target's logits are gathered at the draft's positions;
  adapter  the adapter draft on multimodal batches, fed the frozen target's vision features;
  feature  the feature draft (EAGLE-3 style) on the frozen target's layer outputs, toward the
           target's distributions as distill, at every position and, unrolled `unroll_steps`
           positions past the target's features on its own hidden states (training-time test),
           at each of those too; equal weights.
Frozen models (the target) are a separate argument, never part of the optimized state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmspec_jax import sharding
from mmspec_jax.models import Llava, abstract_params
from mmspec_jax.training import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any


def create_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def state_shardings(model_config, optimizer: optax.GradientTransformation, mesh, rules):
  """(shardings, abstract state with those shardings) of a model's train state.

  Parameters carry logical axis names; the optimizer's moments mirror the parameters and inherit
  them, so both are sharded by the same rules.
  """
  boxed = abstract_params(model_config)
  abstract = jax.eval_shape(lambda params: create_state(params, optimizer), boxed)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  return shardings, sharding.placed_structs(nn.unbox(abstract), shardings)


def text_positions_first(tokens: jax.Array, image_token: int) -> jax.Array:
  """int32[B, T] gather order that moves image placeholders after the text, text kept in order:
  the language-only draft's view of a multimodal sequence."""
  return jnp.argsort(tokens == image_token, axis=1, stable=True)


TASKS = ('lm', 'llava', 'distill', 'adapter', 'feature')


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a stage optimizes; hashable, so it can be closed over by jit."""
  model: nn.Module  # The trained model: Llama, AdapterDraft, FeatureDraft or (llava) Llava.
  task: str = 'lm'  # One of TASKS.
  teacher: nn.Module | None = None  # The frozen target (Llava or Llama), if the task has one.
  distill_kind: str = 'kl'  # One of losses.OBJECTIVES.
  # distill (and adapter, when > 0): loss = w * distillation + (1 - w) * cross-entropy.
  distill_weight: float = 1.0
  distill_gamma: int = 5  # The block length of the 'acceptance' objective.
  unroll_steps: int = 0  # feature: positions drafted past the target's features in training.

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'unknown task {self.task!r}; expected one of {TASKS}')
    if self.unroll_steps < 0:
      raise ValueError(f'unroll_steps must be >= 0, got {self.unroll_steps}')
    if self.task in ('distill', 'adapter', 'feature') and self.teacher is None:
      raise ValueError(f'task {self.task!r} needs the target model')
    if self.distill_kind not in losses.OBJECTIVES:
      raise ValueError(f'unknown distill_kind {self.distill_kind!r}; expected one of '
                       f'{losses.OBJECTIVES}')
    if not 0.0 <= self.distill_weight <= 1.0:
      raise ValueError(f'distill_weight must be in [0, 1], got {self.distill_weight}')

  def loss(self, params, batch: dict[str, jax.Array], frozen: Any):
    """(sum of per-token losses, number of counted tokens) over one micro-batch."""
    if self.task == 'lm':
      logits = self.model.apply({'params': params}, batch['inputs'],
                                positions=batch.get('positions'),
                                segment_ids=batch.get('segment_ids'))
      return losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])
    if self.task == 'llava':
      logits = self.model.apply({'params': params}, batch['inputs'], batch['images'])
      return losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])
    if self.task == 'adapter':
      features = self.teacher.apply({'params': frozen}, batch['images'],
                                    method=Llava.encode_image)
      logits = self.model.apply({'params': params}, batch['inputs'],
                                jax.lax.stop_gradient(features))
      if not self.distill_weight:
        return losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])
      # The adapter draft reads the target's very sequence (its placeholders filled by its own
      # projector), so the teacher's logits line up position for position.
      teacher_logits = self.teacher.apply({'params': frozen}, batch['inputs'], batch['images'])
      return self._mixed(logits, teacher_logits, batch['targets'], batch['loss_mask'])
    if self.task == 'feature':
      return self._feature_loss(params, batch, frozen)
    return self._distill_loss(params, batch, frozen)

  def _feature_loss(self, params, batch, frozen):
    inputs, layers = batch['inputs'], self.model.config.feature_layers
    if isinstance(self.teacher, Llava):
      teacher_logits, features = self.teacher.apply({'params': frozen}, inputs, layers,
                                                    batch.get('images'),
                                                    method=Llava.forward_with_features)
    else:
      teacher_logits, features = self.teacher.apply({'params': frozen}, inputs, layers,
                                                    method='forward_with_features')
    # Draft position i reads the target's features at i and token i + 1, and predicts token
    # i + 2: the target's prediction at i + 1.
    streams = self.model.apply({'params': params}, inputs[:, 1:],
                               jax.lax.stop_gradient(features[:, :-1]), self.unroll_steps,
                               method='unroll')
    teacher_logits = jax.lax.stop_gradient(teacher_logits[:, 1:])
    targets, mask = batch['targets'][:, 1:], batch['loss_mask'][:, 1:]
    total, count = jnp.zeros(()), jnp.zeros(())
    for step, logits in enumerate(streams):  # Stream s's first s positions have no anchor.
      anchored = mask * (jnp.arange(mask.shape[1]) >= step)[None].astype(mask.dtype)
      loss, tokens = self._mixed(logits, teacher_logits, targets, anchored)
      total, count = total + loss, count + tokens
    return total, count

  def _mixed(self, logits, teacher_logits, targets, mask):
    kd_sum, count = losses.distillation(logits, teacher_logits, mask, self.distill_kind,
                                        gamma=self.distill_gamma)
    ce_sum, _ = losses.cross_entropy(logits, targets, mask)
    weight = self.distill_weight
    return weight * kd_sum + (1 - weight) * ce_sum, count

  def _distill_loss(self, params, batch, frozen):
    inputs = batch['inputs']
    if isinstance(self.teacher, Llava):
      teacher_logits = self.teacher.apply({'params': frozen}, inputs, batch.get('images'))
      order = text_positions_first(inputs, self.teacher.config.image_token_index)
    else:
      teacher_logits = self.teacher.apply({'params': frozen}, inputs)
      order = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    # Image positions carry no loss, so moving them to the end leaves the mask on text only.
    student_inputs, targets, mask = take(inputs), take(batch['targets']), take(batch['loss_mask'])
    teacher_logits = jnp.take_along_axis(teacher_logits, order[..., None], axis=1)
    logits = self.model.apply({'params': params}, student_inputs)
    return self._mixed(logits, teacher_logits, targets, mask)


def _split_micro_batches(batch, num_micro_batches: int):
  def split(x):
    if x.shape[0] % num_micro_batches:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into {num_micro_batches} '
                       'micro-batches')
    return x.reshape(num_micro_batches, x.shape[0] // num_micro_batches, *x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(objective: Objective, optimizer: optax.GradientTransformation,
               num_micro_batches: int, state: TrainState, batch, frozen=None):
  """One optimizer update from a global batch split into `num_micro_batches`.

  Gradients of the summed loss are accumulated over micro-batches and divided by the total token
  count, so the update equals that of one batch of the same rows (up to float rounding).
  Returns (new state, metrics).
  """
  micro_batches = _split_micro_batches(batch, num_micro_batches)
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

  def accumulate(carry, micro_batch):
    grads_sum, loss_sum, count = carry
    (loss, tokens), grads = grad_fn(state.params, micro_batch, frozen)
    return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count + tokens), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, loss_sum, count), _ = jax.lax.scan(
      accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), micro_batches)
  denominator = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss_sum / denominator, 'tokens': count,
             'grad_norm': optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(objective: Objective, params, batch, frozen=None):
  """(loss sum, token count) of a batch, for held-out loss and perplexity."""
  return objective.loss(params, batch, frozen)
