"""The train step: accumulation equals one big batch, loss falls, frozen parts stay frozen."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import decoding_fixtures as fx
from mmspec_jax.models import build, init_params, presets
from mmspec_jax.training import losses
from mmspec_jax.training.optimizer import make_optimizer
from mmspec_jax.training.step import Objective, create_state, train_step


def optimizer_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=2, num_train_steps=40, end_learning_rate_factor=0.1,
      adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1, max_grad_norm=1.0))
  config.update(overrides)
  return config


def lm_batch(rng, rows=8, length=16, vocab=32):
  """A learnable toy language: each row counts up by a row-specific stride."""
  starts = rng.randint(0, vocab, (rows, 1))
  strides = rng.randint(1, 4, (rows, 1))
  sequence = (starts + strides * np.arange(length + 1)) % vocab
  return {'inputs': sequence[:, :-1].astype(np.int32),
          'targets': sequence[:, 1:].astype(np.int32),
          'loss_mask': (rng.rand(rows, length) > 0.2).astype(np.float32)}


@pytest.fixture(scope='module')
def lm():
  config = presets.get('tiny_llama')
  return Objective(build(config)), init_params(config, jax.random.key(0))


def test_gradient_accumulation_equals_one_big_batch(lm):
  objective, params = lm
  optimizer = make_optimizer(optimizer_config())
  rng = np.random.RandomState(0)
  batches = [lm_batch(rng) for _ in range(3)]  # Three updates: the first has warmup lr 0.

  def run(num_micro_batches, take=slice(None)):
    step = jax.jit(functools.partial(train_step, objective, optimizer, num_micro_batches))
    state, losses_seen = create_state(params, optimizer), []
    for batch in batches:
      state, metrics = step(state, jax.tree.map(lambda x: x[take], batch))
      losses_seen.append(float(metrics['loss']))
    return state.params, losses_seen

  whole, whole_losses = run(1)
  accumulated, accumulated_losses = run(4)
  np.testing.assert_allclose(whole_losses, accumulated_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               whole, accumulated)
  # Controls: training moved the parameters, and a quarter of the batch moves them elsewhere.
  first = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
  assert np.abs(first(whole) - first(params)).max() > 1e-4
  quarter, _ = run(1, take=slice(0, 2))
  assert np.abs(first(quarter) - first(whole)).max() > 1e-4


def test_loss_falls_well_below_its_start(lm):
  objective, params = lm
  optimizer = make_optimizer(optimizer_config(learning_rate=1e-2, num_train_steps=60))
  step = jax.jit(functools.partial(train_step, objective, optimizer, 1), donate_argnums=0)
  state = create_state(params, optimizer)
  rng = np.random.RandomState(1)
  curve = []
  for _ in range(60):
    state, metrics = step(state, lm_batch(rng))
    curve.append(float(metrics['loss']))
  print('loss', [round(x, 2) for x in curve[::5]])
  assert curve[0] > 5.0  # About log(256) at the start.
  assert np.mean(curve[-5:]) < 0.3 * curve[0]


@pytest.mark.parametrize('distill_weight', [0.0, 0.5])
def test_adapter_stage1_updates_only_the_adapter(distill_weight):
  target_config, target_params = fx.llava_target()
  config, params = fx.adapter_draft(target_config, target_params)
  objective = Objective(build(config), task='adapter', teacher=build(target_config),
                        distill_kind='tvd', distill_weight=distill_weight)
  optimizer = make_optimizer(optimizer_config(), trainable=lambda path: path[0] ==
                             'multi_modal_projector')
  tokens, lengths, images = fx.ragged_batch(target_config)
  targets = np.roll(tokens, -1, axis=1)
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None] - 1).astype(np.float32)
  batch = {'inputs': tokens, 'targets': targets, 'loss_mask': mask, 'images': images}
  step = jax.jit(functools.partial(train_step, objective, optimizer, 1))
  state = create_state(params, optimizer)
  for _ in range(2):  # The first update has warmup learning rate 0.
    state, metrics = step(state, batch, target_params)
  assert np.isfinite(float(metrics['loss']))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         params, state.params)
  assert all(jax.tree.leaves(changed['multi_modal_projector']))
  assert not any(jax.tree.leaves(changed['language_model']))


def test_adapter_draft_distills_toward_the_target():
  # Stage 2 with distillation: the adapter draft reads the target's own sequence, images
  # through its projector, and its TVD to the target falls.
  target_config, target_params = fx.llava_target()
  config, params = fx.adapter_draft(target_config, target_params, noise=0.5)
  objective = Objective(build(config), task='adapter', teacher=build(target_config),
                        distill_kind='tvd', distill_weight=1.0)
  tokens, lengths, images = fx.ragged_batch(target_config)
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None] - 1).astype(np.float32)
  batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, axis=1), 'loss_mask': mask,
           'images': images}
  optimizer = make_optimizer(optimizer_config(learning_rate=1e-2))
  step = jax.jit(functools.partial(train_step, objective, optimizer, 1), donate_argnums=0)
  state = create_state(params, optimizer)
  curve = []
  for _ in range(15):
    state, metrics = step(state, batch, target_params)
    curve.append(float(metrics['loss']))
  assert curve[-1] < 0.7 * curve[0]


def test_distillation_losses():
  teacher = jnp.log(jnp.array([[[0.7, 0.2, 0.1, 0.0]]]) + 1e-9)  # V = 4 (padded teacher)
  student = jnp.log(jnp.array([[[0.7, 0.2, 0.1]]]))  # V = 3
  mask = jnp.ones((1, 1))
  for kind in ('kl', 'tvd'):
    total, count = losses.distillation(student, teacher, mask, kind)
    assert count == 1 and abs(float(total)) < 1e-5  # Identical distributions: zero loss.
  uniform = jnp.zeros((1, 1, 3))
  total, _ = losses.distillation(uniform, teacher, mask, 'tvd')
  np.testing.assert_allclose(total, 0.5 * (abs(0.7 - 1 / 3) + abs(0.2 - 1 / 3) + abs(0.1 - 1 / 3)),
                             rtol=1e-4)
  with pytest.raises(ValueError, match='unknown distillation objective'):
    losses.distillation(student, teacher, mask, 'js')


def test_tvd_plus_plus_is_the_tvd_gradient_rescaled_by_the_reward_std():
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 5, 8)) * 2, jnp.float32)
  mask = jnp.asarray(rng.random((2, 5)) > 0.3, jnp.float32)
  value = lambda kind: losses.distillation(student, teacher, mask, kind)[0]
  grad = lambda kind: jax.grad(lambda s: losses.distillation(s, teacher, mask, kind)[0])(student)
  np.testing.assert_allclose(value('tvd++'), value('tvd'), rtol=1e-6)  # Logged as the TVD.
  tvd, plus = np.asarray(grad('tvd')).ravel(), np.asarray(grad('tvd++')).ravel()
  ratio = plus @ tvd / (tvd @ tvd)
  assert ratio > 1  # 1 / std of a 0/1 reward (std <= 0.5): larger steps than TVD's.
  np.testing.assert_allclose(plus, ratio * tvd, atol=1e-5)


def test_acceptance_objective_is_gamma_minus_the_expected_accepted_block():
  rng = np.random.default_rng(1)
  student = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  mask = np.ones((2, 6), np.float32)
  mask[1, 3] = 0  # Cuts row 1's chains at position 3.
  p, q = jax.nn.softmax(teacher), jax.nn.softmax(student)
  alpha = np.asarray(jnp.sum(jnp.minimum(p, q), -1)) * mask
  gamma, expected = 3, 0.0
  for b in range(2):
    for t in range(6):
      if mask[b, t]:
        run, accepted = 1.0, 0.0
        for k in range(gamma):
          run *= alpha[b, t + k] if t + k < 6 else 0.0
          accepted += run
        expected += gamma - accepted
  total, count = losses.distillation(student, teacher, jnp.asarray(mask), 'acceptance',
                                     gamma=gamma)
  assert count == mask.sum()
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  same, _ = losses.distillation(teacher, teacher, jnp.ones((2, 6)), 'acceptance', gamma=1)
  np.testing.assert_allclose(same, 0.0, atol=1e-5)  # alpha = 1 everywhere: nothing lost.


@pytest.mark.parametrize('kind', losses.OBJECTIVES)
def test_distill_objective_trains_the_language_only_draft(kind):
  target_config, target_params = fx.llava_target()
  draft_config, draft_params = fx.language_draft(target_config, target_params, noise=0.5)
  objective = Objective(build(draft_config), task='distill', teacher=build(target_config),
                        distill_kind=kind, distill_weight=1.0)
  tokens, lengths, images = fx.ragged_batch(target_config)
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None] - 1).astype(np.float32)
  mask[tokens == target_config.image_token_index] = 0
  batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, axis=1), 'loss_mask': mask,
           'images': images}
  optimizer = make_optimizer(optimizer_config(learning_rate=1e-2))
  step = jax.jit(functools.partial(train_step, objective, optimizer, 1), donate_argnums=0)
  state = create_state(draft_params, optimizer)
  # Whatever the objective, the quantity speculative decoding pays for is the TVD to the
  # target: its mean over the batch's positions (1 - the acceptance rate).
  tvd = jax.jit(lambda params: dataclasses.replace(objective, distill_kind='tvd').loss(
      params, batch, target_params))
  mean_tvd = lambda params: float(jnp.divide(*tvd(params)))
  before = mean_tvd(draft_params)
  curve = []
  for _ in range(15):
    state, metrics = step(state, batch, target_params)
    curve.append(float(metrics['loss']))
  assert curve[-1] < curve[0]
  assert mean_tvd(state.params) < 0.7 * before
