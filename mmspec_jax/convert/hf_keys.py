"""The one table between Hugging Face tensor names and our parameter paths.

Each row: (component, our path inside the component, the HF name inside the component, transform).
A `{i}` in the HF name is the layer index: our stacked parameter holds every layer on a leading axis.
Components sit under different prefixes depending on the checkpoint's layout; each component lists
the prefixes it may have, in the order they are tried (the on-disk legacy layout first).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Transforms, HF tensor -> ours (for one layer). `linear`: torch Linear weight (out, in) to a
# kernel [in, *out]; `linear_from_heads`: weight (out, N*H) to [N, H, out]; `conv`: (O, I, kh, kw)
# to (kh, kw, I, O); `copy`: the same shape; `flattened`: a flat HF vector (N*H,) to our [N, H].
LINEAR, LINEAR_FROM_HEADS, CONV = 'linear', 'linear_from_heads', 'conv'
COPY, FLATTENED = 'copy', 'flattened'

TEXT, LM_HEAD, VISION, PROJECTOR = 'text', 'lm_head', 'vision', 'projector'

# Our parameter tree: component -> path prefix in our params (LLaVA; a plain LLaMA is TEXT+LM_HEAD
# at the root).
LLAVA_ROOTS = {TEXT: 'language_model/', LM_HEAD: 'language_model/', VISION: 'vision_tower/',
               PROJECTOR: 'multi_modal_projector/'}
LLAMA_ROOTS = {TEXT: '', LM_HEAD: ''}

# HF prefixes of each component, most specific first.
LLAVA_PREFIXES = {
    TEXT: ('language_model.model.', 'model.language_model.', 'language_model.'),
    LM_HEAD: ('language_model.lm_head.', 'lm_head.'),
    VISION: ('vision_tower.vision_model.', 'model.vision_tower.vision_model.',
             'model.vision_tower.', 'vision_tower.'),
    PROJECTOR: ('multi_modal_projector.', 'model.multi_modal_projector.'),
}
LLAMA_PREFIXES = {TEXT: ('model.',), LM_HEAD: ('lm_head.',)}

_DECODER_LAYER = [
    ('self_attn/q_proj/kernel', 'self_attn.q_proj.weight', LINEAR),
    ('self_attn/k_proj/kernel', 'self_attn.k_proj.weight', LINEAR),
    ('self_attn/v_proj/kernel', 'self_attn.v_proj.weight', LINEAR),
    ('self_attn/o_proj/kernel', 'self_attn.o_proj.weight', LINEAR_FROM_HEADS),
    ('mlp/gate_proj/kernel', 'mlp.gate_proj.weight', LINEAR),
    ('mlp/up_proj/kernel', 'mlp.up_proj.weight', LINEAR),
    ('mlp/down_proj/kernel', 'mlp.down_proj.weight', LINEAR),
    ('input_layernorm/scale', 'input_layernorm.weight', COPY),
    ('post_attention_layernorm/scale', 'post_attention_layernorm.weight', COPY),
]
_ENCODER_LAYER = [
    *[(f'self_attn/{p}/kernel', f'self_attn.{p}.weight', LINEAR)
      for p in ('q_proj', 'k_proj', 'v_proj')],
    *[(f'self_attn/{p}/bias', f'self_attn.{p}.bias', FLATTENED)
      for p in ('q_proj', 'k_proj', 'v_proj')],
    ('self_attn/out_proj/kernel', 'self_attn.out_proj.weight', LINEAR_FROM_HEADS),
    ('self_attn/out_proj/bias', 'self_attn.out_proj.bias', COPY),
    *[(f'{n}/{ours}', f'{n}.{hf}', COPY) for n in ('layer_norm1', 'layer_norm2')
      for ours, hf in (('scale', 'weight'), ('bias', 'bias'))],
    *[(f'mlp/{fc}/kernel', f'mlp.{fc}.weight', LINEAR) for fc in ('fc1', 'fc2')],
    *[(f'mlp/{fc}/bias', f'mlp.{fc}.bias', COPY) for fc in ('fc1', 'fc2')],
]
_LAYER_NORMS = lambda name: [(f'{name}/scale', f'{name}.weight', COPY),
                             (f'{name}/bias', f'{name}.bias', COPY)]

TABLE: list[tuple[str, str, str, str]] = [
    (TEXT, 'embed_tokens/embedding', 'embed_tokens.weight', COPY),
    *[(TEXT, f'layers/{ours}', f'layers.{{i}}.{hf}', kind) for ours, hf, kind in _DECODER_LAYER],
    (TEXT, 'norm/scale', 'norm.weight', COPY),
    (LM_HEAD, 'lm_head/kernel', 'weight', LINEAR),
    (VISION, 'embeddings/class_embedding', 'embeddings.class_embedding', COPY),
    (VISION, 'embeddings/patch_embedding/kernel', 'embeddings.patch_embedding.weight', CONV),
    (VISION, 'embeddings/position_embedding', 'embeddings.position_embedding.weight', COPY),
    *[(VISION, p, h, k) for p, h, k in _LAYER_NORMS('pre_layrnorm')],
    *[(VISION, f'layers/{ours}', f'encoder.layers.{{i}}.{hf}', kind)
      for ours, hf, kind in _ENCODER_LAYER],
    *[(VISION, p, h, k) for p, h, k in _LAYER_NORMS('post_layernorm')],
    *[(PROJECTOR, f'{lin}/{ours}', f'{lin}.{hf}', kind) for lin in ('linear_1', 'linear_2')
      for ours, hf, kind in (('kernel', 'weight', LINEAR), ('bias', 'bias', COPY))],
]

# HF tensors that are derived buffers, never weights.
IGNORED_SUFFIXES = ('rotary_emb.inv_freq', 'position_ids')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our parameters and the HF tensor(s) it is made of."""
  path: str  # '/'-joined path in our params tree.
  component: str
  hf_names: tuple[str, ...]  # Inside the component; one per stacked layer, else one.
  kind: str
  stacked: bool


