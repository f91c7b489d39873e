"""Device mesh and logical-axis sharding rules, shared by training and decoding.

Models name their axes (`mmspec_jax.axes`); a config's `mesh` (axis name -> size, -1 fills
the rest) and `logical_axis_rules` (logical name -> mesh axes) turn the names into
`NamedSharding`s. A dimension whose size the mesh axes do not divide stays replicated, so one set of
rules serves models of every shape (e.g. 2 kv heads on a 4-way tensor axis).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmspec_jax import axes

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Batch over data x fsdp; parameters' embedding dimension over fsdp (ZeRO-3 style); heads, MLP
# units and vocabulary over tensor (Megatron style). Caches follow the activations.
DEFAULT_RULES: Rules = (
    (axes.BATCH, BATCH_AXES),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, 'tensor'),
    (axes.ACT_KV_HEADS, 'tensor'),
    (axes.ACT_MLP, 'tensor'),
    (axes.ACT_VOCAB, 'tensor'),
    (axes.VOCAB, 'tensor'),
    (axes.EMBED, 'fsdp'),
    (axes.MLP, 'tensor'),
    (axes.HEADS, 'tensor'),
    (axes.KV_HEADS, 'tensor'),
    (axes.HEAD_DIM, None),
    (axes.NORM, None),
    (axes.LAYERS, None),
    (axes.VISION_EMBED, 'fsdp'),
    (axes.VISION_MLP, 'tensor'),
    (axes.VISION_HEADS, 'tensor'),
    (axes.VISION_POSITIONS, None),
    (axes.CACHE_LAYERS, None),
    (axes.CACHE_BATCH, BATCH_AXES),
    (axes.CACHE_SEQUENCE, None),
    (axes.CACHE_KV_HEADS, 'tensor'),
    (axes.CACHE_HEAD_DIM, None),
)


# The draft's rules: data parallel over the whole mesh. Its weights are replicated and its batch
# (and cache) split over every mesh axis, `tensor` included: a 115M draft's 8 heads split over
# `tensor` would pay two all-reduces per layer per draft token, latency that at this size costs
# more than the bytes it spreads; this way each device drafts for its own rows with no collective
# at all (its weights cost 0.23 GB per device in bfloat16).
DRAFT_RULES: Rules = tuple((name, MESH_AXES if name in (axes.BATCH, axes.CACHE_BATCH) else None)
                           for name, _ in DEFAULT_RULES)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, tensor.

  mesh_shape: axis name -> size; at most one -1, which takes the remaining devices; axes not named
  have size 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'unknown mesh axes {sorted(unknown)}; expected some of {MESH_AXES}')
  sizes = {name: int(mesh_shape.get(name, 1)) for name in MESH_AXES}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {fill}')
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not divide by the fixed mesh axes ({known})')
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f'mesh {sizes} needs {math.prod(sizes.values())} devices, '
                     f'{len(devices)} are available')
  grid = np.asarray(devices).reshape([sizes[name] for name in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops the sharding of any dimension the mesh axes do not divide evenly."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = math.prod(mesh.shape[name] for name in names)
    fitted.append(entry if names and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names, under the active mesh
  (`jax.set_mesh`) and rules (`nn.logical_axis_rules`); dimensions the mesh axes do not divide
  stay whole. Without a mesh it does nothing (single-device runs, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = nn.logical_to_mesh_axes(tuple(names), nn.get_logical_axis_rules())
  return jax.lax.with_sharding_constraint(x, _fits(spec, x.shape, mesh))


def active_specs(names: Sequence[Sequence[str | None]], shapes: Sequence[Sequence[int]]):
  """The PartitionSpecs that the active mesh and rules give arrays of these logical names and
  shapes (as `constrain` would place them), or None without a mesh: for code that runs per shard
  (`jax.shard_map`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = nn.get_logical_axis_rules()
  return [_fits(nn.logical_to_mesh_axes(tuple(n), rules), shape, mesh)
          for n, shape in zip(names, shapes)]


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """The NamedSharding of one array from its logical axis names."""
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return NamedSharding(mesh, _fits(spec, shape, mesh))


def param_shardings(boxed_params, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Shardings for parameters boxed with their logical names (e.g. `abstract_params(config)`)."""
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def one(leaf):
    if is_boxed(leaf):
      return logical_sharding(leaf.names, leaf.value.shape, mesh, rules)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, boxed_params, is_leaf=is_boxed)


def tree_shardings(tree, logical_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Shardings for arrays (or shape structs) `tree` given a matching tree of logical names."""
  # `logical_tree` matches `tree` up to its leaves, where it holds tuples of names.
  return jax.tree.map(lambda leaf, names: logical_sharding(names, leaf.shape, mesh, rules),
                      tree, logical_tree)


def placed_structs(abstract, shardings):
  """ShapeDtypeStructs of `abstract` (arrays or structs) carrying `shardings` (a matching tree):
  targets for ahead-of-time compilation and for orbax restores straight onto the devices."""
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """A batch-major array: the leading axis over data x fsdp, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
