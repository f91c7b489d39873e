"""The LLaMA-family decoder: the LLaVA language model and the language-only draft.

Axis legend: B batch, T query length, S cache length, N query heads, K kv heads, H head dim,
D model dim, F MLP dim, V vocabulary, L layers.

Entry points (call with `model.apply(variables, ..., method=...)`):
  __call__(tokens)                     full forward without a cache (training, reference)
  embed(tokens) / run_layers(x, cache) the pieces, for models that build their own embeddings
  prefill(tokens, lengths, cache)      fill a cache from right-padded prompts, last-token logits
  extend(tokens, cache)                append T tokens to every row, logits for each
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import axes, sharding
from mmspec_jax.models.config import LlamaConfig, resolve_dtype
from mmspec_jax.models.attention import TreeAttention, cached_attention
from mmspec_jax.models.kv_cache import KVCache, LayerCache
from mmspec_jax.models.layout import CANONICAL, Layout, layer_name
from mmspec_jax.models.layers import (RMSNorm, apply_rope, dense, dot_product_attention, matmul,
                                      partitioned, residual_init_scale, rope_inverse_frequencies)


def in_vocabulary(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """bool[...]: which ids a model with `vocab_size` ids has (the others are never looked up)."""
  return (tokens >= 0) & (tokens < vocab_size)


def dense_settings(config: LlamaConfig, layout: Layout) -> dict:
  """The dtypes and the layout's matmul form, for every Dense of the language model."""
  return dict(dtype=resolve_dtype(config.dtype), param_dtype=resolve_dtype(config.param_dtype),
              output_major=layout.output_major_kernels, min_rows=layout.min_matmul_rows)


class Attention(nn.Module):
  config: LlamaConfig
  layout: Layout = CANONICAL

  def _project(self, x):
    """[B, T, D] -> query [B, T, N, H], key and value [B, T, K, H]."""
    cfg = self.config
    kwargs = dense_settings(cfg, self.layout)
    if self.layout.fused_projections:
      group = cfg.num_heads // cfg.num_kv_heads
      qkv = dense((cfg.num_kv_heads, group + 2, cfg.head_dim),
                  (axes.EMBED, axes.KV_HEADS, None, axes.HEAD_DIM), name='qkv_proj',
                  **kwargs)(x)  # [B, T, K, G + 2, H]: each kv head's G queries, its key, its value
      query = qkv[:, :, :, :group].reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
      return query, qkv[:, :, :, group], qkv[:, :, :, group + 1]
    query = dense((cfg.num_heads, cfg.head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM),
                  name='q_proj', **kwargs)(x)
    key = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                name='k_proj', **kwargs)(x)
    value = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                  name='v_proj', **kwargs)(x)
    return query, key, value

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None,
               tree: TreeAttention | None = None):
    """x: [B, T, D]; positions: int32[B, T].

    Without a cache: attention among this call's tokens under mask bool[B, T, T].
    With one: the T tokens attend to the cache's live slots and causally to each other (`mask` is
    unused), or as `tree` says, then are written into the cache. Returns ([B, T, D], the updated
    cache or None).
    """
    cfg = self.config
    kwargs = dense_settings(cfg, self.layout)
    query, key, value = self._project(x)
    inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    query = apply_rope(query, positions, inv_freq)
    key = apply_rope(key, positions, inv_freq)
    query = sharding.constrain(query, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    if cache is None:
      out = dot_product_attention(query, key, value, mask)  # [B, T, N, H]
    else:
      out, cache = cached_attention(query, key, value, cache, self.layout, tree)
    out = dense(cfg.hidden_size, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), axis=(-2, -1),
                init_scale=residual_init_scale(cfg.num_layers), name='o_proj', **kwargs)(out)
    return out, cache


