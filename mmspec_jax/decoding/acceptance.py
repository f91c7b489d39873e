"""Verification: how many draft tokens each row accepts, and the token the target adds.

Axis legend: B batch, G draft tokens (gamma), V vocabulary. Every row accepts its own number of
tokens; nothing here couples rows (advancing by the batch minimum biases sampled rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmspec_jax.decoding.sampling import sample_from, split, uniform


def leading_true_count(flags: jax.Array) -> jax.Array:
  """int32[B]: how many leading entries of bool[B, G] are True."""
  return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=1), axis=1)


def greedy_accept(draft_tokens: jax.Array, target_logits: jax.Array):
  """Greedy verification (Leviathan et al.): accept while the draft equals the target argmax.

  draft_tokens: int32[B, G]; target_logits: float[B, G + 1, V] at the G + 1 verified positions.
  Returns (int32[B] accepted count n, int32[B, G + 1] emitted tokens, of which the first n + 1
  count: the accepted drafts, then the target's own token at position n).
  """
  choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, G + 1]
  num_accepted = leading_true_count(draft_tokens == choice[:, :-1])
  # Accepted drafts equal the target's choices, so the target's row is the emitted row.
  return num_accepted, choice


def speculative_accept(rng: jax.Array, draft_tokens: jax.Array, draft_probs: jax.Array,
                       target_probs: jax.Array):
  """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

  Accept draft token x at position i with probability min(1, p_i(x) / q_i(x)); at the first
  rejection n, draw from normalize(max(0, p_n - q_n)); if all G are accepted, draw a bonus token
  from p_G. The emitted tokens are then distributed exactly as the target's.

  rng: one key, or a key per row (key[B]: each row's draws from its own key alone).
  draft_tokens: int32[B, G] drawn from draft_probs float32[B, G, V] (q); target_probs
  float32[B, G + 1, V] (p). Returns (int32[B] n, int32[B, G + 1] emitted, first n + 1 valid).
  """
  batch, num_draft = draft_tokens.shape
  rng = split(rng, 2)
  accept_rng, residual_rng = rng[..., 0], rng[..., 1]
  p_draft = jnp.take_along_axis(target_probs[:, :num_draft], draft_tokens[..., None], -1)[..., 0]
  q_draft = jnp.take_along_axis(draft_probs, draft_tokens[..., None], -1)[..., 0]  # [B, G]
  draws = uniform(accept_rng, (num_draft,) if accept_rng.ndim else (batch, num_draft))
  num_accepted = leading_true_count(draws * q_draft < p_draft)  # u < p / q, without dividing

  # q at position G is zero, so the residual there is p itself: the bonus token.
  q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(target_probs[:, :1])], axis=1)
  p_at_n = jnp.take_along_axis(target_probs, num_accepted[:, None, None], axis=1)[:, 0]
  q_at_n = jnp.take_along_axis(q_padded, num_accepted[:, None, None], axis=1)[:, 0]  # [B, V]
  residual = jnp.maximum(p_at_n - q_at_n, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  # A rejection implies p(x) < q(x), hence positive residual mass; guard rounding anyway.
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_at_n)
  next_token = sample_from(residual_rng, residual)  # [B]

  positions = jnp.arange(num_draft + 1)[None, :]
  drafts = jnp.concatenate([draft_tokens, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  emitted = jnp.where(positions < num_accepted[:, None], drafts, next_token[:, None])
  return num_accepted, emitted
