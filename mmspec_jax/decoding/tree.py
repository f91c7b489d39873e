"""The static shape of a draft tree, and the tree-attention patterns of its calls.

A tree is a branching factor per depth: (b_1, ..., b_D) gives the root (the last context token,
which the target reads at the next verification) b_1 children, each of them b_2 children, and so
on: W_d = b_1 * ... * b_d nodes at depth d, N = W_1 + ... + W_D draft nodes in all. A chain of
gamma draft tokens is (1,) * gamma.

Flattened order (the verification's): the root at index 0, then depth 1's nodes, depth 2's, ...
(level order). The node at local index k of depth d has its parent at local index k // b_d of
depth d - 1, so a node's children are consecutive: siblings are drawn together.

Slots. The target writes flattened node i at its row's length + i. The draft has the root in its
committed prefix (its first call of a step feeds [previous token, root]), and writes node i >= 1
of depths 1 .. D-1 at its length + i - 1; depth D is never fed to the draft, as the last draft of
a chain. After verification the accepted path is moved onto consecutive slots (KVCache.move_slots).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from mmspec_jax.models import TreeAttention


def parse_tree(text: str) -> DraftTree | DynamicTree:
  """'2,2,1' (or '2x2x1') a static tree; 'dynamic:6,4,24' a dynamic one (`DynamicTree.parse`)."""
  if text.strip().startswith(DynamicTree.PREFIX):
    return DynamicTree.parse(text)
  return DraftTree.parse(text)


def parse_shape(text: str) -> tuple[DraftTree | DynamicTree, float]:
  """A draft shape beside the chains of the evaluation and the benchmark: '3,2,1' a tree,
  '1,1,1,1,1@0.4' a chain of 5 drafting adaptively at confidence threshold 0.4 ('3,2,1@0.4' an
  adaptive tree), 'dynamic:6,4,24' a dynamic tree -> (the tree, the threshold, 0 without '@')."""
  branching, _, threshold = text.partition('@')
  if threshold and branching.strip().startswith(DynamicTree.PREFIX):
    raise ValueError(f'draft shape {text!r}: a dynamic tree takes no confidence threshold')
  try:
    value = float(threshold) if threshold else 0.0
  except ValueError:
    raise ValueError(f'draft shape {text!r}: the threshold after "@" must be a number') from None
  if not 0 <= value < 1:
    raise ValueError(f'draft shape {text!r}: the confidence threshold must be in [0, 1)')
  return parse_tree(branching), value


def shape_label(tree: DraftTree | DynamicTree, threshold: float = 0.0) -> str:
  """parse_shape's inverse, with 'x' between a static tree's factors: '3x2x1', '1x1x1x1x1@0.4',
  'dynamic:6,4,24'."""
  return str(tree) + (f'@{threshold:g}' if threshold else '')


@dataclasses.dataclass(frozen=True)
class DraftTree:
  branching: tuple[int, ...]  # children per node at depths 1 .. D

  def __post_init__(self):
    branching = tuple(self.branching)
    if not branching or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in branching):
      raise ValueError(f'a draft tree is a branching factor >= 1 per depth, at least one depth; '
                       f'got {self.branching!r}')
    object.__setattr__(self, 'branching', tuple(int(b) for b in branching))

  @classmethod
  def parse(cls, text: str) -> DraftTree:
    """'2,2,1' (or '2x2x1') -> DraftTree((2, 2, 1))."""
    parts = [p for p in text.replace('x', ',').split(',') if p.strip()]
    try:
      branching = tuple(int(p) for p in parts)
    except ValueError:
      raise ValueError(f'a draft tree is written as branching factors per depth, e.g. "2,2,1"; '
                       f'got {text!r}') from None
    return cls(branching)

  @classmethod
  def chain(cls, gamma: int) -> DraftTree:
    return cls((1,) * gamma)

  def __str__(self) -> str:
    return 'x'.join(map(str, self.branching))

  @property
  def depth(self) -> int:
    return len(self.branching)

  @property
  def is_chain(self) -> bool:
    return all(b == 1 for b in self.branching)

  @property
  def level_sizes(self) -> tuple[int, ...]:
    """W_0 = 1 (the root), W_1, ..., W_D."""
    return (1,) + tuple(math.prod(self.branching[:d]) for d in range(1, self.depth + 1))

  @property
  def num_nodes(self) -> int:
    """N: the draft nodes (the root excluded); a verification reads N + 1 tokens."""
    return sum(self.level_sizes[1:])

  @property
  def level_starts(self) -> tuple[int, ...]:
    """The flattened index of each depth's first node, depths 0 .. D, and N + 1 past the last."""
    return tuple(int(s) for s in np.cumsum((0,) + self.level_sizes))

  @property
  def num_parents(self) -> int:
    """Nodes with children: the root and depths 1 .. D-1 (a prefix of the flattened order)."""
    return self.level_starts[self.depth]

  @functools.cached_property
  def parents(self) -> np.ndarray:
    """int32[N + 1]: each node's parent's flattened index (-1 for the root)."""
    parents = [-1]
    for d in range(1, self.depth + 1):
      start = self.level_starts[d - 1]
      parents += [start + k // self.branching[d - 1] for k in range(self.level_sizes[d])]
    return np.asarray(parents, np.int32)

  @functools.cached_property
  def depths(self) -> np.ndarray:
    """int32[N + 1]: each node's depth (the root's is 0)."""
    return np.repeat(np.arange(self.depth + 1), self.level_sizes).astype(np.int32)

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    """bool[N + 1, N + 1]: [i, j] when node j is node i or one of its ancestors."""
    size = self.num_nodes + 1
    mask = np.eye(size, dtype=bool)
    for i in range(1, size):  # A parent precedes its children, so its row is complete.
      mask[i] |= mask[self.parents[i]]
    return mask

  @property
  def window_nodes(self) -> int:
    """Slots past a row's length that a step's tree calls write (target and draft)."""
    return self.num_nodes

  @property
  def draft_call_widths(self) -> tuple[int, ...]:
    """The nodes fed by each draft call of a step past the first: W_d of each depth d < D."""
    return self.level_sizes[1:-1]

  def max_children(self, depth: int) -> int:
    """The most children a node of depth - 1 has."""
    return self.branching[depth - 1]

  def children_of(self, depth: int, node: jnp.ndarray):
    """(int32[B, b_depth] the flattened indices of the children of `node`, int32[B] of depth
    depth - 1; bool[B, b_depth] which of them exist: all here)."""
    children = self.children(depth, node)
    return children, jnp.ones(children.shape, bool)

  def draft_sources(self, path: jnp.ndarray) -> jnp.ndarray:
    """The accepted path (int32[B, D], `acceptance`'s) as the draft's window slots of its
    depths 1 .. D-1, for KVCache.move_slots: node i sits at window slot i - 1."""
    return path[:, :-1] - 1

  def children(self, depth: int, node: jnp.ndarray) -> jnp.ndarray:
    """int32[B, b_depth]: flattened indices of the children of `node` (int32[B], a node of
    depth - 1)."""
    local = node - self.level_starts[depth - 1]
    width = self.branching[depth - 1]
    return (self.level_starts[depth] + local[:, None] * width
            + jnp.arange(width, dtype=jnp.int32)[None, :])

  def paths(self, nodes: np.ndarray, first_depth: int) -> np.ndarray:
    """int32[len(nodes), D + 1 - first_depth]: row i lists node i's ancestors of depth
    first_depth and deeper, then itself (flattened indices), padded with itself."""
    width = self.depth + 1 - first_depth
    rows = [np.nonzero(self.ancestors[node])[0][first_depth:] for node in nodes]
    return np.asarray([np.pad(row, (0, width - len(row)), mode='edge') for row in rows],
                      np.int32)

  def verification_attention(self) -> TreeAttention:
    """The target's call over [root, every node]: written at length + i, positions by depth."""
    nodes = np.arange(self.num_nodes + 1)
    return TreeAttention(slots=jnp.asarray(nodes, jnp.int32),
                         positions=jnp.asarray(self.depths), mask=jnp.asarray(self.ancestors),
                         path=jnp.asarray(self.paths(nodes, 0)))

  def draft_attention(self, depth: int) -> TreeAttention:
    """The draft's call over depth `depth`'s nodes (1 <= depth < D): each sees the prefix (the
    root included) and, in the window of the nodes written so far, its ancestors and itself."""
    start, end = self.level_starts[depth], self.level_starts[depth + 1]
    mask = self.ancestors[start:end, 1:end]  # Window slot s holds node s + 1.
    return TreeAttention(slots=jnp.arange(start - 1, end - 1, dtype=jnp.int32),
                         positions=jnp.full((end - start,), depth - 1, jnp.int32),
                         mask=jnp.asarray(mask),
                         path=jnp.asarray(self.paths(np.arange(start, end), 1) - 1))


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """A dynamic draft tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858): each row grows its own
  tree by the draft's confidence. `depth` draft calls after the first; at each depth the
  `top_k` nodes of highest score are expanded, each into its `top_k` likeliest (greedy) or
  first-drawn (sampled) tokens; the `num_nodes` candidates of highest score are verified.
  decoding/dynamic_tree.py drafts it and says what the score is and why sampling stays exact.
  Written 'dynamic:D,K,N'."""
  depth: int
  top_k: int
  num_nodes: int

  PREFIX = 'dynamic:'
  is_chain = False

  def __post_init__(self):
    values = (self.depth, self.top_k, self.num_nodes)
    if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
      raise ValueError(f'a dynamic tree is depth, top_k and num_nodes, each >= 1; got {values}')
    if self.num_nodes > self.num_candidates:
      raise ValueError(f'dynamic tree {self}: num_nodes {self.num_nodes} is more than the '
                       f'{self.num_candidates} candidates depth {self.depth} and top_k '
                       f'{self.top_k} draft (top_k + (depth - 1) * top_k ** 2)')

  @classmethod
  def parse(cls, text: str) -> DynamicTree:
    """'dynamic:6,4,24' -> DynamicTree(depth=6, top_k=4, num_nodes=24)."""
    body = text.strip()[len(cls.PREFIX):]
    try:
      depth, top_k, num_nodes = (int(p) for p in body.replace('x', ',').split(','))
    except ValueError:
      raise ValueError(f'a dynamic draft tree is written "dynamic:DEPTH,TOP_K,NODES", e.g. '
                       f'"dynamic:6,4,24"; got {text!r}') from None
    return cls(depth, top_k, num_nodes)

  def __str__(self) -> str:
    return f'{self.PREFIX}{self.depth},{self.top_k},{self.num_nodes}'

  @property
  def num_candidates(self) -> int:
    """Nodes drafted: top_k children of the root, then top_k ** 2 at each further depth."""
    return self.top_k + (self.depth - 1) * self.top_k ** 2

  @property
  def window_nodes(self) -> int:
    """Slots past a row's length that a step's tree calls write: the target's num_nodes, the
    draft's expanded nodes ((depth - 1) * top_k)."""
    return max(self.num_nodes, (self.depth - 1) * self.top_k)

  @property
  def draft_call_widths(self) -> tuple[int, ...]:
    """The nodes fed by each draft call of a step past the first: top_k at each depth < D."""
    return (self.top_k,) * (self.depth - 1)
