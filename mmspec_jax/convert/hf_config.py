"""Hugging Face `config.json` <-> our model configs.

transformers parses the file (it fills the defaults that llava-hf's sparse configs leave out and
normalizes `rope_theta`/`rope_scaling` across versions); we then refuse, by name, whatever our
models do not implement rather than convert it silently wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmspec_jax.models.config import LlamaConfig, LlavaConfig, ModelConfig, RopeScaling, VisionConfig

SUPPORTED_MODEL_TYPES = {'llava': 'LlavaForConditionalGeneration', 'llama': 'LlamaForCausalLM'}


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the problem."""


def read_model_type(hf_dir: str) -> str:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'no config.json in {hf_dir!r}: not a Hugging Face model directory')
  with open(path) as f:
    kind = json.load(f).get('model_type')
  if kind not in SUPPORTED_MODEL_TYPES:
    supported = ', '.join(f'{k!r} ({v})' for k, v in SUPPORTED_MODEL_TYPES.items())
    raise ConversionError(f'unsupported model_type {kind!r} in {path}; supported: {supported}')
  return kind


def _rope(text_config: Any) -> tuple[float, RopeScaling]:
  # transformers >= 5 keeps everything in `rope_parameters`; older versions in `rope_theta` and
  # `rope_scaling` (whose type key was once `type`).
  params = dict(getattr(text_config, 'rope_parameters', None) or {})
  if not params:
    params = dict(getattr(text_config, 'rope_scaling', None) or {})
    params.setdefault('rope_theta', getattr(text_config, 'rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in ('default', 'linear', 'llama3'):
    raise ConversionError(
        f'unsupported rope_scaling type {kind!r}; supported: default, linear, llama3 '
        "('dynamic' rescales frequencies with the sequence length, which a fixed-shape cache "
        'cannot follow)')
  scaling = RopeScaling(
      rope_type=kind, factor=float(params.get('factor', 1.0)),
      low_freq_factor=float(params.get('low_freq_factor', 1.0)),
      high_freq_factor=float(params.get('high_freq_factor', 4.0)),
      original_max_position_embeddings=int(params.get('original_max_position_embeddings', 8192)))
  return float(params['rope_theta']), scaling


def _token_id(value):
  return tuple(value) if isinstance(value, list) else value


def llama_config_from_hf(text_config: Any, *, tie_word_embeddings: bool | None = None
                         ) -> LlamaConfig:
  if getattr(text_config, 'model_type', 'llama') != 'llama':
    raise ConversionError(f'unsupported text model_type {text_config.model_type!r}; '
                          "expected 'llama'")
  act = getattr(text_config, 'hidden_act', 'silu')
  if act != 'silu':
    raise ConversionError(f"unsupported hidden_act {act!r} for LLaMA; expected 'silu'")
  for flag in ('attention_bias', 'mlp_bias'):
    if getattr(text_config, flag, False):
      raise ConversionError(f'unsupported {flag}=True: LLaMA projections here have no biases')
  theta, scaling = _rope(text_config)
  num_heads = text_config.num_attention_heads
  tied = (text_config.tie_word_embeddings if tie_word_embeddings is None
          else tie_word_embeddings)
  return LlamaConfig(
      vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
      intermediate_size=text_config.intermediate_size,
      num_layers=text_config.num_hidden_layers, num_heads=num_heads,
      num_kv_heads=getattr(text_config, 'num_key_value_heads', None) or num_heads,
      head_dim=getattr(text_config, 'head_dim', None) or text_config.hidden_size // num_heads,
      rms_norm_eps=text_config.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=text_config.max_position_embeddings,
      tie_word_embeddings=bool(tied),
      bos_token_id=_token_id(getattr(text_config, 'bos_token_id', None)),
      eos_token_id=_token_id(getattr(text_config, 'eos_token_id', None)),
      pad_token_id=_token_id(getattr(text_config, 'pad_token_id', None)))


def vision_config_from_hf(vision_config: Any) -> VisionConfig:
  kind = getattr(vision_config, 'model_type', None)
  if kind != 'clip_vision_model':
    raise ConversionError(f'unsupported vision tower model_type {kind!r}; expected '
                          "'clip_vision_model'")
  if vision_config.hidden_act not in ('quick_gelu', 'gelu'):
    raise ConversionError(f'unsupported vision hidden_act {vision_config.hidden_act!r}; '
                          "expected 'quick_gelu' or 'gelu'")
  return VisionConfig(
      hidden_size=vision_config.hidden_size, intermediate_size=vision_config.intermediate_size,
      num_layers=vision_config.num_hidden_layers, num_heads=vision_config.num_attention_heads,
      image_size=vision_config.image_size, patch_size=vision_config.patch_size,
      num_channels=getattr(vision_config, 'num_channels', 3),
      layer_norm_eps=vision_config.layer_norm_eps, hidden_act=vision_config.hidden_act)


def llava_config_from_hf(hf_config: Any) -> LlavaConfig:
  feature_layer = hf_config.vision_feature_layer
  if not isinstance(feature_layer, int):
    raise ConversionError(f'unsupported vision_feature_layer {feature_layer!r}: a single layer '
                          'index is supported, not a list of layers')
  text = hf_config.text_config
  # transformers ties LLaVA's lm_head to the embeddings when either config asks for it.
  tied = bool(getattr(hf_config, 'tie_word_embeddings', False)
              or getattr(text, 'tie_word_embeddings', False))
  image_token = getattr(hf_config, 'image_token_index', None)
  if image_token is None:
    image_token = getattr(hf_config, 'image_token_id')
  try:
    return LlavaConfig(
        text=llama_config_from_hf(text, tie_word_embeddings=tied),
        vision=vision_config_from_hf(hf_config.vision_config),
        image_token_index=int(image_token),
        projector_hidden_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, 'multimodal_projector_bias', True)),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def config_from_hf_dir(hf_dir: str) -> ModelConfig:
  """Our model config for a Hugging Face LLaVA or LLaMA directory."""
  import transformers  # Heavy; only conversion needs it.
  kind = read_model_type(hf_dir)
  hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
  if kind == 'llava':
    return llava_config_from_hf(hf_config)
  return llama_config_from_hf(hf_config)


def llama_config_to_hf(config: LlamaConfig):
  """A transformers LlamaConfig for our LLaMA config (for export)."""
  import transformers
  rope = {'rope_type': config.rope_scaling.rope_type, 'rope_theta': config.rope_theta}
  if config.rope_scaling.rope_type != 'default':
    rope['factor'] = config.rope_scaling.factor
  if config.rope_scaling.rope_type == 'llama3':
    rope.update(low_freq_factor=config.rope_scaling.low_freq_factor,
                high_freq_factor=config.rope_scaling.high_freq_factor,
                original_max_position_embeddings=config.rope_scaling.original_max_position_embeddings)
  token = lambda v: list(v) if isinstance(v, tuple) else v
  return transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope,
      bos_token_id=token(config.bos_token_id), eos_token_id=token(config.eos_token_id),
      pad_token_id=token(config.pad_token_id), hidden_act='silu',
      architectures=['LlamaForCausalLM'], dtype=config.param_dtype)


def llava_config_to_hf(config: LlavaConfig):
  """A transformers LlavaConfig for our LLaVA config (for export)."""
  import transformers
  vision = config.vision
  hf_vision = transformers.CLIPVisionConfig(
      hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
      num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
      image_size=vision.image_size, patch_size=vision.patch_size,
      num_channels=vision.num_channels, layer_norm_eps=vision.layer_norm_eps,
      hidden_act=vision.hidden_act)
  if config.projector_type != 'mlp2x_gelu':
    raise ConversionError('transformers\' LLaVA has only the two-layer projector; '
                          f'{config.projector_type!r} cannot be exported')
  text = llama_config_to_hf(config.text)
  return transformers.LlavaConfig(
      vision_config=hf_vision, text_config=text, image_token_index=config.image_token_index,
      projector_hidden_act=config.projector_hidden_act,
      multimodal_projector_bias=config.projector_bias,
      vision_feature_layer=config.vision_feature_layer,
      vision_feature_select_strategy=config.vision_feature_select_strategy,
      image_seq_length=config.num_image_tokens,
      tie_word_embeddings=config.text.tie_word_embeddings,
      architectures=['LlavaForConditionalGeneration'], dtype=config.text.param_dtype)
