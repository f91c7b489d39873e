"""Host-side text and image preprocessing for LLaVA-1.5, matching transformers' LlavaProcessor.

Everything here runs in numpy on the host and produces what the JAX models consume:
  preprocess_images(images) -> pixel values float32[N, H, W, 3] (NHWC, channels last)
  format_prompt(question)   -> the LLaVA-1.5 conversation string
  encode(text)              -> token ids with each <image> expanded to num_image_tokens copies
  pad_batch(sequences)      -> int32[B, T] right-padded ids, int32[B] lengths

Loading is strictly offline (local_files_only): a checkpoint directory is either an HF LLaVA
directory (llava-hf/llava-1.5-7b-hf style) or a plain LLaMA directory holding a tokenizer only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# The LLaVA-1.5 chat template llava-hf ships (chat_template.json).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# The LLaVA-1.5 conversation format, used when the checkpoint ships no chat template.
FALLBACK_IMAGE_PROMPT = 'USER: <image>\n{question} ASSISTANT:'
FALLBACK_TEXT_PROMPT = 'USER: {question} ASSISTANT:'

# Any one of these means "a tokenizer lives here" (fast json, sentencepiece, or BPE/WordPiece).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'vocab.json',
                   'vocab.txt')


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _slow_clip_image_processor_class():
  # transformers >= 5 renamed the classes: `CLIPImageProcessor` is the torchvision backend (and
  # without torchvision it is silently swapped for the PIL one, with a warning), while the numpy/PIL
  # implementation is `CLIPImageProcessorPil`. Older versions only have `CLIPImageProcessor`, which
  # there *is* the numpy one. Either way we get the PIL/numpy backend: no torchvision needed, and
  # numerically what AutoProcessor returns when torchvision is absent.
  try:
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil
  except ImportError:
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor


def num_image_tokens_from_config(config: dict[str, Any]) -> int | None:
  """Image tokens per image from a LLaVA config.json dict, or None if it has no vision_config.

  (image_size // patch_size)**2 patch tokens; the CLS token is kept only by the "full" strategy.
  """
  vision = config.get('vision_config')
  if not isinstance(vision, dict) or 'image_size' not in vision or 'patch_size' not in vision:
    return None
  n = (vision['image_size'] // vision['patch_size']) ** 2
  # LlavaConfig defaults the strategy to "default" (drop CLS) when the key is absent.
  return n + 1 if config.get('vision_feature_select_strategy', 'default') == 'full' else n


def _num_image_tokens_from_processor(processor_config: dict[str, Any],
                                     image_processor) -> int | None:
  # LlavaProcessor's own formula, used when config.json lacks a vision_config.
  patch = processor_config.get('patch_size')
  if image_processor is None or not patch:
    return None
  crop = image_processor.crop_size
  n = (crop['height'] // patch) * (crop['width'] // patch)
  n += processor_config.get('num_additional_image_tokens', 0)
  return n - 1 if processor_config.get('vision_feature_select_strategy') == 'default' else n


def _find_chat_template(directory: str, tokenizer) -> str | None:
  # Processor-level files first: they hold the multimodal template AutoProcessor would use, while
  # tokenizer_config.json may carry an unrelated text-only template.
  jinja = os.path.join(directory, 'chat_template.jinja')
  if os.path.isfile(jinja):
    with open(jinja, encoding='utf-8') as f:
      return f.read()
  legacy = _read_json(os.path.join(directory, 'chat_template.json')).get('chat_template')
  if legacy:
    return legacy
  template = getattr(tokenizer, 'chat_template', None)
  if isinstance(template, dict):  # Several named templates: take the default one.
    template = template.get('default')
  return template or None


def _to_rgb(image: Image.Image) -> Image.Image:
  # Same rule as transformers' convert_to_rgb: transparency is composited onto white (a bare
  # .convert('RGB') would expose whatever colour hides under alpha=0 and differ from HF).
  if image.mode == 'RGB':
    return image
  if 'A' in image.getbands() or image.info.get('transparency') is not None:
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return image.convert('RGB')


def load_image(image: Image.Image | str | os.PathLike | np.ndarray) -> Image.Image:
  """A PIL image, an image file path, or a uint8[H, W(, C)] array -> RGB PIL image."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as f:
      f.load()  # Read pixels before the file handle closes.
      return _to_rgb(f)
  if isinstance(image, np.ndarray):
    # Float arrays are ambiguous ([0, 1] or [0, 255]?), so only raw uint8 pixels are accepted.
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
      raise ValueError(f'image arrays must be uint8[H, W, 3] (or [H, W], [H, W, 1], [H, W, 4]); '
                       f'got {image.dtype}{list(image.shape)}')
    return _to_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                                   else image))
  if isinstance(image, Image.Image):
    return _to_rgb(image)
  raise ValueError(f'unsupported image type {type(image).__name__}; expected a PIL image, '
                   'a file path or a uint8 array')


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, *,
              pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token sequences into a batch.

  Args:
    sequences: B lists of token ids (lengths may differ, may be empty).
    pad_id: value written after each sequence's end.
    pad_to: optional fixed T (e.g. a bucket size, so jit sees few distinct shapes); default is the
      longest sequence.
  Returns:
    (ids int32[B, T] with row b = sequences[b] then pad_id, lengths int32[B]). Rows are
    left-aligned because the model's prefill reads tokens [0, length) and the last logit at
    length - 1.
  """
  lengths = np.asarray([len(s) for s in sequences], dtype=np.int32)
  longest = int(lengths.max(initial=0))
  if pad_to is not None and pad_to < longest:
    raise ValueError(f'pad_to={pad_to} is shorter than the longest sequence ({longest} tokens)')
  ids = np.full((len(sequences), longest if pad_to is None else pad_to), pad_id, dtype=np.int32)
  for row, seq in zip(ids, sequences):
    row[:len(seq)] = seq
  return ids, lengths


class MultimodalProcessor:
  """Tokenizer + CLIP image processor + prompt format of a LLaVA-1.5 checkpoint.

  Attributes:
    tokenizer: the transformers tokenizer.
    image_processor: the numpy/PIL CLIP image processor, or None for a text-only directory.
    image_token_index: id of the <image> placeholder (32000 for llava-1.5), or None if unknown.
    num_image_tokens: copies of it per image (576 for llava-1.5), or None if unknown.
    chat_template: jinja chat template string, or None (-> the fallback LLaVA-1.5 format).
  """

  def __init__(self, tokenizer, image_processor=None, *, image_token_index: int | None = None,
               num_image_tokens: int | None = None, chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.image_token_index = image_token_index
    self.num_image_tokens = num_image_tokens
    self.chat_template = chat_template

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike, *, image_token_index: int | None = None,
                      num_image_tokens: int | None = None) -> MultimodalProcessor:
    """Loads from a local checkpoint directory (never downloads).

    image_token_index defaults to config.json's image_token_index, else the tokenizer's id of
    "<image>". num_image_tokens defaults to (image_size // patch_size)**2 (+1 for the "full"
    strategy) from config.json's vision_config, else to LlavaProcessor's formula from
    processor_config.json.
    """
    from transformers import AutoTokenizer  # Deferred: importing transformers is slow.

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise ValueError(f'checkpoint directory not found: {directory!r}')
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
      raise ValueError(f'no tokenizer files in {directory!r}: expected one of {TOKENIZER_FILES}')
    try:
      tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f'could not load the tokenizer from {directory!r}: {e}') from e

    # transformers >= 5 saves a processor's image settings nested in processor_config.json
    # ("image_processor" key) instead of preprocessor_config.json; hub checkpoints use the latter.
    processor_config = _read_json(os.path.join(directory, 'processor_config.json'))
    image_processor = None
    if (os.path.isfile(os.path.join(directory, 'preprocessor_config.json'))
        or 'image_processor' in processor_config):
      image_processor = _slow_clip_image_processor_class().from_pretrained(
          directory, local_files_only=True)

    config = _read_json(os.path.join(directory, 'config.json'))
    vocab = tokenizer.get_vocab()
    if image_token_index is None:
      # transformers >= 5 aliases image_token_id -> image_token_index; accept either spelling.
      image_token_index = config.get('image_token_index', config.get('image_token_id'))
    if image_token_index is None:
      image_token_index = vocab.get('<image>')
    elif '<image>' in vocab and vocab['<image>'] != image_token_index:
      # Otherwise "<image>" in a prompt would never become the id the model looks for.
      raise ValueError(f"image_token_index={image_token_index} but the tokenizer maps '<image>' "
                       f"to {vocab['<image>']}")
    if num_image_tokens is None:
      num_image_tokens = (num_image_tokens_from_config(config)
                          or _num_image_tokens_from_processor(processor_config, image_processor))
    return cls(tokenizer, image_processor, image_token_index=image_token_index,
               num_image_tokens=num_image_tokens,
               chat_template=_find_chat_template(directory, tokenizer))

  @property
  def bos_token_id(self) -> int | None:
    return self.tokenizer.bos_token_id

  @property
  def eos_token_id(self) -> int | None:
    return self.tokenizer.eos_token_id

  @property
  def pad_token_id(self) -> int | None:
    return self.tokenizer.pad_token_id

  def preprocess_images(self, images) -> np.ndarray:
    """Images -> pixel values float32[N, H, W, 3] (NHWC, for JAX convs).

    Args:
      images: one image or a list of N images; each a PIL image, a file path, or uint8[H, W, 3]
        (a uint8[N, H, W, 3] array is also taken as N images).
    Returns:
      The checkpoint's CLIP preprocessing (shortest-edge bicubic resize, center crop, x/255,
      (x - mean) / std), bit-identical to LlavaProcessor's pixel_values transposed from NCHW.
    """
    if self.image_processor is None:
      raise ValueError('this processor has no image processor (the checkpoint directory has no '
                       'preprocessor_config.json or processor_config.json "image_processor")')
    batched = (isinstance(images, (list, tuple))
               or (isinstance(images, np.ndarray) and images.ndim == 4))
    items = list(images) if batched else [images]
    if not items:
      raise ValueError('preprocess_images needs at least one image')
    pixels = self.image_processor([load_image(x) for x in items],
                                  return_tensors='np')['pixel_values']  # float32[N, 3, H, W]
    return np.ascontiguousarray(np.asarray(pixels, dtype=np.float32).transpose(0, 2, 3, 1))

  def format_prompt(self, question: str, *, has_image: bool = True) -> str:
    """The single-turn LLaVA-1.5 prompt, ending where the assistant's answer starts.

    With the checkpoint's chat template when it has one; otherwise
    "USER: <image>\\n{question} ASSISTANT:" ("USER: {question} ASSISTANT:" without an image).
    """
    if self.chat_template is None:
      template = FALLBACK_IMAGE_PROMPT if has_image else FALLBACK_TEXT_PROMPT
      return template.format(question=question)
    content = ([{'type': 'image'}] if has_image else []) + [{'type': 'text', 'text': question}]
    return self.tokenizer.apply_chat_template(
        [{'role': 'user', 'content': content}], chat_template=self.chat_template,
        tokenize=False, add_generation_prompt=True)

  def encode(self, text: str, *, num_images: int | None = None) -> list[int]:
    """Tokenizes text (BOS added as the tokenizer does) and expands image placeholders.

    Each image_token_index id becomes num_image_tokens copies, as LlavaProcessor does, so the
    model can scatter one image feature into each copy. Returns a list of Python ints.
    Raises ValueError if num_images is given and differs from the number of <image> in text.
    """
    ids = self.tokenizer(text)['input_ids']
    count = 0 if self.image_token_index is None else ids.count(self.image_token_index)
    if num_images is not None and count != num_images:
      raise ValueError(f'text contains {count} <image> placeholder(s) '
                       f'(id {self.image_token_index}) but num_images={num_images}')
    if count == 0:
      return [int(i) for i in ids]
    if not self.num_image_tokens:
      raise ValueError('text contains <image> but num_image_tokens is unknown: pass '
                       'num_image_tokens= to from_pretrained (no vision_config in config.json)')
    out: list[int] = []
    for i in ids:
      out.extend([int(i)] * (self.num_image_tokens if i == self.image_token_index else 1))
    return out

  def decode(self, token_ids) -> str:
    """int token ids (list or array[T]) -> text, special tokens (incl. <image>, EOS) removed."""
    return self.tokenizer.decode([int(i) for i in np.asarray(token_ids).reshape(-1)],
                                 skip_special_tokens=True)

  def pad_batch(self, sequences: Sequence[Sequence[int]], pad_id: int | None = None, *,
                pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pad_batch() with pad_id defaulting to the tokenizer's pad id, else EOS, else 0.

    Pad values are never attended (lengths mask them), so any valid id will do.
    """
    if pad_id is None:
      pad_id = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
    return pad_batch(sequences, pad_id, pad_to=pad_to)
