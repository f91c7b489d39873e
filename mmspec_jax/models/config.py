"""Model configurations: frozen, hashable dataclasses.

Frozen dataclasses (not ConfigDicts) are what the Flax modules hold, because a module attribute
must be hashable for `jax.jit` to treat the module as static. `to_dict`/`from_dict` give the JSON
form written next to converted checkpoints; `presets.py` exposes the same values as ml_collections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_DTYPES = ('float32', 'bfloat16', 'float16')


def resolve_dtype(name: str) -> jnp.dtype:
  """Maps a dtype name from a config to a jnp dtype, refusing anything else by name."""
  if name not in SUPPORTED_DTYPES:
    raise ValueError(f'unsupported dtype {name!r}; expected one of {SUPPORTED_DTYPES}')
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as transformers' LLaMA names it (`rope_type`)."""
  rope_type: str = 'default'  # 'default' | 'linear' | 'llama3'
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA-family decoder (LLaMA 1/2/3, Vicuna, the 115M draft)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | tuple[int, ...] | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2  # LLaMA 3 lists several.
  pad_token_id: int | tuple[int, ...] | None = None
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
                       f'({self.num_kv_heads})')
    if self.head_dim % 2:
      raise ValueError(f'head_dim must be even for rotary embeddings, got {self.head_dim}')
    resolve_dtype(self.dtype)
    resolve_dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A CLIP ViT vision tower (pre-LN, quick_gelu for OpenAI CLIP)."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'  # 'quick_gelu' | 'gelu'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA-1.5: vision tower, projector, language model."""
  text: LlamaConfig = LlamaConfig(vocab_size=32064)
  vision: VisionConfig = VisionConfig()
  image_token_index: int = 32000
  projector_type: str = 'mlp2x_gelu'  # 'mlp2x_gelu' (LLaVA-1.5) | 'linear' (LLaVA-1)
  projector_hidden_act: str = 'gelu'  # exact erf GELU, as torch's nn.GELU()
  projector_bias: bool = True
  vision_feature_layer: int = -2  # index into CLIP hidden_states; negative counts from the end
  vision_feature_select_strategy: str = 'default'  # 'default' drops CLS | 'full'

  def __post_init__(self):
    if self.projector_type not in ('mlp2x_gelu', 'linear'):
      raise ValueError(f'unsupported projector_type {self.projector_type!r}; '
                       "expected 'mlp2x_gelu' or 'linear'")
    if self.projector_hidden_act != 'gelu':
      raise ValueError(f'unsupported projector_hidden_act {self.projector_hidden_act!r}; '
                       "expected 'gelu'")
    if self.vision_feature_select_strategy not in ('default', 'full'):
      raise ValueError('unsupported vision_feature_select_strategy '
                       f"{self.vision_feature_select_strategy!r}; expected 'default' or 'full'")
    self.num_vision_layers_computed  # Validates vision_feature_layer.

  @property
  def num_vision_layers_computed(self) -> int:
    """How many CLIP layers run to produce `hidden_states[vision_feature_layer]`.

    hidden_states has num_layers + 1 entries: the embeddings, then each layer's output.
    """
    num_states = self.vision.num_layers + 1
    index = self.vision_feature_layer
    if not -num_states <= index < num_states:
      raise ValueError(f'vision_feature_layer {index} is out of range for a vision tower with '
                       f'{self.vision.num_layers} layers (valid: {-num_states}..{num_states - 1})')
    return index % num_states

  @property
  def num_image_tokens(self) -> int:
    """Placeholder tokens one image expands to in the prompt (576 for LLaVA-1.5)."""
    extra = 1 if self.vision_feature_select_strategy == 'full' else 0
    return self.vision.num_patches + extra


