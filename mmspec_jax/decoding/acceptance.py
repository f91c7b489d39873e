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


# --- trees (decoding/tree.py, decoding/dynamic_tree.py) -----------------------------------------
# Axis legend: N draft nodes, N + 1 with the root (flattened: a parent before its children, a
# node's children consecutive, in the order drawn), D depth, P nodes with children. Each returns
# (int32[B] n accepted, int32[B, D + 1] emitted tokens of which the first n + 1 count,
# int32[B, D] the accepted path: the flattened index of its node at depth j + 1, or j + 1 past
# n, a placeholder whose slot lies past the row's new length, so moving it changes nothing kept).


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
  """values[b, index[b]] for values [B, M, ...] and index int32[B] (or [B, K] -> [B, K, ...])."""
  squeeze = index.ndim == 1
  index = index[:, None] if squeeze else index
  taken = jnp.take_along_axis(values, index.reshape(index.shape + (1,) * (values.ndim - 2)),
                              axis=1)
  return taken[:, 0] if squeeze else taken


def _with_root(node_tokens, node_valid):
  batch = node_tokens.shape[0]
  return (jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), node_tokens], axis=1),
          jnp.concatenate([jnp.ones((batch, 1), bool), node_valid], axis=1))


def _descend(going, found, node, chosen, depth, num_accepted, path):
  """One depth of the walk down the tree: rows that found a child move into it."""
  going = going & found
  node = jnp.where(going, chosen, node)
  path.append(jnp.where(going, node, depth))
  return going, node, num_accepted + going


def greedy_tree_accept(tree, node_tokens: jax.Array, node_valid: jax.Array,
                       target_logits: jax.Array):
  """Greedy verification of a tree: from the root, descend into the child equal to the target's
  argmax while there is one. node_tokens int32[B, N] and node_valid bool[B, N] (a node not
  drafted is never accepted); target_logits float[B, N + 1, V]."""
  choice = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N + 1]
  tokens, valid = _with_root(node_tokens, node_valid)
  batch = tokens.shape[0]
  node = num_accepted = jnp.zeros((batch,), jnp.int32)
  going = jnp.ones((batch,), bool)
  emitted, path = [], []
  for depth in range(1, tree.depth + 1):
    children, exists = tree.children_of(depth, node)  # [B, b]
    wanted = _take(choice, node)
    emitted.append(wanted)
    match = (_take(tokens, children) == wanted[:, None]) & _take(valid, children) & exists
    going, node, num_accepted = _descend(going, jnp.any(match, axis=1), node,
                                         _take(children, jnp.argmax(match, axis=1)), depth,
                                         num_accepted, path)
  emitted.append(_take(choice, node))
  return num_accepted, jnp.stack(emitted, axis=1), jnp.stack(path, axis=1)


def without_token(q: jax.Array, token: jax.Array) -> jax.Array:
  """q float32[B, V] with `token` (int32[B]) removed and renormalized: the distribution of the
  next draw without replacement (all zeros once nothing is left)."""
  remaining = 1.0 - _take(q, token)
  removed = jnp.put_along_axis(q, token[:, None], 0.0, axis=1, inplace=False)
  return jnp.where(remaining[:, None] > 0, removed / jnp.where(remaining > 0, remaining, 1.0)[
      :, None], 0.0)


def try_child(draw: jax.Array, p_x: jax.Array, q_x: jax.Array):
  """(whether the child can be tried, whether it is accepted): u < p(x) / q(x), without
  dividing. A child of probability 0 under the current q is skipped: a token drawn twice (a
  sampler with replacement) after its first rejection, or one whose q underflowed; accepting it
  (u * 0 < p) would bias the output towards p."""
  triable = q_x > 0
  return triable, triable & (draw * q_x < p_x)


def _residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """normalize(max(0, p - q)) (p itself where rounding leaves no mass)."""
  residual = jnp.maximum(p - q, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)


def recursive_tree_accept(rng: jax.Array, tree, node_tokens: jax.Array, node_valid: jax.Array,
                          draft_probs: jax.Array, target_probs: jax.Array):
  """Recursive rejection sampling (Jeon et al. 2024, arXiv 2402.14160) down a tree whose
  siblings were drawn from q without replacement, in the order drawn. At a node with target p
  and draft q, child i (token x) is accepted with probability min(1, p(x) / q(x)); on rejection
  p <- normalize(max(0, p - q)) and q <- q without x, renormalized, and the next child is tried.
  An accepted child is descended into; when every child is rejected (or none was drafted) a
  token is drawn from the last p, and past an accepted leaf from the target at the leaf. The
  emitted tokens are then distributed exactly as the target's.

  rng: a key per row (key[B]); draft_probs float32[B, P, V] at a static tree's nodes with
  children (the first P of the flattened order), or float32[B, N + 1, V] at every node of a
  dynamic tree (decoding/dynamic_tree.py); target_probs float32[B, N + 1, V].
  """
  tokens, valid = _with_root(node_tokens, node_valid)
  batch = tokens.shape[0]
  rng = split(rng, 2)
  draws = uniform(rng[:, 0], (tokens.shape[1],))  # [B, N + 1]: one per node
  node = num_accepted = jnp.zeros((batch,), jnp.int32)
  going = jnp.ones((batch,), bool)
  last_p = target_probs[:, 0]  # [B, V]: what a row that stops draws from
  path, emitted = [], []
  for depth in range(1, tree.depth + 1):
    p, q = _take(target_probs, node), _take(draft_probs, node)  # [B, V]
    children, exists = tree.children_of(depth, node)  # [B, b]
    accepted = jnp.zeros((batch,), bool)
    chosen = node
    for i in range(tree.max_children(depth)):
      child = children[:, i]
      x = _take(tokens, child)
      triable, accept = try_child(_take(draws, child), _take(p, x), _take(q, x))
      tried = going & ~accepted & _take(valid, child) & exists[:, i] & triable
      accept = tried & accept
      reject = tried & ~accept
      p = jnp.where(reject[:, None], _residual(p, q), p)
      q = jnp.where(reject[:, None], without_token(q, x), q)
      chosen = jnp.where(accept, child, chosen)
      accepted = accepted | accept
    last_p = jnp.where((going & ~accepted)[:, None], p, last_p)
    going, node, num_accepted = _descend(going, accepted, node, chosen, depth, num_accepted,
                                         path)
    emitted.append(_take(tokens, node))
  last_p = jnp.where(going[:, None], _take(target_probs, node), last_p)  # Past an accepted leaf.
  final = sample_from(rng[:, 1], last_p)
  emitted = jnp.stack(emitted + [final], axis=1)  # [B, D + 1]
  positions = jnp.arange(tree.depth + 1)[None, :]
  emitted = jnp.where(positions < num_accepted[:, None], emitted, final[:, None])
  return num_accepted, emitted, jnp.stack(path, axis=1)
