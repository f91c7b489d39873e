"""Losses over masked token positions. Each returns (sum over positions, number of positions), so
gradient accumulation and data parallelism can average over all tokens of the global batch.

Axis legend: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmspec_jax.models.llama import in_vocabulary


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Next-token loss. logits float[B, T, V]; targets int32[B, T]; mask float[B, T].

  Targets the model does not have (a 32000-id draft's <image> 32000 and <pad> 32001) carry no
  loss and are never gathered: an out-of-range gather would fill NaN, and 0 * NaN is NaN.
  """
  valid = in_vocabulary(targets, logits.shape[-1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_log_probs = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None],
                                        axis=-1)[..., 0]
  mask = jnp.where(valid, mask.astype(jnp.float32), 0.0)
  return -jnp.sum(token_log_probs * mask), jnp.sum(mask)


def distillation(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                 kind: str = 'kl', temperature: float = 1.0):
  """Knowledge distillation from the target: `kl` is KL(teacher || student); `tvd` the total
  variation distance, the quantity speculative acceptance depends on (1 - TVD = acceptance rate).

  The teacher's vocabulary may be larger (LLaVA pads 32000 to 32064); the draft cannot emit the
  extra ids, so the teacher is renormalized over the student's vocabulary.
  """
  vocab = student_logits.shape[-1]
  teacher = jax.nn.softmax(teacher_logits[..., :vocab].astype(jnp.float32) / temperature, -1)
  teacher = jax.lax.stop_gradient(teacher)
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  if kind == 'kl':
    per_token = jnp.sum(teacher * (jnp.log(teacher + 1e-30) - student_log_probs), axis=-1)
  elif kind == 'tvd':
    per_token = 0.5 * jnp.sum(jnp.abs(teacher - jnp.exp(student_log_probs)), axis=-1)
  else:
    raise ValueError(f"unknown distillation loss {kind!r}; expected 'kl' or 'tvd'")
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask), jnp.sum(mask)
