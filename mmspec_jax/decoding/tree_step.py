"""One speculative step over a draft tree, and the adaptive draft length.

Axis legend: B batch, N draft nodes (the root excluded), P nodes with children, V the target's
vocabulary, W_d nodes at depth d, D depth (decoding/tree.py gives the shape and the slots).

Drafting: the draft's first call of a step feeds [previous token, root] as a chain does; then one
call per depth d = 1 .. D-1 feeds that depth's W_d nodes at once under tree attention. Greedy
trees take each node's top-b tokens; sampled trees draw b tokens without replacement
(Gumbel-top-k: the top b of log q + Gumbel noise, in order, are b sequential draws without
replacement), so recursive rejection sampling keeps the output exactly the target's.

Adaptive length (SpecDec++, DISCO): with a confidence threshold, a row stops drafting before depth
d + 1 when none of its depth-d nodes has a draft probability (of its likeliest next token) at or
above the threshold, and the draft calls stop once every row still decoding has stopped. Its
undrafted nodes are invalid: never accepted, so the target samples those positions itself
(lossless).

Verification: one target `extend` over [root, every node] with tree attention; then the accepted
path's cache entries are moved onto consecutive slots in both caches, per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmspec_jax.decoding import acceptance, feature_step
from mmspec_jax.decoding.sampling import pad_vocabulary, split


def draw_children(rng: jax.Array, probs: jax.Array, num: int):
  """`num` tokens drawn from each of float32[B, M, V] without replacement, in draw order:
  (int32[B, M, num], bool[B, M, num] whether each is a real draw: a distribution with fewer than
  `num` tokens of positive probability leaves the rest invalid). rng: key[B]."""
  gumbel = jax.vmap(lambda key: jax.random.gumbel(key, probs.shape[1:]))(rng)
  scores, tokens = jax.lax.top_k(jnp.log(probs) + gumbel, num)
  return tokens.astype(jnp.int32), jnp.isfinite(scores)


def _top_children(logits: jax.Array, num: int):
  """Greedy trees: each node's `num` likeliest tokens, ties by the lower id."""
  scores, tokens = jax.lax.top_k(logits, num)
  return tokens.astype(jnp.int32), jnp.isfinite(scores)


def root_call(engine, params, state):
  """The draft's first call of a step, as a chain's: (logits float32[B, 1, Vd] at the root, a
  feature draft's hidden state there [B, 1, D] or None, the draft cache, its length counting the
  root). A feature draft is fed its pending positions; the root's hidden state is their last."""
  if engine.reads_features:
    return feature_step.extend_pending(engine, params, state)
  first = jnp.stack([state.previous_token, state.last_token], axis=1)  # [B, 2]
  logits, cache = engine.draft.apply({'params': params}, first, state.draft_cache,
                                     method='extend')
  return logits[:, -1:], None, cache


def propose(engine, params, state, rng):
  """Drafts the tree. Returns (node tokens int32[B, N], node valid bool[B, N], draft
  distributions float32[B, P, V] at the nodes with children (None when greedy), the draft calls
  made while each row was drafting int32[B] (a batch's call runs while any row drafts), the
  depths each row drafted int32[B], the draft cache: its length counts the root, and the nodes
  of depths 1 .. D-1 lie past it). Finished rows draft nothing."""
  tree, rows = engine.draft_tree, state.row_sampling
  threshold = engine.confidence_threshold
  variables = {'params': params}
  keys = split(rng, tree.depth)  # [B, D]
  # hidden: a feature draft's hidden states at the last depth fed [B, W_d, Dd], else None.
  logits, hidden, cache = root_call(engine, params, state)
  batch = state.last_token.shape[0]
  drafting = ~state.done  # A finished row never keeps the draft calls going.
  draft_calls = jnp.ones((batch,), jnp.int32)
  drafted = jnp.zeros((batch,), jnp.int32)
  parent_valid = jnp.ones((batch, 1), bool)
  tokens, valid, all_probs = [], [], []
  for depth in range(1, tree.depth + 1):
    padded = pad_vocabulary(logits, engine.vocab_size)  # [B, W_{d-1}, V]
    width = tree.branching[depth - 1]
    if engine.greedy:
      children, drawn = _top_children(padded, width)
      confidence_probs = jax.nn.softmax(padded, axis=-1) if threshold > 0 else None
    else:
      q = engine.probabilities(padded, rows)
      all_probs.append(q)
      children, drawn = draw_children(keys[:, depth - 1], q, width)
      confidence_probs = q
      if rows is not None:  # Greedy rows among sampled ones take their top-b, as greedy trees.
        greedy = rows.greedy[:, None, None]
        top, top_drawn = _top_children(padded, width)
        children, drawn = jnp.where(greedy, top, children), jnp.where(greedy, top_drawn, drawn)
        confidence_probs = jnp.where(greedy, jax.nn.softmax(padded, axis=-1), q)
    if threshold > 0 and depth > 1:
      confidence = jnp.where(parent_valid, confidence_probs.max(axis=-1), 0.0)  # [B, W_{d-1}]
      drafting = drafting & (confidence.max(axis=1) >= threshold)
    child_valid = drawn & parent_valid[:, :, None] & drafting[:, None, None]
    children = children.reshape(batch, -1)  # [B, W_d]
    parent_valid = child_valid.reshape(batch, -1)
    drafted = drafted + jnp.any(parent_valid, axis=1)
    tokens.append(children)
    valid.append(parent_valid)
    if depth == tree.depth:
      break  # The deepest nodes are never fed to the draft, as a chain's last draft.
    feed = lambda carry, children=children, depth=depth, width=width: _feed(
        engine, variables, children, carry, tree.draft_attention(depth), width)
    if threshold > 0:
      draft_calls = draft_calls + drafting
      skipped = lambda carry, children=children: (
          jnp.zeros(children.shape + logits.shape[-1:], logits.dtype),
          None if carry[1] is None else jnp.repeat(carry[1], width, axis=1), carry[0])
      logits, hidden, cache = jax.lax.cond(jnp.any(drafting), feed, skipped, (cache, hidden))
    else:
      draft_calls = draft_calls + 1
      logits, hidden, cache = feed((cache, hidden))
  draft_probs = None if engine.greedy else jnp.concatenate(all_probs, axis=1)
  return (jnp.concatenate(tokens, axis=1), jnp.concatenate(valid, axis=1), draft_probs,
          draft_calls, drafted, cache)


