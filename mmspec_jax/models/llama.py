"""The LLaMA-family decoder: the LLaVA language model and the language-only draft.

Axis legend: B batch, T query length, S cache length, N query heads, K kv heads, H head dim,
D model dim, F MLP dim, V vocabulary, L layers.

Entry points (call with `model.apply(variables, ..., method=...)`):
  __call__(tokens)                     full forward without a cache (training, reference)
  embed(tokens) / decode(x, cache)     the pieces, for models that build their own embeddings
  prefill(tokens, lengths, cache)      fill a cache from right-padded prompts, last-token logits
  extend(tokens, cache)                append T tokens to every row, logits for each
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import axes, sharding
from mmspec_jax.models.config import LlamaConfig, resolve_dtype
from mmspec_jax.models.kv_cache import KVCache, attention_mask, write
from mmspec_jax.models.layers import (RMSNorm, apply_rope, dense, dot_product_attention,
                                      partitioned, residual_init_scale, rope_inverse_frequencies)


def in_vocabulary(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """bool[...]: which ids a model with `vocab_size` ids has (the others are never looked up)."""
  return (tokens >= 0) & (tokens < vocab_size)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, kv_cache):
    """x: [B, T, D]; positions: int32[B, T]; mask: bool[B, T, S];
    kv_cache: ([B, S, K, H], [B, S, K, H]) or None (then S = T and keys are this call's).
    Returns ([B, T, D], the updated kv_cache or None)."""
    cfg = self.config
    dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype)
    query = dense((cfg.num_heads, cfg.head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                  name='q_proj', **kwargs)(x)  # [B, T, N, H]
    key = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                name='k_proj', **kwargs)(x)  # [B, T, K, H]
    value = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                  name='v_proj', **kwargs)(x)  # [B, T, K, H]
    inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    query = apply_rope(query, positions, inv_freq)
    key = apply_rope(key, positions, inv_freq)
    query = sharding.constrain(query, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))

    if kv_cache is not None:
      key_cache, value_cache = kv_cache
      key_cache = write(key_cache, key, positions)  # [B, S, K, H]
      value_cache = write(value_cache, value, positions)
      key, value = key_cache, value_cache
      kv_cache = (key_cache, value_cache)

    out = dot_product_attention(query, key, value, mask)  # [B, T, N, H]
    out = dense(cfg.hidden_size, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), axis=(-2, -1),
                init_scale=residual_init_scale(cfg.num_layers), name='o_proj', **kwargs)(out)
    return out, kv_cache


class Mlp(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    gate = dense(cfg.intermediate_size, (axes.EMBED, axes.MLP), name='gate_proj', **kwargs)(x)
    up = dense(cfg.intermediate_size, (axes.EMBED, axes.MLP), name='up_proj', **kwargs)(x)
    hidden = sharding.constrain(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return dense(cfg.hidden_size, (axes.MLP, axes.EMBED),
                 init_scale=residual_init_scale(cfg.num_layers), name='down_proj',
                 **kwargs)(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block; the scan carry is the residual stream, the scanned input the layer's cache."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, kv_cache, positions, mask):
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    activation_axes = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
    normed = RMSNorm(cfg.rms_norm_eps, name='input_layernorm', **kwargs)(x)
    attended, kv_cache = Attention(cfg, name='self_attn')(normed, positions, mask, kv_cache)
    x = sharding.constrain(x + attended, activation_axes)
    normed = RMSNorm(cfg.rms_norm_eps, name='post_attention_layernorm', **kwargs)(x)
    x = sharding.constrain(x + Mlp(cfg, name='mlp')(normed), activation_axes)
    return x, kv_cache


# Where `unstack_layers` puts the per-layer weights: {'0': layer 0's params, '1': ...}.
UNSTACKED_LAYERS = 'unstacked_layers'


def unstack_layers(params):
  """A Llama's params with the scanned [L, ...] layer weights split into one array per layer.

  For decoding off TPU: a decode step reads every weight once, but XLA:CPU (and cuBLAS-backed GPU
  matmuls) cannot feed a dot from a slice of the stacked array, so under the scan each layer's
  weights are first copied out, tripling the bytes moved per token (a 1.1B model read 9.6 GB/s
  scanned against 25.8 GB/s from separate arrays on the benchmark machine). `Llama.decode` runs
  unstacked layers in an unrolled loop instead. Done once, outside jit; the stacked arrays are
  freed when the caller drops the old params.
  """
  if UNSTACKED_LAYERS in params:
    return params
  stacked = jax.tree.map(jnp.asarray, params['layers'])
  num_layers = jax.tree.leaves(stacked)[0].shape[0]

  def split(tree):
    return {str(i): jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num_layers)}

  def layer_sharding(x):  # Each layer keeps the shards of the stacked array, less the [L] axis.
    if isinstance(x.sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(x.sharding.mesh,
                                        jax.sharding.PartitionSpec(*x.sharding.spec[1:]))
    return x.sharding
  # One program for all layers (not one per slice), placing every slice on its shards directly.
  shardings = jax.tree.map(layer_sharding, stacked)
  layers = jax.jit(split, out_shardings={str(i): shardings for i in range(num_layers)})(stacked)
  return {**{k: v for k, v in params.items() if k != 'layers'}, UNSTACKED_LAYERS: layers}


def _unrolled_layers(config: LlamaConfig, layers, x, kv, positions, mask):
  """The layer stack over unstacked weights (see `unstack_layers`): the scan's semantics."""
  layer = DecoderLayer(config, parent=None)  # Unbound: applied to each layer's weights.
  keys, values = [], []
  for i in range(config.num_layers):
    layer_kv = None if kv is None else (kv[0][i], kv[1][i])  # [B, S, K, H] each
    x, layer_kv = layer.apply({'params': layers[str(i)]}, x, layer_kv, positions, mask)
    if layer_kv is not None:
      keys.append(layer_kv[0])
      values.append(layer_kv[1])
  return x, (None if kv is None else (jnp.stack(keys), jnp.stack(values)))  # [L, B, S, K, H]


class Llama(nn.Module):
  """LlamaForCausalLM."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, name='embed_tokens',
        embedding_init=partitioned(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
        **kwargs)
    self.norm = RMSNorm(cfg.rms_norm_eps, name='norm', **kwargs)
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg.vocab_size, (axes.EMBED, axes.VOCAB), name='lm_head',
                           output_dtype=jnp.float32, **kwargs)
    # One scanned layer stack: parameters get a leading [L] axis named `layers`, the cache is
    # scanned over its leading layer axis (a None cache scans as an empty pytree), and XLA
    # compiles the layer body once however deep the model.
    stack = nn.scan(DecoderLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: axes.LAYERS})
    self.layers = stack(cfg, name='layers')

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> [B, T, D]. Ids outside the vocabulary embed as zeros (`in_vocabulary`).

    The one place every model's token ids meet its embedding table: the paper's draft has 32000
    ids while LLaVA's prompts carry <image> 32000 and <pad> 32001, and a plain lookup would give
    those NaN rows (jnp.take's default fill), which attention spreads through the whole row even
    from masked slots (0 * NaN). A zero embedding stays finite, and such positions are masked
    (padding) or replaced (image features), so they never influence a real position.
    """
    valid = in_vocabulary(tokens, self.config.vocab_size)
    x = self.embed_tokens(jnp.where(valid, tokens, 0))
    x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
    return sharding.constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final-normed hidden states -> float32[..., V], accumulated in float32 even when
    the model computes in bfloat16 (the choice between near-tied tokens is made on these)."""
    if not self.config.tie_word_embeddings:
      return self.lm_head(hidden)
    dtype = resolve_dtype(self.config.dtype)
    return jnp.dot(hidden.astype(dtype), self.embed_tokens.embedding.T.astype(dtype),
                   preferred_element_type=jnp.float32)

  def decode(self, x: jax.Array, cache: KVCache | None = None, *,
             positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
             num_new_tokens: jax.Array | None = None):
    """Runs the layers and final norm over input embeddings.

    x: [B, T, D]. With a cache, the T tokens are appended at each row's length and attend to the
    row's prefix; the returned cache's lengths grow by `num_new_tokens` (int32[B], default T).
    Without a cache, attention is causal over this call's tokens, within `segment_ids` (int32[B, T],
    packed sequences) when given; `positions` (int32[B, T]) default to 0..T-1.
    Returns ([B, T, D] hidden states, the new cache or None).
    """
    batch, length = x.shape[:2]
    if cache is not None:
      positions = cache.lengths[:, None] + jnp.arange(length)[None, :]  # [B, T]
      mask = attention_mask(positions, cache.max_length)  # [B, T, S]
      kv = (cache.keys, cache.values)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
      causal = jnp.tril(jnp.ones((length, length), bool))[None]  # [1, T, T]
      if segment_ids is not None:
        causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
      mask = jnp.broadcast_to(causal, (batch, length, length))
      kv = None
    unstacked = self.variables.get('params', {}).get(UNSTACKED_LAYERS)
    if unstacked is None:
      x, kv = self.layers(x, kv, positions, mask)
    else:
      x, kv = _unrolled_layers(self.config, unstacked, x, kv, positions, mask)
    hidden = self.norm(x)
    if cache is None:
      return hidden, None
    keys, values = kv
    grown = length if num_new_tokens is None else num_new_tokens
    new_cache = KVCache(
        keys=sharding.constrain(keys, KVCache.logical_axes().keys),
        values=sharding.constrain(values, KVCache.logical_axes().values),
        lengths=cache.lengths + grown)
    return hidden, new_cache

  def __call__(self, tokens, *, positions=None, segment_ids=None):
    """Full forward. tokens: int32[B, T] -> float32[B, T, V]."""
    hidden, _ = self.decode(self.embed(tokens), positions=positions, segment_ids=segment_ids)
    return self.logits(hidden)

  def extend(self, tokens: jax.Array, cache: KVCache):
    """Appends tokens int32[B, T] to every row. Returns (float32[B, T, V], cache)."""
    hidden, cache = self.decode(self.embed(tokens), cache)
    return self.logits(hidden), cache

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
    """Appends right-padded prompts: tokens int32[B, T], lengths int32[B] valid tokens per row.

    Returns (float32[B, V] logits at each row's last prompt token, cache grown by `lengths`).
    """
    return prefill_from_embeddings(self, self.embed(tokens), lengths, cache)


def prefill_from_embeddings(language_model: Llama, x: jax.Array, lengths: jax.Array,
                            cache: KVCache):
  """Prefill shared by the text-only and multimodal models.

  x: [B, T, D] right-padded prompt embeddings; padding slots are written but lie past the row's
  length, so they are never attended and are overwritten by the next extend.
  Only the last prompt position goes through the LM head: [B, T, V] logits are never built.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  hidden, cache = language_model.decode(x, cache, num_new_tokens=lengths)
  last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return language_model.logits(last), cache
