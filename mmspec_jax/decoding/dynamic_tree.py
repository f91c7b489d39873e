"""Drafting a dynamic tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858): each row's own tree.

Axis legend: B batch, D depth, K top_k, N verified nodes (the root excluded), M candidates
(K + (D-1) K^2), V the target's vocabulary (decoding/tree.DynamicTree gives the shape).

Expansion: the draft's first call of a step is a chain's (or a feature draft's pending
positions). The root's K children are the candidates of depth 1; at each depth d < D the K
candidates of highest score are fed to the draft in one call under tree attention (each sees
its ancestors: expanded nodes only have children), and each gets K children: K^2 candidates of
depth d + 1. Greedy rows take each node's top K tokens; sampled rows draw K without replacement
(Gumbel-top-k, in draw order), as static trees do. Reranking: the N candidates of highest score
are verified, in candidate order (a parent before its children, siblings in draw order), by one
target call whose tree attention is each row's own (`RowTree`).

Scores. A node x with parent v has a value: value(v) * q_v(x) (the product of the draft's
probabilities on its path, EAGLE-2's estimate of its acceptance). A greedy row scores a node by
its value, as EAGLE-2 does: greedy output is the target's argmax whatever is verified. A sampled
row must not choose x by its own probability: recursive rejection sampling is exact when every
child it tries was drawn from q without replacement and the decision to try the j-th child does
not depend on that child's token. So a sampled row scores its j-th child by value(v) * r_j,
r_j = 1 - (the q of its earlier siblings): the mass left when it was drawn, known before the
draw (an exclusive prefix sum, and a running minimum over siblings, so that rounding keeps it
so). Every candidate that depends on x's token (x's subtree, its later siblings and theirs)
scores at most x's score and comes later in candidate order, where ties are broken, so whether
x is expanded or verified depends only on the candidates that rank above it, none of which
depends on x's token; its value (which a descendant's score uses) is clamped to its score, so a
parent never scores below its children and the verified set is a tree.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mmspec_jax.decoding.tree_step import draw_children, root_call
from mmspec_jax.decoding.sampling import pad_vocabulary, split
from mmspec_jax.models import TreeAttention

_NONE = -jnp.inf


def _take(values, index):
  """values[b, index[b, ...]] along axis 1 for values [B, M, ...] and index int32[B, ...]."""
  extra = values.ndim - 2
  flat = index.reshape(index.shape[0], -1)
  taken = jnp.take_along_axis(values, flat.reshape(flat.shape + (1,) * extra), axis=1)
  return taken.reshape(index.shape + values.shape[2:])


@flax.struct.dataclass
class RowTree:
  """One step's verified trees, a tree per row (the static DraftTree's interface for
  acceptance, verification and keep_path). Index 0 is the root, 1 .. N the verified nodes."""
  parents: jax.Array  # int32[B, N + 1]: the parent's index (-1 for the root)
  depths: jax.Array  # int32[B, N + 1]
  path: jax.Array  # int32[B, N + 1, D + 1]: ancestors at depths 0 .. own, then itself
  draft_slots: jax.Array  # int32[B, N + 1]: an expanded node's draft window slot, else -1
  depth: int = flax.struct.field(pytree_node=False)
  top_k: int = flax.struct.field(pytree_node=False)

  def max_children(self, depth: int) -> int:
    return self.top_k

  def children_of(self, depth: int, node: jax.Array):
    """(int32[B, K] the indices of `node`'s children (consecutive, in draw order), bool[B, K]
    which exist)."""
    is_child = self.parents == node[:, None]  # [B, N + 1]
    first = jnp.argmax(is_child, axis=1)
    count = jnp.sum(is_child, axis=1)
    offsets = jnp.arange(self.top_k, dtype=jnp.int32)
    children = jnp.minimum(first[:, None] + offsets, self.parents.shape[1] - 1).astype(jnp.int32)
    return children, offsets[None, :] < count[:, None]

  def verification_attention(self) -> TreeAttention:
    """The target's call over [root, nodes], written at length + i, positions by depth."""
    size = self.parents.shape[1]
    ancestors = jnp.any(self.path[:, :, :, None] == jnp.arange(size), axis=2)  # [B, N+1, N+1]
    return TreeAttention(slots=jnp.arange(size, dtype=jnp.int32), positions=self.depths,
                         mask=ancestors, path=self.path)

  def draft_sources(self, path: jax.Array) -> jax.Array:
    """The accepted path (int32[B, D]) as the draft's window slots of depths 1 .. D-1. Only the
    entries before the deepest accepted node matter (it and the placeholders past it move onto
    slots at or past the row's new draft length); a node not expanded (only ever the deepest
    accepted) keeps its own slot."""
    own = jnp.arange(self.depth - 1, dtype=jnp.int32)[None, :]
    slots = _take(self.draft_slots, path[:, :-1])
    return jnp.where(slots >= 0, slots, own)