class Mlp(nn.Module):
  config: LlamaConfig
  layout: Layout = CANONICAL

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    cfg = self.config
    kwargs = dense_settings(cfg, self.layout)
    if self.layout.fused_projections and self.layout.output_major_kernels:
      # Kernel [F, 2, D]: flattened to one [F * 2, D] matrix its sharded F axis stays major
      # ([2, F, D] would interleave the shards, and GSPMD would gather the whole kernel).
      gate_up = dense((cfg.intermediate_size, 2), (axes.EMBED, axes.MLP, None),
                      name='gate_up_proj', **kwargs)(x)  # [B, T, F, 2]
      gate, up = gate_up[..., 0], gate_up[..., 1]
    elif self.layout.fused_projections:
      gate_up = dense((2, cfg.intermediate_size), (axes.EMBED, None, axes.MLP),
                      name='gate_up_proj', **kwargs)(x)  # [B, T, 2, F]
      gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    else:
      gate = dense(cfg.intermediate_size, (axes.EMBED, axes.MLP), name='gate_proj', **kwargs)(x)
      up = dense(cfg.intermediate_size, (axes.EMBED, axes.MLP), name='up_proj', **kwargs)(x)
    hidden = sharding.constrain(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return dense(cfg.hidden_size, (axes.MLP, axes.EMBED),
                 init_scale=residual_init_scale(cfg.num_layers), name='down_proj',
                 **kwargs)(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block. The carry is (residual stream, the layer's cache view or None), and when
  layers' outputs are collected (`Llama.run_layers_with_features`) also (features [K, B, T, D],
  this layer's index int32[], the wanted layers' indices int32[K]); in the scanned layout it is the
  scan carry, and the view's layer index advances with the scan."""
  config: LlamaConfig
  layout: Layout = CANONICAL

  @nn.compact
  def __call__(self, carry, positions, mask, tree):
    x, cache, *collecting = carry
    cfg = self.config
    kwargs = dict(dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype))
    activation_axes = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
    normed = RMSNorm(cfg.rms_norm_eps, name='input_layernorm', **kwargs)(x)
    attended, cache = Attention(cfg, self.layout, name='self_attn')(normed, positions, mask, cache,
                                                                   tree)
    x = sharding.constrain(x + attended, activation_axes)
    normed = RMSNorm(cfg.rms_norm_eps, name='post_attention_layernorm', **kwargs)(x)
    x = sharding.constrain(x + Mlp(cfg, self.layout, name='mlp')(normed), activation_axes)
    if cache is not None:
      cache = cache.replace(layer=cache.layer + 1)
    if collecting:
      features, index, wanted = collecting
      features = jnp.where((wanted == index)[:, None, None, None], x[None].astype(features.dtype),
                           features)
      return (x, cache, features, index + 1, wanted), None
    return (x, cache), None


class Llama(nn.Module):
  """LlamaForCausalLM, its layers arranged as `layout` says (its params must be arranged so:
  `layout.arrange_params`)."""
  config: LlamaConfig
  layout: Layout = CANONICAL

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
                           output_dtype=jnp.float32, **dense_settings(cfg, self.layout))
    if self.layout.scanned:
      # One scanned layer stack: parameters get a leading [L] axis named `layers`, and XLA
      # compiles the layer body once however deep the model. The cache view rides in the carry.
      stack = nn.scan(DecoderLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      self.layers = stack(cfg, self.layout, name='layers')
    else:
      self.unrolled_layers = [DecoderLayer(cfg, self.layout, name=layer_name(i))
                              for i in range(cfg.num_layers)]

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
    table = self.embed_tokens.embedding.astype(dtype)  # [V, D]: output-major already.
    rows = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
    logits = matmul(rows, table, output_major=True, min_rows=self.layout.min_matmul_rows,
                    dtype=jnp.float32)
    return logits.reshape(*hidden.shape[:-1], table.shape[0])

  def run_layers(self, x: jax.Array, cache: KVCache | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 num_new_tokens: jax.Array | None = None, tree: TreeAttention | None = None,
                 attention_mask: jax.Array | None = None):
    """Runs the layers and the final norm over input embeddings x: [B, T, D].

    With a cache, the T tokens are appended at each row's length and attend to the row's prefix;
    the returned cache's lengths grow by `num_new_tokens` (int32[B], default T). With a `tree`
    too, they are tree nodes (attention.TreeAttention) and the lengths do not grow.
    Without a cache, attention is causal over this call's tokens, within `segment_ids` (int32[B, T],
    packed sequences) when given, or as `attention_mask` (bool[B, T, T], query by key) says;
    `positions` (int32[B, T]) default to 0..T-1.
    Returns ([B, T, D] hidden states, the new cache or None).
    """
    hidden, cache, _ = self._run_layers(
        x, cache, (), positions=positions, segment_ids=segment_ids,
        num_new_tokens=num_new_tokens, tree=tree, attention_mask=attention_mask)
    return hidden, cache

  def run_layers_with_features(self, x: jax.Array, feature_layers: tuple[int, ...],
                               cache: KVCache | None = None, **kwargs):
    """`run_layers`, and the outputs of the layers `feature_layers` (0-based; what a feature
    draft reads): ([B, T, D] hidden, cache, [B, T, K, D] features, in the order given)."""
    if not feature_layers:
      raise ValueError('feature_layers is empty')
    bad = [i for i in feature_layers if not 0 <= i < self.config.num_layers]
    if bad:
      raise ValueError(f'feature_layers {bad} are not layers of a {self.config.num_layers}-layer '
                       'model')
    hidden, cache, features = self._run_layers(x, cache, tuple(feature_layers), **kwargs)
    return hidden, cache, jnp.moveaxis(features, 0, 2)  # [K, B, T, D] -> [B, T, K, D]

  def _run_layers(self, x, cache, feature_layers, *, positions=None, segment_ids=None,
                  num_new_tokens=None, tree=None, attention_mask=None):
    batch, length = x.shape[:2]
    mask, view = None, None
    if cache is not None:
      offsets = jnp.arange(length)[None] if tree is None else tree.row_positions()
      positions = cache.lengths[:, None] + offsets  # [B, T]
      first_layer = jnp.zeros((), jnp.int32) if self.layout.scanned else 0
      view = LayerCache(keys=cache.keys, values=cache.values, lengths=cache.lengths,
                        layer=first_layer, heads_first=cache.heads_first)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
      causal = jnp.tril(jnp.ones((length, length), bool))[None]  # [1, T, T]
      if segment_ids is not None:
        causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
      if attention_mask is not None:
        causal = attention_mask
      mask = jnp.broadcast_to(causal, (batch, length, length))
    carry = (x, view)
    if feature_layers:
      carry += (jnp.zeros((len(feature_layers),) + x.shape, x.dtype), jnp.zeros((), jnp.int32),
                jnp.asarray(feature_layers, jnp.int32))
    if self.layout.scanned:
      carry, _ = self.layers(carry, positions, mask, tree)
    else:
      for layer in self.unrolled_layers:
        carry, _ = layer(carry, positions, mask, tree)
    x, view = carry[:2]
    features = carry[2] if feature_layers else None
    hidden = self.norm(x)
    if cache is None:
      return hidden, None, features
    grown = length if num_new_tokens is None else num_new_tokens
    if tree is not None:
      grown = 0
    names = KVCache.logical_axes(cache.heads_first)
    new_cache = KVCache(keys=sharding.constrain(view.keys, names.keys),
                        values=sharding.constrain(view.values, names.values),
                        lengths=cache.lengths + grown, heads_first=cache.heads_first)
    return hidden, new_cache, features

  def __call__(self, tokens, *, positions=None, segment_ids=None):
    """Full forward. tokens: int32[B, T] -> float32[B, T, V]."""
    hidden, _ = self.run_layers(self.embed(tokens), positions=positions, segment_ids=segment_ids)
    return self.logits(hidden)

  def extend(self, tokens: jax.Array, cache: KVCache, tree: TreeAttention | None = None):
    """Appends tokens int32[B, T] to every row (or writes tree nodes: `run_layers`). Returns
    (float32[B, T, V], cache)."""
    hidden, cache = self.run_layers(self.embed(tokens), cache, tree=tree)
    return self.logits(hidden), cache

  def extend_with_features(self, tokens: jax.Array, cache: KVCache,
                           feature_layers: tuple[int, ...], tree: TreeAttention | None = None):
    """`extend`, and the outputs of layers `feature_layers` at the T tokens: (float32[B, T, V],
    cache, [B, T, K, D])."""
    hidden, cache, features = self.run_layers_with_features(self.embed(tokens), feature_layers,
                                                            cache, tree=tree)
    return self.logits(hidden), cache, features

  def forward_with_features(self, tokens, feature_layers: tuple[int, ...], *, positions=None,
                            segment_ids=None):
    """`__call__`, and the outputs of layers `feature_layers` at every position:
    (float32[B, T, V], [B, T, K, D])."""
    hidden, _, features = self.run_layers_with_features(
        self.embed(tokens), feature_layers, positions=positions, segment_ids=segment_ids)
    return self.logits(hidden), features

  def prefill_with_features(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
                            feature_layers: tuple[int, ...]):
    """`prefill`, and the layers' outputs at every prompt position: (float32[B, V], cache,
    [B, T, K, D])."""
    return prefill_with_features(self, self.embed(tokens), lengths, cache, feature_layers)

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
  logits, cache, _ = _prefill(language_model, x, lengths, cache, ())
  return logits, cache


def prefill_with_features(language_model: Llama, x: jax.Array, lengths: jax.Array,
                          cache: KVCache, feature_layers: tuple[int, ...]):
  """`prefill_from_embeddings`, and the outputs of layers `feature_layers` at every prompt
  position: (float32[B, V], cache, [B, T, K, D])."""
  return _prefill(language_model, x, lengths, cache, feature_layers)


def _prefill(language_model: Llama, x, lengths, cache, feature_layers):
  lengths = jnp.asarray(lengths, jnp.int32)
  if feature_layers:
    hidden, cache, features = language_model.run_layers_with_features(
        x, feature_layers, cache, num_new_tokens=lengths)
  else:
    (hidden, cache), features = language_model.run_layers(x, cache, num_new_tokens=lengths), None
  last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return language_model.logits(last), cache, features
