"""LLaVA-1.5: CLIP vision tower, MLP projector, LLaMA language model.

Axis legend: B batch, M images per row, T text length, S cache length, P image tokens per image,
D text model dim, V vocabulary.

Entry points, in the style of big_vision's PaliGemma (`model.apply(..., method=...)`):
  embed_image(images)                                  -> image features [B, M * P, D]
  embed_image_and_text(tokens, images | image_features) -> input embeddings [B, T, D]
  __call__(tokens, images)                             -> logits [B, T, V] (full forward)
  prefill(tokens, lengths, cache, images | image_features) -> last logits [B, V], cache
  extend(tokens, cache)                                -> logits [B, T, V], cache
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmspec_jax import axes
from mmspec_jax.models.clip import ClipVisionTower
from mmspec_jax.models.config import LlavaConfig, resolve_dtype
from mmspec_jax.models.kv_cache import KVCache
from mmspec_jax.models.layers import dense
from mmspec_jax.models.layout import CANONICAL, Layout
from mmspec_jax.models.llama import Llama, prefill_from_embeddings, prefill_with_features


class MultimodalProjector(nn.Module):
  """Vision features [..., Dv] -> text embeddings [..., D]: linear, exact GELU, linear (or linear).

  The LLaVA projector, and the adapter draft's own projector onto its smaller width.
  """
  width: int
  projector_type: str = 'mlp2x_gelu'
  use_bias: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, features):
    kwargs = dict(use_bias=self.use_bias, dtype=resolve_dtype(self.dtype),
                  param_dtype=resolve_dtype(self.param_dtype))
    x = dense(self.width, (axes.VISION_EMBED, axes.EMBED), name='linear_1', **kwargs)(features)
    if self.projector_type == 'mlp2x_gelu':
      x = nn.gelu(x, approximate=False)  # torch's nn.GELU(): the exact erf form.
      x = dense(self.width, (axes.MLP, axes.EMBED), name='linear_2', **kwargs)(x)
    return x


def merge_image_features(text_embeddings: jax.Array, image_features: jax.Array,
                         is_image: jax.Array) -> jax.Array:
  """Places image features at the image-placeholder positions, in order, row by row.

  text_embeddings: [B, T, D]; image_features: [B, M * P, D]; is_image: bool[B, T].
  The k-th placeholder of row b takes image_features[b, k] (transformers' masked_scatter order for
  rows that each carry their own images). Rows without placeholders are unchanged.
  """
  feature_index = jnp.cumsum(is_image, axis=1) - 1  # [B, T]
  feature_index = jnp.clip(feature_index, 0, image_features.shape[1] - 1)
  gathered = jnp.take_along_axis(image_features, feature_index[:, :, None], axis=1)  # [B, T, D]
  return jnp.where(is_image[:, :, None], gathered.astype(text_embeddings.dtype), text_embeddings)


class Llava(nn.Module):
  """LlavaForConditionalGeneration."""
  config: LlavaConfig
  layout: Layout = CANONICAL  # The language model's (see models/layout.py).

  def setup(self):
    cfg = self.config
    self.vision_tower = ClipVisionTower(
        cfg.vision, num_layers_computed=cfg.num_vision_layers_computed,
        drop_cls=cfg.vision_feature_select_strategy == 'default')
    self.multi_modal_projector = MultimodalProjector(
        cfg.text.hidden_size, cfg.projector_type, cfg.projector_bias, cfg.text.dtype,
        cfg.text.param_dtype)
    self.language_model = Llama(cfg.text, self.layout)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images float[B, H, W, 3] or float[B, M, H, W, 3] (preprocessed, channels last)
    -> float[B, M * P, Dv] vision-tower features, before projection, images of a row in order.

    These are what the adapter draft consumes: computed once, shared by target and draft.
    """
    if images.ndim == 4:
      images = images[:, None]
    batch, num_images = images.shape[:2]
    features = self.vision_tower(images.reshape(batch * num_images, *images.shape[2:]))
    return features.reshape(batch, num_images * features.shape[1], features.shape[2])

  def embed_image(self, images: jax.Array) -> jax.Array:
    """images as `encode_image` -> float[B, M * P, D] projected features."""
    return self.multi_modal_projector(self.encode_image(images))

  def project(self, vision_features: jax.Array) -> jax.Array:
    """[B, M * P, Dv] from `encode_image` -> [B, M * P, D]."""
    return self.multi_modal_projector(vision_features)

  def embed_image_and_text(self, tokens: jax.Array, images: jax.Array | None = None,
                           image_features: jax.Array | None = None) -> jax.Array:
    """tokens int32[B, T] with image placeholders -> embeddings [B, T, D].

    Give `images`, or `image_features` from `embed_image` to reuse them (the adapter draft and
    repeated prompts share one vision pass). Without either, placeholders embed as their ids
    (zeros past the vocabulary).
    """
    if images is not None and image_features is not None:
      raise ValueError('pass images or image_features, not both')
    is_image = tokens == self.config.image_token_index  # [B, T]
    # A placeholder id outside the text vocabulary embeds as zeros (Llama.embed's rule); either
    # way its embedding is replaced by the image features below.
    text = self.language_model.embed(tokens)
    if images is not None:
      image_features = self.embed_image(images)
    if image_features is None:
      return text
    return merge_image_features(text, image_features, is_image)

  def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *,
               image_features: jax.Array | None = None, positions=None, segment_ids=None):
    """Full forward: tokens int32[B, T] (+ images) -> float32[B, T, V]."""
    x = self.embed_image_and_text(tokens, images, image_features)
    hidden, _ = self.language_model.run_layers(x, positions=positions, segment_ids=segment_ids)
    return self.language_model.logits(hidden)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
              images: jax.Array | None = None, image_features: jax.Array | None = None):
    """Right-padded prompts int32[B, T] with int32[B] valid lengths.

    Returns (float32[B, V] logits at each row's last prompt token, cache grown by `lengths`).
    """
    x = self.embed_image_and_text(tokens, images, image_features)
    return prefill_from_embeddings(self.language_model, x, lengths, cache)

  def extend(self, tokens: jax.Array, cache: KVCache, tree=None):
    """Appends text tokens int32[B, T] to every row (tree: as `Llama.extend`). Returns
    (float32[B, T, V], cache)."""
    return self.language_model.extend(tokens, cache, tree)

  # --- the language model's layer outputs, for a feature draft (models/feature_draft.py) -------

  def forward_with_features(self, tokens: jax.Array, feature_layers: tuple[int, ...],
                            images: jax.Array | None = None, *,
                            image_features: jax.Array | None = None, positions=None,
                            segment_ids=None):
    """`__call__`, and the outputs of layers `feature_layers` at every position (image
    positions included): (float32[B, T, V], [B, T, K, D])."""
    x = self.embed_image_and_text(tokens, images, image_features)
    hidden, _, features = self.language_model.run_layers_with_features(
        x, feature_layers, positions=positions, segment_ids=segment_ids)
    return self.language_model.logits(hidden), features

  def prefill_with_features(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
                            feature_layers: tuple[int, ...], images: jax.Array | None = None,
                            image_features: jax.Array | None = None):
    """`prefill`, and the layers' outputs at every prompt position: (float32[B, V], cache,
    [B, T, K, D])."""
    x = self.embed_image_and_text(tokens, images, image_features)
    return prefill_with_features(self.language_model, x, lengths, cache, feature_layers)

  def extend_with_features(self, tokens: jax.Array, cache: KVCache,
                           feature_layers: tuple[int, ...], tree=None):
    """`extend`, and the layers' outputs at the T tokens: (float32[B, T, V], cache,
    [B, T, K, D])."""
    return self.language_model.extend_with_features(tokens, cache, feature_layers, tree)