def _children(engine, logits, rows, key, top_k: int):
  """Each fed node's K children: (tokens int32[B, W, K], whether drawn bool[B, W, K], their
  draft probabilities float32[B, W, K], the distributions float32[B, W, V] or None when greedy)."""
  padded = pad_vocabulary(logits, engine.vocab_size)  # [B, W, V]
  top_scores, top = jax.lax.top_k(padded, top_k)
  if engine.greedy:
    q = jax.nn.softmax(padded, axis=-1)
    return top.astype(jnp.int32), jnp.isfinite(top_scores), _take_last(q, top), None
  q = engine.probabilities(padded, rows)
  tokens, drawn = draw_children(key, q, top_k)
  if rows is not None:  # Greedy rows among sampled ones take their top K.
    greedy = rows.greedy[:, None, None]
    tokens = jnp.where(greedy, top.astype(jnp.int32), tokens)
    drawn = jnp.where(greedy, jnp.isfinite(top_scores), drawn)
    scored = jnp.where(greedy, jax.nn.softmax(padded, axis=-1), q)  # [B, W, V]
    return tokens, drawn, _take_last(scored, tokens), q
  return tokens, drawn, _take_last(q, tokens), q


def _take_last(values, index):
  return jnp.take_along_axis(values, index, axis=-1)


def _scores(parent_value, child_q, rows, greedy_engine: bool):
  """(score, value) float32[B, W, K] of children with draft probabilities child_q, under parents
  of value parent_value [B, W] (logs; the module docstring says why sampled rows differ)."""
  value = parent_value[:, :, None] + jnp.log(child_q)
  if greedy_engine:
    return value, value
  # The mass of the earlier siblings alone: an exclusive prefix sum (cumsum - q would round
  # with the child's own q in it), and a running minimum so rounding never lifts a later
  # sibling above an earlier one.
  summed = jnp.cumsum(child_q, axis=-1)
  drawn_before = jnp.concatenate([jnp.zeros_like(summed[..., :1]), summed[..., :-1]], axis=-1)
  left = jnp.clip(1.0 - drawn_before, jnp.finfo(jnp.float32).tiny, 1.0)
  score = jax.lax.cummin(parent_value[:, :, None] + jnp.log(left), axis=child_q.ndim - 1)
  if rows is not None:
    score = jnp.where(rows.greedy[:, None, None], value, score)
  return score, jnp.minimum(value, score)


def propose(engine, params, state, rng):
  """Drafts each row's tree. Returns (node tokens int32[B, N], node valid bool[B, N], draft
  distributions float32[B, N + 1, V] at [root, nodes] (None when greedy), draft calls int32[B],
  depths drafted int32[B], the draft cache: its length counts the root, the expanded nodes lie
  past it, `RowTree`)."""
  tree, rows = engine.draft_tree, state.row_sampling
  depth_count, top_k = tree.depth, tree.top_k
  variables = {'params': params}
  keys = split(rng, depth_count)  # [B, D]
  logits, hidden, cache = root_call(engine, params, state)
  batch = state.last_token.shape[0]
  parent_value = jnp.zeros((batch, 1), jnp.float32)
  parent_index = jnp.full((batch, 1), -1, jnp.int32)  # candidate index (-1: the root)
  parent_valid = ~state.done[:, None]  # A finished row drafts nothing.
  window_mask = window_path = None  # The expanded nodes' tree attention in the draft window.
  tokens, parents, scores, valid, depths, dists = [], [], [], [], [], []
  expanded = []  # candidate indices of the nodes fed to the draft, depth by depth [B, K]
  offset = 0
  for depth in range(1, depth_count + 1):
    children, drawn, child_q, q = _children(engine, logits, rows, keys[:, depth - 1], top_k)
    score, value = _scores(parent_value, child_q, rows, engine.greedy)  # [B, W, K]
    child_valid = drawn & parent_valid[:, :, None]
    score = jnp.where(child_valid, score, _NONE)
    width = children.shape[1] * top_k
    tokens.append(children.reshape(batch, width))
    parents.append(jnp.repeat(parent_index, top_k, axis=1))
    scores.append(score.reshape(batch, width))
    valid.append(child_valid.reshape(batch, width))
    depths.append(jnp.full((width,), depth, jnp.int32))
    if q is not None:
      dists.append(q)
    if depth == depth_count:
      break
    _, pick = jax.lax.top_k(scores[-1], top_k)  # [B, K]: ties go to the earlier candidate
    from_parent = pick // top_k  # [B, K]: the fed node (of the previous call) it hangs from
    fed = _take(tokens[-1], pick)
    parent_value = _take(value.reshape(batch, width), pick)
    parent_valid = _take(valid[-1], pick)
    parent_index = (offset + pick).astype(jnp.int32)
    expanded.append(parent_index)
    offset += width
    # The draft window holds the expanded nodes: depth d's at slots (d - 1) K .. d K - 1.
    own_slots = (depth - 1) * top_k + jnp.arange(top_k, dtype=jnp.int32)
    eye = jnp.broadcast_to(jnp.eye(top_k, dtype=bool), (batch, top_k, top_k))
    own_path = jnp.broadcast_to(own_slots[None, :, None], (batch, top_k, 1))
    if window_mask is None:
      window_mask, window_path = eye, own_path
    else:
      window_mask = jnp.concatenate([_take(window_mask, from_parent), eye], axis=2)
      window_path = jnp.concatenate([_take(window_path, from_parent), own_path], axis=2)
    attention = TreeAttention(
        slots=own_slots, positions=jnp.full((batch, top_k), depth - 1, jnp.int32),
        mask=window_mask,
        path=jnp.pad(window_path, ((0, 0), (0, 0), (0, depth_count - depth)), mode='edge'))
    if hidden is None:
      logits, cache = engine.draft.apply(variables, fed, cache, tree=attention, method='extend')
    else:  # A feature draft reads each node beside its parent's hidden state.
      logits, hidden, cache = engine.draft.apply(variables, fed, _take(hidden, from_parent),
                                                 cache, tree=attention, method='extend')

  row_tree, node_tokens, node_valid, node_expansion = _rerank(
      tree, jnp.concatenate(tokens, 1), jnp.concatenate(parents, 1), jnp.concatenate(scores, 1),
      jnp.concatenate(valid, 1), jnp.concatenate(depths), expanded)
  draft_probs = None
  if dists:  # [root, each expanded node]'s distribution, at each verified node.
    draft_probs = _take(jnp.concatenate(dists, axis=1), node_expansion)  # [B, N + 1, V]
  active = (~state.done).astype(jnp.int32)
  return (node_tokens, node_valid, draft_probs, jnp.full((batch,), depth_count, jnp.int32),
          depth_count * active, cache, row_tree)


