"""Function-preserving widening of a LLaMA / LLaVA language model, for benchmarking.

Why: speculative decoding's speedup depends on the target's cost relative to the draft's.
The models trained offline are tiny, so their target is about as cheap as the draft and no speedup
can show; training a realistically sized target is out of reach. Widening the trained target gives
a model with the compute and memory traffic of a ~1B model whose logits are *identical* (to float
rounding) to the trained one's, so the trained draft/target agreement (block efficiency tau) is kept
while the wall-clock cost becomes realistic.

How (D -> D' residual width, N -> N' query heads, K -> K' kv heads, F -> F' MLP units; head_dim,
layer count and the GQA group size N/K unchanged):
  * The new residual coordinates stay exactly zero: the new columns of the embedding, of o_proj and
    down_proj outputs and of the projector's output are zero, as are the rows of o_proj, down_proj
    and linear_2 that read new heads / units / projector hidden units. Every other new weight is
    random with the std of the existing weight of the same name (real cost, no all-zero matrices).
  * RMSNorm divides by the RMS over D', i.e. sqrt(D/D') times the old RMS (the new coordinates are
    zero). Scaling every norm scale by sqrt(D/D') and eps by D/D' makes it exact:
      x * sqrt(D'/D) / sqrt(var + eps) * scale * sqrt(D/D') = x / sqrt(var + eps) * scale.
  * New q heads are appended after the old ones and new kv heads after the old ones: query head i
    uses kv head i // (N/K) (layers.dot_product_attention), so every old head keeps its kv head.
The vision tower is unchanged; for LLaVA only `config.text` (and so the projector's width) changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax.models import LlamaConfig, LlavaConfig, abstract_params, parameter_count

MLP_RATIO = 2.6875  # LLaMA's intermediate_size / hidden_size (11008 / 4096).
HIDDEN_MULTIPLE = 128

# Leaves whose new entries must be zero: they write the residual stream (new columns) or read
# new heads / MLP units / projector hidden units (new rows).
_ZERO = ('embed_tokens/embedding',  # [V, D']
         'o_proj/kernel',  # [L, N', H, D']
         'down_proj/kernel',  # [L, F', D']
         'linear_2/kernel', 'linear_2/bias')  # [D', D'], [D'] (projector)


def _text(config) -> LlamaConfig:
  if isinstance(config, LlavaConfig):
    return config.text
  if isinstance(config, LlamaConfig):
    return config
  raise TypeError(f'widen supports LlamaConfig and LlavaConfig, not {type(config).__name__}')


def widened_config(config, *, hidden_size: int, num_heads: int, intermediate_size: int):
  """The config of the widened model (no parameters touched). Raises ValueError on bad sizes."""
  text = _text(config)
  for name, new, old in (('hidden_size', hidden_size, text.hidden_size),
                         ('num_heads', num_heads, text.num_heads),
                         ('intermediate_size', intermediate_size, text.intermediate_size)):
    if new < old:
      raise ValueError(f'{name}={new} is smaller than the model\'s {old}; widen only grows')
  group = text.num_heads // text.num_kv_heads
  if num_heads % group:
    raise ValueError(f'num_heads={num_heads} is not a multiple of the GQA group size {group} '
                     f'(num_heads {text.num_heads} / num_kv_heads {text.num_kv_heads})')
  new_text = dataclasses.replace(
      text, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_heads // group,
      intermediate_size=intermediate_size,
      rms_norm_eps=text.rms_norm_eps * text.hidden_size / hidden_size)
  return dataclasses.replace(config, text=new_text) if isinstance(config, LlavaConfig) else new_text


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def _shapes(config):
  return jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))


def widen(config, params, *, hidden_size: int, num_heads: int, intermediate_size: int,
          rng: jax.Array):
  """(new_config, new_params): the same function as (config, params), at the larger sizes."""
  new_config = widened_config(config, hidden_size=hidden_size, num_heads=num_heads,
                              intermediate_size=intermediate_size)
  old_leaves, old_def = _shapes(config)
  new_leaves, new_def = _shapes(new_config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if treedef != old_def or any(x.shape != a.shape for (_, x), (_, a) in zip(leaves, old_leaves)):
    raise ValueError('params do not match the config\'s parameter tree and shapes')
  assert treedef == new_def  # Widening changes shapes only, never the tree.
  norm_factor = math.sqrt(_text(config).hidden_size / hidden_size)  # sqrt(D / D')
  zero_projector_input = (isinstance(config, LlavaConfig) and config.projector_type == 'linear')
  out = []
  for index, ((key_path, old), (_, target)) in enumerate(zip(leaves, new_leaves)):
    path = _path(key_path)
    if path.startswith('vision_tower/'):  # Unchanged, whatever its parameter names.
      out.append(old)
      continue
    old32 = jnp.asarray(old, jnp.float32)
    if path.endswith('norm/scale'):  # [L, D'] or [D']: every RMSNorm of the language model.
      new = jnp.ones(target.shape, jnp.float32)
    elif path.endswith(_ZERO) or (zero_projector_input and '/linear_1/' in path):
      new = jnp.zeros(target.shape, jnp.float32)
    else:  # q/k/v [L, D', N' or K', H], gate/up [L, D', F'], lm_head [D', V], linear_1 [Dv, D'].
      new = jax.random.normal(jax.random.fold_in(rng, index), target.shape) * jnp.std(old32)
    new = new.at[tuple(slice(0, n) for n in old.shape)].set(old32)  # Old block at the front.
    if path.endswith('norm/scale'):
      new = new * norm_factor
    out.append(new.astype(target.dtype))
  return new_config, jax.tree_util.tree_unflatten(treedef, out)


def config_for_parameters(config, target_parameters: int):
  """The widened config (hidden_size a multiple of 128 and of head_dim * group, num_heads =
  hidden_size / head_dim, intermediate_size ~ 2.6875 * hidden_size in multiples of 256) whose
  parameter count is closest to `target_parameters`. Counts by shape only (eval_shape)."""
  text = _text(config)
  group = text.num_heads // text.num_kv_heads
  step = math.lcm(HIDDEN_MULTIPLE, text.head_dim * group)

  def at(multiple: int):
    hidden = multiple * step
    intermediate = max(text.intermediate_size, 256 * max(1, round(MLP_RATIO * hidden / 256)))
    return widened_config(config, hidden_size=hidden, num_heads=hidden // text.head_dim,
                          intermediate_size=intermediate)

  @functools.cache
  def count(multiple: int) -> int:
    return parameter_count(abstract_params(at(multiple)))

  low = -(-max(text.hidden_size, text.num_heads * text.head_dim) // step)  # Smallest allowed.
  if count(low) >= target_parameters:
    if parameter_count(abstract_params(config)) > target_parameters:
      raise ValueError(f'target_parameters={target_parameters} is below the model\'s own count')
    return at(low)
  high = 2 * low
  while count(high) < target_parameters:
    low, high = high, 2 * high
  while high - low > 1:  # Invariant: count(low) < target <= count(high).
    middle = (low + high) // 2
    low, high = (middle, high) if count(middle) < target_parameters else (low, middle)
  best = min((low, high), key=lambda m: abs(count(m) - target_parameters))
  return at(best)


def widen_to_parameters(config, params, target_parameters: int, rng: jax.Array):
  """`widen` to the config `config_for_parameters` picks: about `target_parameters` params."""
  text = _text(config_for_parameters(config, target_parameters))
  return widen(config, params, hidden_size=text.hidden_size, num_heads=text.num_heads,
               intermediate_size=text.intermediate_size, rng=rng)