def _stack_offsets(path: str, layer_stacks: dict[str, int]):
  # Our vision tower splits its layers into the computed stack and the unused rest.
  for stack, offset in layer_stacks.items():
    if path.startswith(stack + '/'):
      return stack, offset
  return None, 0


def entries(our_paths: dict[str, tuple[int, ...]], roots: dict[str, str],
            layer_stacks: dict[str, dict[str, int]]) -> list[Entry]:
  """The table applied to a concrete parameter tree.

  our_paths: '/'-joined path -> shape of every parameter we expect; roots: component -> our path
  prefix; layer_stacks: component -> {stack name: index of its first HF layer}.
  Raises KeyError naming any parameter the table does not cover (a bug, not a user error).
  """
  result = []
  for path, shape in our_paths.items():
    row = _find_row(path, roots, layer_stacks)
    if row is None:
      raise KeyError(f'no HF tensor is mapped to our parameter {path!r}')
    component, rel_path, hf_name, kind = row
    stack, offset = _stack_offsets(rel_path, layer_stacks.get(component, {}))
    if stack is None:
      result.append(Entry(path, component, (hf_name,), kind, stacked=False))
    else:
      names = tuple(hf_name.format(i=offset + i) for i in range(shape[0]))
      result.append(Entry(path, component, names, kind, stacked=True))
  return result


def _find_row(path, roots, layer_stacks):
  for component, ours, hf_name, kind in TABLE:
    root = roots.get(component)
    if root is None or not path.startswith(root):
      continue
    rel_path = path[len(root):]
    stack, _ = _stack_offsets(rel_path, layer_stacks.get(component, {}))
    candidate = rel_path if stack is None else 'layers/' + rel_path[len(stack) + 1:]
    if candidate == ours:
      return component, rel_path, hf_name, kind
  return None


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that becomes our (per-layer) `shape`."""
  if kind == LINEAR:
    return (math.prod(shape[1:]), shape[0])
  if kind == LINEAR_FROM_HEADS:
    return (shape[-1], math.prod(shape[:-1]))
  if kind == CONV:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == FLATTENED:
    return (math.prod(shape),)
  return shape


def to_ours(kind: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind in (LINEAR, LINEAR_FROM_HEADS):
    return tensor.T.reshape(shape)
  if kind == CONV:
    return tensor.transpose(2, 3, 1, 0)
  return tensor.reshape(shape)


def to_hf(kind: str, array: np.ndarray) -> np.ndarray:
  """Inverse of `to_ours` (for export)."""
  shape = hf_shape(kind, array.shape)
  if kind in (LINEAR, LINEAR_FROM_HEADS):
    return array.reshape(shape[1], shape[0]).T
  if kind == CONV:
    return array.transpose(3, 2, 0, 1)
  return array.reshape(shape)
