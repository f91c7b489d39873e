"""The feature draft (EAGLE-3 style): a small decoder that reads the target's own hidden states.

At position i its input is the target's hidden states at i, from the layers
`config.feature_layers` (low, middle, high), fused by one linear layer (`fc`) to the draft's width,
beside the embedding of the token at i + 1 (the one the target chose there); both go through
`input_proj` into the draft's decoder layers, and its head predicts the token at i + 2. Image
positions are part of its context through the target's features: it sees the image as the target
does, and needs no vision path of its own.

While drafting there are no target features for the positions past the verified prefix: the
draft's own output hidden state at i stands in for the fused target features at i (EAGLE's
recurrence), so a drafted position's input is (its own last hidden, the token it drafted).

Axis legend: B batch, T positions, K feature layers, Dt target width, D draft width, V vocabulary.

Entry points (`model.apply(variables, ..., method=...)`):
  fuse(features)                               [B, T, K, Dt] target features -> [B, T, D]
  __call__(next_tokens, features | fused=)     full forward without a cache (training)
  unroll(next_tokens, features, num_steps)     the same, drafting num_steps past the features
  prefill(next_tokens, fused, lengths, cache)  right-padded rows into an empty cache
  extend(next_tokens, fused, cache, tree)      appends T positions to every row
  run(...), logits(hidden)                     extend's two halves
`__call__`, `prefill` and `extend` return logits float32[..., V] and the draft's hidden states
[..., D] (what the next drafted position reads as its features).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import axes
from mmspec_jax.models.config import FeatureDraftConfig
from mmspec_jax.models.kv_cache import KVCache
from mmspec_jax.models.layers import dense
from mmspec_jax.models.layout import CANONICAL, Layout
from mmspec_jax.models.llama import Llama, dense_settings


class FeatureDraft(nn.Module):
  config: FeatureDraftConfig
  layout: Layout = CANONICAL  # The decoder's (see models/layout.py).

  def setup(self):
    text = self.config.text
    # Kept input-major in every layout: arrange_params arranges the decoder's params only.
    settings = {**dense_settings(text, self.layout), 'output_major': False}
    # fc: [..., K, Dt] -> [..., D], the K layers' features together; input_proj: [..., 2, D]
    # (the next token's embedding, the fused features) -> [..., D].
    self.fc = dense(text.hidden_size, (None, None, axes.EMBED), axis=(-2, -1), name='fc',
                    **settings)
    self.input_proj = dense(text.hidden_size, (None, None, axes.EMBED), axis=(-2, -1),
                            name='input_proj', **settings)
    self.language_model = Llama(text, self.layout)

  def fuse(self, features: jax.Array) -> jax.Array:
    """[B, T, K, Dt] target layer outputs -> [B, T, D]."""
    expected = (len(self.config.feature_layers), self.config.target_hidden_size)
    if features.shape[-2:] != expected:
      raise ValueError(f'target features of shape {features.shape}: expected [..., '
                       f'{expected[0]}, {expected[1]}] (feature_layers, target_hidden_size)')
    return self.fc(features)

  def _inputs(self, next_tokens: jax.Array, fused: jax.Array) -> jax.Array:
    """int32[B, T], [B, T, D] -> the decoder's input [B, T, D]."""
    embedded = self.language_model.embed(next_tokens)
    return self.input_proj(jnp.stack([embedded, fused.astype(embedded.dtype)], axis=-2))

  def __call__(self, next_tokens: jax.Array, features: jax.Array | None = None, *,
               fused: jax.Array | None = None, positions=None, segment_ids=None):
    """Full forward (training): next_tokens int32[B, T] (the token after each position) and
    either the target's features [B, T, K, Dt] or `fused` [B, T, D] (`fuse` of them, or the
    draft's own hidden states: training-time test) -> (float32[B, T, V], hidden [B, T, D])."""
    if (features is None) == (fused is None):
      raise ValueError('pass the target features or the fused features, one of them')
    if fused is None:
      fused = self.fuse(features)
    hidden, _ = self.language_model.run_layers(self._inputs(next_tokens, fused),
                                               positions=positions, segment_ids=segment_ids)
    return self.language_model.logits(hidden), hidden

  def unroll(self, next_tokens: jax.Array, features: jax.Array, num_steps: int):
    """The draft `num_steps` positions past the target's features, at every position at once
    (EAGLE-3's training-time test). Stream 0 is the full forward on the target's features. At
    position j, stream s reads its own hidden state of stream s - 1 at j - 1 beside the same next
    token, and attends to stream 0 up to position j - s and to its chain: streams 1 .. s at
    positions j - s + 1 .. j. That is what the draft sees at j after drafting s tokens past the
    verified position j - s. Each stream is a forward over the streams before it too (streams
    depend on their predecessors' outputs; earlier streams never attend to later ones).

    next_tokens int32[B, T], features [B, T, K, Dt] -> [num_steps + 1] logits float32[B, T, V];
    stream s's first s positions have no verified position under them (give them no loss)."""
    batch, length = next_tokens.shape
    embedded = self.language_model.embed(next_tokens)
    fused = self.fuse(features)
    streams, outputs = [], []
    for step in range(num_steps + 1):
      if step:  # Position j reads the previous stream's hidden state at j - 1.
        fused = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
      streams.append(self.input_proj(jnp.stack([embedded, fused.astype(embedded.dtype)], -2)))
      positions = jnp.broadcast_to(jnp.tile(jnp.arange(length), step + 1),
                                   (batch, (step + 1) * length))
      hidden, _ = self.language_model.run_layers(
          jnp.concatenate(streams, axis=1), positions=positions,
          attention_mask=unroll_mask(length, step + 1)[None])
      hidden = hidden[:, step * length:]  # [B, T, D]: this stream's positions.
      outputs.append(self.language_model.logits(hidden))
    return outputs

  def prefill(self, next_tokens: jax.Array, fused: jax.Array, lengths: jax.Array,
              cache: KVCache):
    """Right-padded rows (int32[B, T] next tokens, [B, T, D] fused features, int32[B] valid
    positions) into the cache. -> (float32[B, V] and hidden [B, D] at each row's last valid
    position, the cache grown by `lengths`)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    hidden, cache = self.run(next_tokens, fused, cache, num_new_tokens=lengths)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return self.language_model.logits(last), last, cache

  def extend(self, next_tokens: jax.Array, fused: jax.Array, cache: KVCache, tree=None,
             num_new_tokens: jax.Array | None = None):
    """Appends T positions to every row (tree nodes with `tree`, as `Llama.extend`), the
    cache growing by `num_new_tokens` (int32[B], default T: the rest are written past the row's
    length, as a prefill's padding). -> (float32[B, T, V], hidden [B, T, D], cache)."""
    hidden, cache = self.run(next_tokens, fused, cache, tree, num_new_tokens)
    return self.language_model.logits(hidden), hidden, cache

  def run(self, next_tokens: jax.Array, fused: jax.Array, cache: KVCache, tree=None,
          num_new_tokens: jax.Array | None = None):
    """`extend` without the head: (hidden [B, T, D], cache), for a caller that needs the
    logits of a few positions only (`logits`)."""
    return self.language_model.run_layers(self._inputs(next_tokens, fused), cache, tree=tree,
                                          num_new_tokens=num_new_tokens)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] hidden states -> float32[..., V]."""
    return self.language_model.logits(hidden)

def unroll_mask(length: int, num_streams: int) -> jax.Array:
  """bool[S * T, S * T] (query, key) of `FeatureDraft.unroll` over S streams of T positions:
  stream s at position j sees stream 0 at positions <= j - s and stream s' (1 <= s' <= s) at
  position j - s + s'."""
  index = jnp.arange(num_streams * length)
  stream, position = index // length, index % length
  q_stream, q_position = stream[:, None], position[:, None]
  k_stream, k_position = stream[None, :], position[None, :]
  verified = (k_stream == 0) & (k_position <= q_position - q_stream)
  chain = ((k_stream >= 1) & (k_stream <= q_stream)
           & (k_position == q_position - q_stream + k_stream))
  return verified | chain
