"""Drafting with the feature draft (models/feature_draft.py): the engine's pieces that differ.

Axis legend: B batch, T prompt length, G draft tokens per step (gamma), K the target layers the
draft reads, Dt the target's width, D the draft's, V the target's vocabulary.

The draft's position i reads the target's features at i and the token at i + 1, so it can hold
exactly what the target cache holds. Cache invariant between steps, for a row whose context is
c_0 .. c_{m-1} (the target cache holding c_0 .. c_{m-2}, `last_token` = c_{m-1}):
  the draft cache holds positions 0 .. m - 2 - P, and the P = `pending_count` positions after it
  are pending: their target features (`pending_features`, from the last verification or the
  prefill) and next tokens (`pending_tokens`) wait in the state.
A step feeds the pending positions to the draft in one extend (P varies by row: 1 + the drafts the
row accepted), drafts G tokens from there on its own hidden states (EAGLE's recurrence: the draft's
output at a position stands in for the target's features there), and the target verifies
[last_token, drafts] with `extend_with_features`, which gives the features of the next step's
pending positions: those of last_token and of the accepted drafts, each beside the token the row
kept after it. The drafted positions' cache entries are dropped by setting the draft cache's
length back to the pending positions' end: they were computed from the draft's own hidden states,
and the accepted ones are fed again, on the target's features, at the next step.

A tree (decoding/tree_step.py) drafts the same way: after the pending positions, each depth's
nodes are fed beside their parents' hidden states under tree attention; the accepted path's
features are gathered from the verification (`path_features`) and nothing of the tree is kept in
the draft cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmspec_jax.decoding import sampling as sampling_lib
from mmspec_jax.models import KVCache, text_config


def prefill_draft(engine, params, tokens, lengths, features, first, cache_length: int):
  """The draft cache over each prompt's positions but its last, and that last position pending.

  tokens int32[B, T], lengths int32[B], features [B, T, K, Dt] (the target's, every prompt
  position), first int32[B] (the first new token) -> (draft cache, pending features
  [B, G + 1, K, Dt], pending tokens int32[B, G + 1], pending count int32[B] (all 1))."""
  variables = {'params': params}
  batch = tokens.shape[0]
  cache = KVCache.init(text_config(engine.draft.config), batch, cache_length,
                       layout=engine.draft.layout)
  # Position i reads token i + 1: the shifted prompt, its last column never valid.
  next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
  fused = engine.draft.apply(variables, features, method='fuse')
  _, _, cache = engine.draft.apply(variables, next_tokens, fused, lengths - 1, cache,
                                   method='prefill')
  width = engine.num_draft_tokens + 1
  last = jnp.take_along_axis(features, (lengths - 1)[:, None, None, None], axis=1)  # [B,1,K,Dt]
  pending_features = jnp.zeros((batch, width) + features.shape[2:], features.dtype)
  pending_features = pending_features.at[:, :1].set(last)
  pending_tokens = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(first)
  return cache, pending_features, pending_tokens, jnp.ones((batch,), jnp.int32)


def extend_pending(engine, params, state):
  """Feeds each row's pending positions to the draft: (its logits float32[B, 1, Vd] and hidden
  state [B, 1, D] at the last of them, where the next drafted token stands, the draft cache grown
  by the pending count)."""
  variables = {'params': params}
  fused = engine.draft.apply(variables, state.pending_features, method='fuse')  # [B, G + 1, D]
  hidden, cache = engine.draft.apply(variables, state.pending_tokens, fused, state.draft_cache,
                                     num_new_tokens=state.pending_count, method='run')
  last = (state.pending_count - 1)[:, None, None]
  hidden = jnp.take_along_axis(hidden, last, axis=1)  # [B, 1, D]: the head reads one position.
  return engine.draft.apply(variables, hidden, method='logits'), hidden, cache


def propose(engine, params, state, rng):
  """G draft tokens int32[B, G], their distributions float32[B, G, V], and the draft cache with
  the pending positions in it (its length past them: the drafted positions are not kept).
  rng: key[B]."""
  variables = {'params': params}
  rngs = jnp.swapaxes(sampling_lib.split(rng, engine.num_draft_tokens), 0, 1)  # key[G, B]
  logits, hidden, cache = extend_pending(engine, params, state)
  token, probs = engine.draft_token(rngs[0], logits[:, 0], state.row_sampling)
  fed_cache = cache

  def draft_one(carry, step_rng):
    cache, token, hidden = carry
    logits, hidden, cache = engine.draft.apply(variables, token[:, None], hidden, cache,
                                               method='extend')
    new_token, probs = engine.draft_token(step_rng, logits[:, -1], state.row_sampling)
    return (cache, new_token, hidden), (new_token, probs)

  (cache, _, _), (tokens, all_probs) = jax.lax.scan(draft_one, (cache, token, hidden), rngs[1:])
  tokens = jnp.concatenate([token[:, None], tokens.T], axis=1)  # [B, G]
  all_probs = jnp.concatenate([probs[:, None], all_probs.transpose(1, 0, 2)], axis=1)
  return tokens, all_probs, cache.with_lengths(fed_cache.lengths)


def path_features(features, path):
  """The verification's features [B, N + 1, K, Dt] over [root, tree nodes] -> those of the root
  and the accepted path's nodes (path int32[B, D], flattened indices), [B, D + 1, K, Dt]: the
  next step's pending positions, in order (next_pending keeps the first n + 1)."""
  index = jnp.concatenate([jnp.zeros_like(path[:, :1]), path], axis=1)  # [B, D + 1]
  return jnp.take_along_axis(features, index[:, :, None, None], axis=1)


def next_pending(state, features, emitted, num_accepted, active):
  """The next step's pending positions: last_token's and the accepted drafts' features
  (features [B, G + 1, K, Dt] from the verification), each with the token kept after it
  (emitted int32[B, G + 1]); rows not `active` keep theirs. -> (features, tokens, count)."""
  keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return (keep(features.astype(state.pending_features.dtype), state.pending_features),
          keep(emitted, state.pending_tokens),
          keep(num_accepted + 1, state.pending_count))