def _feed(engine, variables, children, carry, attention, width):
  """One depth's nodes int32[B, W_d] into the draft under tree attention: (logits
  [B, W_d, Vd], a feature draft's hidden states there or None, the cache). A feature draft
  reads each node beside its parent's hidden state (a node's `width` siblings are consecutive)."""
  cache, parents = carry
  if parents is None:
    logits, cache = engine.draft.apply(variables, children, cache, tree=attention,
                                       method='extend')
    return logits, None, cache
  return engine.draft.apply(variables, children, jnp.repeat(parents, width, axis=1), cache,
                            tree=attention, method='extend')


def verify(engine, target_params, state, node_tokens, node_valid, draft_probs, rng, tree):
  """The target's pass over the tree and each row's acceptance. tree: the static DraftTree, or
  a dynamic tree's rows (dynamic_tree.RowTree). Returns (n accepted int32[B], emitted
  int32[B, D + 1], path int32[B, D], the target cache with the tree past its length, a feature
  draft's next pending features [B, D + 1, K, Dt] or None)."""
  verified = jnp.concatenate([state.last_token[:, None], node_tokens], axis=1)  # [B, N + 1]
  features = None
  if engine.reads_features:
    logits, cache, features = engine.target.apply(
        {'params': target_params}, verified, state.target_cache, engine.draft.config.feature_layers,
        tree=tree.verification_attention(), method='extend_with_features')
  else:
    logits, cache = engine.target.apply({'params': target_params}, verified, state.target_cache,
                                        tree=tree.verification_attention(), method='extend')
  if engine.greedy:
    outcome = acceptance.greedy_tree_accept(tree, node_tokens, node_valid, logits)
  else:
    rows = state.row_sampling
    outcome = acceptance.recursive_tree_accept(rng, tree, node_tokens, node_valid, draft_probs,
                                               engine.probabilities(logits, rows))
    if rows is not None:  # Greedy rows among sampled ones: the greedy rule.
      by_argmax = acceptance.greedy_tree_accept(tree, node_tokens, node_valid, logits)
      outcome = tuple(jnp.where(rows.greedy.reshape((-1,) + (1,) * (a.ndim - 1)), g, a)
                      for g, a in zip(by_argmax, outcome))
  if features is not None:
    features = feature_step.path_features(features, outcome[2])
  return (*outcome, cache, features)


def keep_path(target_cache, draft_cache, path, tree):
  """Moves the accepted path (int32[B, D], `acceptance`'s) onto consecutive slots: the target's
  depth-j node to its length + j, the draft's (depths < D, the ones it holds) to its length +
  j - 1 (from the window slots `tree.draft_sources` gives). Lengths are left to the caller."""
  target_cache = target_cache.move_slots(target_cache.lengths + 1, path - 1)
  if draft_cache is not None and path.shape[1] > 1:
    draft_cache = draft_cache.move_slots(draft_cache.lengths, tree.draft_sources(path))
  return target_cache, draft_cache
