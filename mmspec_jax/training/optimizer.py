"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay masked off
norms and biases; optionally only some parameters trained (the others frozen)."""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import traverse_util

NO_DECAY_NAMES = ('scale', 'bias')  # Norm scales and biases.


def learning_rate_schedule(config) -> optax.Schedule:
  """config: learning_rate, warmup_steps, num_train_steps, end_learning_rate_factor."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=max(1, config.warmup_steps),
      decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.end_learning_rate_factor)


def decay_mask(params):
  """True where weight decay applies: every parameter except norm scales and biases."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: path[-1] not in NO_DECAY_NAMES for path in flat})


def trainable_mask(params, trainable: Callable[[tuple[str, ...]], bool]):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: bool(trainable(path)) for path in flat})


def make_optimizer(config, trainable: Callable[[tuple[str, ...]], bool] | None = None
                   ) -> optax.GradientTransformation:
  """config: learning_rate, warmup_steps, num_train_steps, end_learning_rate_factor, adam_b1,
  adam_b2, adam_eps, weight_decay, max_grad_norm. `trainable(path)` freezes the parameters it
  rejects: they get no update and no optimizer state beyond a placeholder."""
  adamw = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                  eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask))
  if trainable is None:
    return adamw
  labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'freeze',
                                       trainable_mask(params, trainable))
  return optax.multi_transform({'train': adamw, 'freeze': optax.set_to_zero()}, labels)
