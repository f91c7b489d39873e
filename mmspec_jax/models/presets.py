"""Named model presets, as ml_collections ConfigDicts (for configs/) or model configs.

`python -m mmspec_jax.plan --config=configs/model.py:llava_1_5_7b` and friends resolve names here.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmspec_jax.models.config import (AdapterDraftConfig, FeatureDraftConfig, LlamaConfig,
                                      LlavaConfig, ModelConfig, VisionConfig,
                                      default_feature_layers, from_dict, to_dict)

_VICUNA_7B = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                         max_position_embeddings=4096, pad_token_id=32001)
_VICUNA_13B = LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824,
                          num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                          max_position_embeddings=4096, pad_token_id=32001)
_CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                           image_size=336, patch_size=14)
_DRAFT_115M = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=4,
                          num_heads=8, num_kv_heads=8, head_dim=128, max_position_embeddings=4096)
_TINY_TEXT = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)

PRESETS: dict[str, ModelConfig] = {
    # LLaVA-1.5 7B: CLIP ViT-L/14-336 + Vicuna-7B v1.5 (text vocab padded to 32064). 7.06B params.
    'llava_1_5_7b': LlavaConfig(text=_VICUNA_7B, vision=_CLIP_L_336),
    'llava_1_5_13b': LlavaConfig(text=_VICUNA_13B, vision=_CLIP_L_336),
    # The paper's 115M language-only draft: 4 layers, width 1024, LLaMA tokenizer, untied.
    'draft_115m': _DRAFT_115M,
    # The paper's "compact LLaVA": the 115M draft with an adapter over CLIP-L features.
    'draft_115m_adapter': AdapterDraftConfig(text=_DRAFT_115M, vision_hidden_size=1024),
    # An EAGLE-3-style feature draft of LLaVA-1.5-7B: one Vicuna-7B decoder layer over the
    # target's layers 1, 15 and 28, its own head over the 32000 base ids. 0.55B params; a draft
    # step reads 0.37B of them (not the embedding table, only its rows; the fc once per step).
    'feature_llava_7b': FeatureDraftConfig(
        text=dataclasses.replace(_VICUNA_7B, vocab_size=32000, num_layers=1, pad_token_id=None),
        target_hidden_size=4096, feature_layers=default_feature_layers(32)),
    # Tiny CPU presets for tests and smoke runs.
    'tiny_llama': _TINY_TEXT,
    # The paper pair's vocabulary layout, shrunk: a 256-id base vocabulary (a draft's), <image>
    # 256 and <pad> 257 past it, the target's text vocabulary padded to 264 (32000/32001/32064).
    'tiny_llava': LlavaConfig(
        text=dataclasses.replace(_TINY_TEXT, vocab_size=264, pad_token_id=257),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            image_size=56, patch_size=14),
        image_token_index=256),
    'tiny_feature_draft': FeatureDraftConfig(
        text=dataclasses.replace(_TINY_TEXT, num_layers=1), target_hidden_size=64,
        feature_layers=default_feature_layers(2)),
    'tiny_adapter_draft': AdapterDraftConfig(
        text=LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=512),
        vision_hidden_size=32, image_token_index=256),
}


def get(name: str) -> ModelConfig:
  """The model config of a preset, by name."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {sorted(PRESETS)}')
  return PRESETS[name]


def as_config_dict(config: ModelConfig) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(to_dict(config))


def from_config_dict(config_dict: ml_collections.ConfigDict) -> ModelConfig:
  return from_dict(config_dict.to_dict())
