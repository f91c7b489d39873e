"""A small BPE tokenizer for the world's text, and the LLaVA processor around it.

The tokenizer is SentencePiece-like, as LLaMA's: a Metaspace pre-tokenizer turns spaces into "▁"
word prefixes (and the first word of a text gets one too), BPE merges within words, and the
Metaspace decoder turns "▁" back into spaces and drops the first one, so that
decode(encode(s)) == s for any text without leading or doubled spaces made of characters the
tokenizer was trained on (all world text). Characters never seen in training become <unk>.

Ids: <unk> 0, <s> 1 (BOS, prepended by the post-processor), </s> 2 (EOS), <pad> 3, <image> 4
(a special added token, never split). The chat template is llava-hf's LLaVA-1.5 one, so
"USER: <image>\\n{question} ASSISTANT:" is the decoding prompt, as for the real checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

SPECIAL_TOKENS = ('<unk>', '<s>', '</s>', '<pad>', '<image>')
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))
_MIN_VOCAB = 64  # Specials plus the world's ~60 characters: below this BPE has no merges left.


def _llava_chat_template() -> str:
  # Imported on use: mmspec_jax.testing.tiny_hf imports torch, which only tokenizer building
  # (not the rest of the world generator, nor training) should pay for.
  from mmspec_jax.data.processing import LLAVA_CHAT_TEMPLATE
  return LLAVA_CHAT_TEMPLATE


def _without_specials(texts: Iterable[str]) -> Iterable[str]:
  # Placeholders in LLaVA text are special tokens, not text to learn merges from.
  for text in texts:
    for token in SPECIAL_TOKENS:
      text = text.replace(token + '\n', '').replace(token, '')
    yield text


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None = None,
                    vocab_size: int = 512):
  """Trains a BPE tokenizer on texts and returns it (saved to out_dir when given).

  Args:
    texts: the training texts (task texts in chat form, corpus documents); "<image>" and the
      other special tokens in them are removed before training.
    out_dir: where to save it in Hugging Face format (tokenizer.json, tokenizer_config.json, ...),
      or None to only return it.
    vocab_size: the vocabulary size including the 5 special tokens (the result is smaller only
      if the texts run out of merges).
  Returns:
    A transformers PreTrainedTokenizerFast with bos/eos/unk/pad set, "<image>" as an additional
    special token and the LLaVA-1.5 chat template.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  if vocab_size < _MIN_VOCAB:
    raise ValueError(f'vocab_size must be at least {_MIN_VOCAB}, got {vocab_size}')
  texts = [t for t in _without_specials(texts) if t]
  if not texts:
    raise ValueError('train_tokenizer needs at least one non-empty text')
  tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
  # prepend_scheme='first': only a text's first word gets a "▁" added, as in LLaMA; the other
  # words have theirs from the space before them.
  metaspace = dict(replacement='\u2581', prepend_scheme='first', split=True)
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
  tokenizer.decoder = decoders.Metaspace(**metaspace)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  for token_id, token in enumerate(SPECIAL_TOKENS):
    if tokenizer.token_to_id(token) != token_id:
      raise AssertionError(f'{token} got id {tokenizer.token_to_id(token)}, not {token_id}')
  tokenizer.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', BOS_ID)])
  wrapped = PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
      pad_token='<pad>', additional_special_tokens=['<image>'],
      clean_up_tokenization_spaces=False)  # Cleanup would rewrite " ." and break round trips.
  wrapped.chat_template = _llava_chat_template()
  if out_dir is not None:
    wrapped.save_pretrained(os.fspath(out_dir))
  return wrapped


def write_processor(tokenizer_dir_or_obj, out_dir: str | os.PathLike, *, image_size: int = 64,
                    patch_size: int = 8):
  """Saves a transformers LlavaProcessor for the world's tiny LLaVA into out_dir.

  The image processor is CLIP's (PIL backend): resize the shortest edge to image_size, center
  crop image_size x image_size, scale to [0, 1], normalize with the OpenAI CLIP mean/std. With
  the 'default' strategy and one additional (CLS) token, each image becomes
  (image_size // patch_size)**2 image tokens, which MultimodalProcessor.from_pretrained(out_dir)
  reads back from processor_config.json.

  Args:
    tokenizer_dir_or_obj: a tokenizer directory or a transformers tokenizer.
    out_dir: the processor directory (tokenizer files, processor_config.json, chat template).
    image_size: the vision tower's input side in pixels.
    patch_size: the vision tower's patch side; must divide image_size.
  Returns:
    The LlavaProcessor.
  """
  import transformers
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

  if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
    raise ValueError(f'patch_size must divide image_size, got image_size={image_size}, '
                     f'patch_size={patch_size}')
  tokenizer = tokenizer_dir_or_obj
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer),
                                                           local_files_only=True)
  if tokenizer.convert_tokens_to_ids('<image>') in (None, tokenizer.unk_token_id):
    raise ValueError('the tokenizer has no "<image>" token; LLaVA needs it as a special token')
  # The numpy/PIL backend (no torchvision), as processing.MultimodalProcessor loads it.
  image_processor = transformers.CLIPImageProcessorPil(
      size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size},
      image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
  processor = transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
      vision_feature_select_strategy='default', num_additional_image_tokens=1,
      chat_template=_llava_chat_template())
  processor.save_pretrained(os.fspath(out_dir))
  return processor
