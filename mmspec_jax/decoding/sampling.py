"""Logit processing: the distribution a token is actually sampled from.

Speculative sampling is exact only if the target's p and the draft's q are the distributions the
tokens were really drawn from, after temperature, top-k and top-p, processed the same way for
both. Everything that samples or scores a token goes through `probabilities` below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f'top_k must be an integer >= 0 (0 = off), got {self.top_k!r}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def processed_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """float32[..., V] logits after temperature, top-k and top-p (filtered entries are -inf)."""
  x = logits.astype(jnp.float32) / sampling.temperature
  vocab = x.shape[-1]
  if 0 < sampling.top_k < vocab:
    kth_largest = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
    x = jnp.where(x < kth_largest, -jnp.inf, x)
  if sampling.top_p < 1:
    # Keep the most likely tokens until their mass reaches top_p: a token is kept when the mass
    # of the tokens strictly more likely than it is still below top_p (the first always is).
    descending = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def probabilities(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """float32[..., V]: the sampling distribution (for greedy, one-hot on the argmax)."""
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(processed_logits(logits, sampling), axis=-1)


def sample_from(rng: jax.Array, probs: jax.Array) -> jax.Array:
  """int32[...] tokens drawn from float32[..., V] probabilities."""
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def sample(rng: jax.Array, logits: jax.Array, sampling: SamplingConfig):
  """(int32[...] tokens, float32[..., V] the distribution they were drawn from)."""
  probs = probabilities(logits, sampling)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), probs
  return sample_from(rng, probs), probs


def pad_vocabulary(logits: jax.Array, vocab_size: int) -> jax.Array:
  """Pads a draft's float[..., Vd] logits to the target's Vd <= V with -inf: the draft gives the
  ids it does not have zero probability and can never draft them."""
  missing = vocab_size - logits.shape[-1]
  if missing < 0:
    raise ValueError(f'draft vocabulary ({logits.shape[-1]}) is larger than the target\'s '
                     f'({vocab_size})')
  if missing == 0:
    return logits
  pad = jnp.full(logits.shape[:-1] + (missing,), -jnp.inf, logits.dtype)
  return jnp.concatenate([logits, pad], axis=-1)
