"""Losses over masked token positions. Each returns (sum over positions, number of positions), so
gradient accumulation and data parallelism can average over all tokens of the global batch.

Axis legend: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmspec_jax.models.llama import in_vocabulary

# Distillation objectives (see distillation()).
OBJECTIVES = ('kl', 'tvd', 'tvd++', 'acceptance')


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


def _distributions(student_logits, teacher_logits, temperature):
  vocab = student_logits.shape[-1]
  teacher = jax.nn.softmax(teacher_logits[..., :vocab].astype(jnp.float32) / temperature, -1)
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  return jax.lax.stop_gradient(teacher), student_log_probs


def _expected_accepted(alpha, mask, gamma: int):
  """float32[B, T]: the expected accepted tokens of a block of gamma drafts starting at each
  position, sum_{k=1..gamma} prod_{j<k} alpha[t + j], the chain cut where the mask is 0."""
  alpha = alpha * mask
  total = jnp.zeros_like(alpha)
  running = jnp.ones_like(alpha)
  for k in range(gamma):
    shifted = jnp.pad(alpha[:, k:], ((0, 0), (0, k)))  # alpha[t + k], 0 past the row's end
    running = running * shifted
    total = total + running
  return total


def distillation(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                 kind: str = 'kl', temperature: float = 1.0, gamma: int = 5):
  """Knowledge distillation toward the target; (sum over positions, number of positions).

  kind:
    kl          KL(teacher || student).
    tvd         the total variation distance; 1 - TVD is the acceptance rate at a position.
    tvd++       TVD's gradient as a policy gradient with its reward normalized over the batch
                (Goel et al., arXiv 2403.00858): the draft's token x at a position is rewarded
                r(x) = 1[p(x) > q(x)] (accepting more of it raises acceptance), and
                r' = (r - mean) / std over every position and token of the batch, weighted by q.
                Computed over the whole vocabulary rather than sampled, the mean cancels (the
                draft's probabilities sum to 1), so what remains is the TVD gradient scaled by
                1 / std: a step size set by how far apart the two distributions are. Its value
                is the TVD's.
    acceptance  the expected accepted length: at each position t, the tokens a block of gamma
                drafts starting there keeps, sum_{k=1..gamma} prod_{j<k} alpha[t + j], with
                alpha = 1 - TVD ("LK losses", arXiv 2602.23881, optimize acceptance directly);
                the loss is gamma minus it. A rejection early in a block costs what follows.

  The teacher's vocabulary may be larger (LLaVA pads 32000 to 32064); the draft cannot emit the
  extra ids, so the teacher is renormalized over the student's vocabulary.
  """
  mask = mask.astype(jnp.float32)
  teacher, student_log_probs = _distributions(student_logits, teacher_logits, temperature)
  student = jnp.exp(student_log_probs)
  if kind == 'kl':
    per_token = jnp.sum(teacher * (jnp.log(teacher + 1e-30) - student_log_probs), axis=-1)
  elif kind == 'tvd':
    per_token = 0.5 * jnp.sum(jnp.abs(teacher - student), axis=-1)
  elif kind == 'tvd++':
    reward = jax.lax.stop_gradient((teacher > student).astype(jnp.float32))
    weight = jax.lax.stop_gradient(student) * mask[..., None]
    count = jnp.maximum(jnp.sum(weight), 1e-9)
    mean = jnp.sum(weight * reward) / count
    std = jnp.sqrt(jnp.sum(weight * (reward - mean) ** 2) / count + 1e-6)
    # d/dq of -sum_x q(x) r'(x) is -r': the policy gradient of the normalized reward. Its value
    # is replaced by the TVD's (the surrogate's own value means nothing), so the loss logged
    # is comparable across objectives.
    surrogate = -jnp.sum(student * jax.lax.stop_gradient((reward - mean) / std), axis=-1)
    tvd = 0.5 * jnp.sum(jnp.abs(teacher - jax.lax.stop_gradient(student)), axis=-1)
    per_token = tvd + surrogate - jax.lax.stop_gradient(surrogate)
  elif kind == 'acceptance':
    alpha = jnp.sum(jnp.minimum(teacher, student), axis=-1)
    per_token = gamma - _expected_accepted(alpha, mask, gamma)
  else:
    raise ValueError(f'unknown distillation objective {kind!r}; expected one of {OBJECTIVES}')
  return jnp.sum(per_token * mask), jnp.sum(mask)