def _rerank(tree, tokens, parents, scores, valid, depths, expanded):
  """The N candidates of highest score per row, in candidate order (candidates [B, M]; depths
  int32[M]; expanded: per depth < D the expanded candidates [B, K]) -> (RowTree, node tokens
  int32[B, N], node valid bool[B, N], each of [root, nodes]'s index among [root, expanded
  nodes] int32[B, N + 1] (0 for the root and unexpanded nodes))."""
  batch, num_candidates = tokens.shape
  top_k = tree.top_k
  _, chosen = jax.lax.top_k(scores, tree.num_nodes)
  chosen = jnp.sort(chosen, axis=1)  # [B, N]: parents (lower indices) before children
  rows = jnp.arange(batch)[:, None]
  verified_index = jnp.zeros((batch, num_candidates), jnp.int32).at[rows, chosen].set(
      jnp.arange(1, tree.num_nodes + 1, dtype=jnp.int32))
  parent = _take(parents, chosen)
  node_parents = jnp.where(parent < 0, 0, _take(verified_index, jnp.maximum(parent, 0)))
  node_parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), node_parents], axis=1)
  node_depths = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), depths[chosen]], axis=1)
  node_valid = _take(valid, chosen) & jnp.isfinite(_take(scores, chosen))

  # Each node's ancestors by depth: walk up from every node at once.
  size = tree.num_nodes + 1
  node = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch, size))
  path = jnp.broadcast_to(node[:, :, None], (batch, size, tree.depth + 1))
  levels = jnp.arange(tree.depth + 1)
  for _ in range(tree.depth):
    path = jnp.where(levels == _take(node_depths, node)[:, :, None], node[:, :, None], path)
    node = jnp.maximum(_take(node_parents, node), 0)
  path = path.at[:, :, 0].set(0)

  expansion = jnp.zeros((batch, num_candidates), jnp.int32)
  draft_slot = jnp.full((batch, num_candidates), -1, jnp.int32)
  if expanded:
    fed = jnp.concatenate(expanded, axis=1)  # [B, (D - 1) K]
    order = jnp.arange(fed.shape[1], dtype=jnp.int32)
    expansion = expansion.at[rows, fed].set(1 + order)
    draft_slot = draft_slot.at[rows, fed].set(order)
  with_root = lambda x, root: jnp.concatenate([jnp.full((batch, 1), root, jnp.int32),
                                               _take(x, chosen)], axis=1)
  row_tree = RowTree(parents=node_parents, depths=node_depths, path=path,
                     draft_slots=with_root(draft_slot, -1), depth=tree.depth, top_k=top_k)
  return row_tree, _take(tokens, chosen), node_valid, with_root(expansion, 0)
