"""Logit processing: the distribution a token is actually sampled from.

Speculative sampling is exact only if the target's p and the draft's q are the distributions the
tokens were really drawn from, after temperature, top-k and top-p, processed the same way for
both. Everything that samples or scores a token goes through `probabilities` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


# Temperatures below this decode greedily: dividing logits by ~1e-6 overflows float32 (inf - inf
# is NaN in the softmax), and at such temperatures sampling is the argmax anyway.
MIN_TEMPERATURE = 1e-5
# Far past any useful setting (OpenAI's range ends at 2); logits divided by more underflow toward a
# uniform distribution, and an infinite one gives NaN.
MAX_TEMPERATURE = 100.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 (or below MIN_TEMPERATURE) means greedy (argmax); top_k 0 and top_p 1 switch
  those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not 0 <= self.temperature <= MAX_TEMPERATURE:
      raise ValueError(f'temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got '
                       f'{self.temperature}')
    if not (isinstance(self.top_k, int) and 0 <= self.top_k < 2 ** 31):
      raise ValueError(f'top_k must be an integer in [0, 2**31) (0 = off), got {self.top_k!r}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')

  @property
  def greedy(self) -> bool:
    return self.temperature < MIN_TEMPERATURE


def _keep_ranked(x: jax.Array, order: jax.Array, keep_ranks: jax.Array) -> jax.Array:
  """x with every entry -inf but those whose rank (position in `order`) is in `keep_ranks`.
  order: int32[..., K] token ids by rank; keep_ranks: bool[..., K]."""
  keep = jnp.zeros(x.shape, bool)
  keep = jnp.put_along_axis(keep, order, keep_ranks, axis=-1, inplace=False)
  return jnp.where(keep, x, -jnp.inf)


def processed_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """float32[..., V] logits after temperature, top-k and top-p (filtered entries are -inf).

  Both filters keep tokens by rank, ties broken by the lower id (XLA's top-k and a stable sort):
  top-k keeps exactly k tokens even when the k-th value is tied.
  """
  x = logits.astype(jnp.float32) / sampling.temperature
  vocab = x.shape[-1]
  if 0 < sampling.top_k < vocab:
    _, top = jax.lax.top_k(x, sampling.top_k)  # [..., k] ids, ties by index
    x = _keep_ranked(x, top, jnp.ones(top.shape, bool))
  if sampling.top_p < 1:
    # Keep the most likely tokens until their mass reaches top_p: a token is kept when the mass
    # of the tokens ranked before it is still below top_p (the first always is).
    order = jnp.argsort(-x, axis=-1, stable=True)  # [..., V] ids by rank, ties by index
    probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    x = _keep_ranked(x, order, mass_before < sampling.top_p)
  return x


@flax.struct.dataclass
class RowSampling:
  """Each row's own sampling settings, so that greedy and sampled requests share a batch
  (continuous batching). Same meanings as SamplingConfig's, one entry per row."""
  temperature: jax.Array  # float32[B]: below MIN_TEMPERATURE, greedy
  top_k: jax.Array  # int32[B]: 0 off
  top_p: jax.Array  # float32[B]: 1 off

  @classmethod
  def of(cls, configs: Sequence[SamplingConfig]) -> RowSampling:
    """Host arrays for one SamplingConfig per row."""
    return cls(temperature=np.array([c.temperature for c in configs], np.float32),
               top_k=np.array([c.top_k for c in configs], np.int32),
               top_p=np.array([c.top_p for c in configs], np.float32))

  @property
  def greedy(self) -> jax.Array:
    """bool[B]."""
    return self.temperature < MIN_TEMPERATURE


def _per_row(values: jax.Array, ndim: int) -> jax.Array:
  """values[B] shaped to broadcast against an array of `ndim` dims led by B."""
  return values.reshape(values.shape + (1,) * (ndim - 1))


def _filter_by_rank(x: jax.Array, rows: RowSampling) -> jax.Array:
  """float32[B, ..., V] with each row's top-k and top-p applied (as processed_logits does for
  one setting: top-k first, then top-p over what top-k kept; ties by the lower id)."""
  vocab = x.shape[-1]
  order = jnp.argsort(-x, axis=-1, stable=True)  # [B, ..., V] ids by rank
  ranked = jnp.take_along_axis(x, order, axis=-1)
  top_k = _per_row(jnp.where(rows.top_k > 0, rows.top_k, vocab), x.ndim)
  keep = jnp.arange(vocab) < top_k
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # A row without top-p keeps its whole tail even where the float32 mass rounds to 1 early.
  top_p = rows.top_p
  keep = keep & ((mass_before < _per_row(top_p, x.ndim)) | _per_row(top_p >= 1, x.ndim))
  return _keep_ranked(x, order, keep)


def row_probabilities(logits: jax.Array, rows: RowSampling) -> jax.Array:
  """float32[B, ..., V]: row b's sampling distribution under its own settings (one-hot on the
  argmax for a greedy row). The sort that top-k and top-p need runs only when a row uses them."""
  greedy = rows.greedy
  x = logits.astype(jnp.float32) / _per_row(jnp.where(greedy, 1.0, rows.temperature),
                                            logits.ndim)
  filters_on = jnp.any(((rows.top_k > 0) & (rows.top_k < x.shape[-1])) | (rows.top_p < 1))
  x = jax.lax.cond(filters_on, _filter_by_rank, lambda x, _: x, x, rows)
  one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where(_per_row(greedy, logits.ndim), one_hot, jax.nn.softmax(x, axis=-1))


def probabilities(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """float32[..., V]: the sampling distribution (for greedy, one-hot on the argmax)."""
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(processed_logits(logits, sampling), axis=-1)


def sample_from(rng: jax.Array, probs: jax.Array) -> jax.Array:
  """int32[...] tokens drawn from float32[..., V] probabilities.

  `rng` is one key for all draws, or a key per leading entry (key[B] for float32[B, ..., V]):
  then row b's draw depends on its own key only, never on the batch it is in.
  """
  if rng.ndim:
    return jax.vmap(sample_from)(rng, probs)
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def uniform(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """float32[*rng.shape, *shape] uniform draws, each key's from that key alone."""
  if rng.ndim:
    return jax.vmap(lambda key: uniform(key, shape))(rng)
  return jax.random.uniform(rng, shape)


def split(rng: jax.Array, num: int) -> jax.Array:
  """key[*rng.shape, num]: each key split into `num` (per row for a key per row)."""
  if rng.ndim:
    return jax.vmap(lambda key: split(key, num))(rng)
  return jax.random.split(rng, num)


def row_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """key[B]: one key per row. A key per row is used as given; a single key gives row b
  `fold_in(rng, b)` (then a row's stream depends on its index in the batch)."""
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # Raw uint32 keys.
  if rng.ndim == 0:
    return jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(batch_size))
  if rng.shape != (batch_size,):
    raise ValueError(f'rng must be one key or one key per row ({batch_size}), got shape '
                     f'{rng.shape}')
  return rng


def sample(rng: jax.Array, logits: jax.Array, sampling: SamplingConfig):
  """(int32[...] tokens, float32[..., V] the distribution they were drawn from); `rng` as in
  `sample_from`."""
  probs = probabilities(logits, sampling)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), probs
  return sample_from(rng, probs), probs


def sample_rows(rng: jax.Array, logits: jax.Array, rows: RowSampling):
  """`sample` under each row's own settings: (int32[B, ...], float32[B, ..., V]); rng key[B]."""
  probs = row_probabilities(logits, rows)
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.where(_per_row(rows.greedy, argmax.ndim), argmax, sample_from(rng, probs)), probs


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
