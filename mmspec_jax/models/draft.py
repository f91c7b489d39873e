"""Draft models. The language-only draft is a plain `Llama`; the adapter draft is here.

The adapter draft reads the same prompt as the LLaVA target, image placeholders included, and
fills the placeholders with its own projection of the target's vision-tower features
(`Llava.encode_image`): the vision tower runs once per image, for both models.

Axis legend: B batch, T text length, S cache length, P image tokens, Dv vision width, D draft width.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mmspec_jax.models.config import AdapterDraftConfig
from mmspec_jax.models.kv_cache import KVCache
from mmspec_jax.models.layout import CANONICAL, Layout
from mmspec_jax.models.llama import Llama, prefill_from_embeddings
from mmspec_jax.models.llava import MultimodalProjector, merge_image_features


class AdapterDraft(nn.Module):
  config: AdapterDraftConfig
  layout: Layout = CANONICAL  # The language model's (see models/layout.py).

  def setup(self):
    cfg = self.config
    self.multi_modal_projector = MultimodalProjector(
        cfg.text.hidden_size, cfg.projector_type, cfg.projector_bias, cfg.text.dtype,
        cfg.text.param_dtype)
    self.language_model = Llama(cfg.text, self.layout)

  def embed_image_and_text(self, tokens: jax.Array,
                           vision_features: jax.Array | None = None) -> jax.Array:
    """tokens int32[B, T]; vision_features float[B, M * P, Dv] -> embeddings [B, T, D]."""
    is_image = tokens == self.config.image_token_index
    # <image> past the draft's ids embeds as zeros (Llama.embed), then takes the features.
    text = self.language_model.embed(tokens)
    if vision_features is None:
      return text
    return merge_image_features(text, self.multi_modal_projector(vision_features), is_image)

  def __call__(self, tokens, vision_features=None, *, positions=None, segment_ids=None):
    """Full forward -> float32[B, T, V]."""
    x = self.embed_image_and_text(tokens, vision_features)
    hidden, _ = self.language_model.run_layers(x, positions=positions, segment_ids=segment_ids)
    return self.language_model.logits(hidden)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
              vision_features: jax.Array | None = None):
    """As `Llava.prefill`, with the target's vision features. -> (float32[B, V], cache)."""
    x = self.embed_image_and_text(tokens, vision_features)
    return prefill_from_embeddings(self.language_model, x, lengths, cache)

  def extend(self, tokens: jax.Array, cache: KVCache, tree=None):
    return self.language_model.extend(tokens, cache, tree)