@dataclasses.dataclass(frozen=True)
class AdapterDraftConfig:
  """The paper's "compact LLaVA" draft: a small LLaMA with its own projector (the adapter) over
  the target's frozen vision features, which it shares rather than recomputes."""
  text: LlamaConfig = LlamaConfig()
  vision_hidden_size: int = 1024  # Width of the target's vision-tower features.
  image_token_index: int = 32000
  projector_type: str = 'mlp2x_gelu'
  projector_bias: bool = True

  def __post_init__(self):
    if self.projector_type not in ('mlp2x_gelu', 'linear'):
      raise ValueError(f'unsupported projector_type {self.projector_type!r}; '
                       "expected 'mlp2x_gelu' or 'linear'")


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
  """EAGLE-3's low, middle and high layers of a `num_layers`-layer target (layers 1, L/2 - 1
  and L - 4, 0-based; for L = 32: 1, 15, 28), spread evenly over a target too shallow for them."""
  if num_layers >= 8:
    return (1, num_layers // 2 - 1, num_layers - 4)
  return (0, (num_layers - 1) // 2, num_layers - 1)


@dataclasses.dataclass(frozen=True)
class FeatureDraftConfig:
  """An EAGLE-3-style draft (models/feature_draft.py): a small decoder whose input at each
  position is the target's hidden states there, from three of its layers, fused by a linear
  layer, beside the embedding of the token that follows. It sees the image through the target."""
  text: LlamaConfig = LlamaConfig(num_layers=1)  # The draft's decoder layers, embedding and head.
  target_hidden_size: int = 4096
  feature_layers: tuple[int, ...] = (1, 15, 28)  # The target's layers read (0-based).

  def __post_init__(self):
    if len(self.feature_layers) < 1 or any(i < 0 for i in self.feature_layers):
      raise ValueError(f'feature_layers must be one or more layer indices >= 0, got '
                       f'{self.feature_layers}')

  def check_target(self, target_text: LlamaConfig):
    """Refuses, by name, a target whose layer outputs this draft cannot read."""
    if self.target_hidden_size != target_text.hidden_size:
      raise ValueError(f'the feature draft reads target features of width '
                       f'{self.target_hidden_size}; the target\'s are {target_text.hidden_size} '
                       'wide')
    if max(self.feature_layers) >= target_text.num_layers:
      raise ValueError(f'the feature draft reads target layers {self.feature_layers}, but the '
                       f'target has {target_text.num_layers}')


ModelConfig = LlamaConfig | LlavaConfig | AdapterDraftConfig | FeatureDraftConfig
_MODEL_TYPES = {LlamaConfig: 'llama', LlavaConfig: 'llava', AdapterDraftConfig: 'adapter_draft',
                FeatureDraftConfig: 'feature_draft'}


def model_type(config: ModelConfig) -> str:
  return _MODEL_TYPES[type(config)]


def with_dtype(config: ModelConfig, dtype: str, param_dtype: str | None = None) -> ModelConfig:
  """The same model computing in `dtype` with parameters stored in `param_dtype` (default: dtype)."""
  param_dtype = param_dtype or dtype
  if isinstance(config, LlavaConfig):
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, dtype=dtype, param_dtype=param_dtype),
        vision=dataclasses.replace(config.vision, dtype=dtype, param_dtype=param_dtype))
  if isinstance(config, (AdapterDraftConfig, FeatureDraftConfig)):
    return dataclasses.replace(
        config, text=dataclasses.replace(config.text, dtype=dtype, param_dtype=param_dtype))
  return dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype)


def to_dict(config: ModelConfig) -> dict[str, Any]:
  """JSON-ready form, tagged with `model_type`."""
  return {'model_type': model_type(config), **dataclasses.asdict(config)}


def _llama_from_dict(fields: dict[str, Any]) -> LlamaConfig:
  fields = dict(fields)
  fields['rope_scaling'] = RopeScaling(**fields.get('rope_scaling', {}))
  for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):  # JSON turns tuples into lists.
    if isinstance(fields.get(name), list):
      fields[name] = tuple(fields[name])
  return LlamaConfig(**fields)


def from_dict(fields: dict[str, Any]) -> ModelConfig:
  """Inverse of `to_dict`."""
  fields = dict(fields)
  kind = fields.pop('model_type', None)
  if kind == 'llama':
    return _llama_from_dict(fields)
  if kind == 'llava':
    fields['text'] = _llama_from_dict(fields['text'])
    fields['vision'] = VisionConfig(**fields['vision'])
    return LlavaConfig(**fields)
  if kind == 'adapter_draft':
    fields['text'] = _llama_from_dict(fields['text'])
    return AdapterDraftConfig(**fields)
  if kind == 'feature_draft':
    fields['text'] = _llama_from_dict(fields['text'])
    fields['feature_layers'] = tuple(fields['feature_layers'])
    return FeatureDraftConfig(**fields)
  raise ValueError(f'unsupported model_type {kind!r} in model config; expected one of '
                   f'{sorted(_MODEL_TYPES.values())}')
