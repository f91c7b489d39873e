"""Tiny random Hugging Face checkpoints, built with transformers at run time (never downloaded).

Weights are redrawn larger than transformers' init (std 0.02) so that logits spread over several
units and a 1e-4 comparison means something.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from mmspec_jax.data.processing import LLAVA_CHAT_TEMPLATE

# The paper pair's vocabulary layout, shrunk (LLaMA 32000 / <image> 32000 / <pad> 32001 / 32064):
BASE_VOCAB = 128  # The base tokenizer's ids, and a draft's whole vocabulary.
IMAGE_TOKEN = BASE_VOCAB  # <image>, a special token added past the base vocabulary...
PAD_TOKEN = BASE_VOCAB + 1  # ... and <pad> after it: both out of a draft's range.
TEXT_VOCAB = 136  # The target's text vocabulary, padded past both.


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.15):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if 'norm' in name and name.endswith('weight'):
        param.copy_(1.0 + 0.1 * noise)
      elif 'embed' in name:
        param.copy_(noise * 0.5)
      else:
        param.copy_(noise * std)
  return model.eval()


def llama_text_config(*, num_kv_heads=2, tied=False, vocab_size=TEXT_VOCAB, rope=None,
                      num_layers=2, **extra):
  """A tiny LLaMA's config; `extra` goes to transformers.LlamaConfig (e.g. pad_token_id)."""
  return transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=12,
      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
      rope_parameters=rope or {'rope_type': 'default', 'rope_theta': 10000.0}, **extra)


def tiny_llama(seed=0, **kwargs) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  return _randomize(transformers.LlamaForCausalLM(llama_text_config(**kwargs)), seed)


def tiny_llava(seed=0, *, num_kv_heads=2, tied=False, feature_layer=-2, strategy='default',
               num_layers=2) -> transformers.LlavaForConditionalGeneration:
  """A tiny LLaVA-1.5 in the paper's layout: text vocabulary TEXT_VOCAB, <image> IMAGE_TOKEN,
  <pad> PAD_TOKEN (28 pixel images, 4 image tokens)."""
  vision = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      image_size=28, patch_size=14, layer_norm_eps=1e-5, hidden_act='quick_gelu')
  config = transformers.LlavaConfig(
      vision_config=vision, text_config=llama_text_config(num_kv_heads=num_kv_heads, tied=tied,
                                                          num_layers=num_layers,
                                                          pad_token_id=PAD_TOKEN),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
      vision_feature_select_strategy=strategy, projector_hidden_act='gelu',
      tie_word_embeddings=tied)
  config.pad_token_id = PAD_TOKEN  # As llava-hf's configs carry it (32001).
  torch.manual_seed(seed)
  model = _randomize(transformers.LlavaForConditionalGeneration(config), seed)
  with torch.no_grad():
    # A trained LLaVA never emits <image>, <pad> or its padding rows: their logits stay far below
    # the best base token's, so greedy decoding keeps to the ids a base-vocabulary draft has.
    model.lm_head.weight[BASE_VOCAB:] *= 0.01
  return model


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: str, num_shards: int):
  names = sorted(tensors)
  if num_shards == 1:
    save_file({n: tensors[n].contiguous() for n in names}, os.path.join(out_dir,
                                                                        'model.safetensors'))
    return
  weight_map = {}
  for shard, chunk in enumerate(np.array_split(np.array(names), num_shards)):
    file = f'model-{shard + 1:05d}-of-{num_shards:05d}.safetensors'
    save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(out_dir, file))
    weight_map.update({n: file for n in chunk})
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)


def save(model, out_dir: str, *, layout: str = 'legacy', num_shards: int = 1) -> str:
  """Saves `model` with its config, in the on-disk `legacy` key layout (what save_pretrained
  writes) or the `new` in-memory one, as one file or `num_shards` indexed shards."""
  model.save_pretrained(out_dir)
  legacy_path = os.path.join(out_dir, 'model.safetensors')
  if layout == 'legacy':
    tensors = load_file(legacy_path)
  elif layout == 'new':
    tensors = {k: v for k, v in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
      tensors.pop('lm_head.weight', None)
  else:
    raise ValueError(layout)
  os.remove(legacy_path)
  _write_shards(tensors, out_dir, num_shards)
  return out_dir


def llava_prompts(rng: np.random.RandomState, num_image_tokens: int, lengths=(3, 9)):
  """Two prompts of different lengths, each with one image's placeholders after the BOS."""
  rows = []
  for text_length in lengths:
    text = rng.randint(3, 120, size=text_length).tolist()
    rows.append([1] + [IMAGE_TOKEN] * num_image_tokens + text)
  return rows


def tiny_tokenizer():
  """A word-level fast tokenizer: <unk> <s> </s> <pad> <image>, then a few words; BOS first."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(['<unk>', '<s>', '</s>', '<pad>', '<image>', 'hello',
                                       'world'])}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A',
                                                           special_tokens=[('<s>', 1)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
      pad_token='<pad>', additional_special_tokens=['<image>'])


def word_tokenizer(*, swap: tuple[int, int] | None = None):
  """A word-level fast tokenizer in the paper's layout. The base vocabulary, ids 0..BASE_VOCAB-1:
  <unk> <s> </s>, the chat template's words USER: ASSISTANT:, then wN at id N (w5 .. w127); then
  the added special tokens <image> = IMAGE_TOKEN and <pad> = PAD_TOKEN. So `vocab_size` is
  BASE_VOCAB and `len()` BASE_VOCAB + 2, as LLaVA-1.5's 32000 and 32002. BOS is prepended.
  `swap=(i, j)` exchanges the tokens at two ids (an incompatible tokenizer); ids past the base
  vocabulary swap the added tokens (`swap=(IMAGE_TOKEN, PAD_TOKEN)`: <pad> first, then <image>).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  words = ['<unk>', '<s>', '</s>', 'USER:', 'ASSISTANT:']
  words += [f'w{i}' for i in range(len(words), BASE_VOCAB)] + ['<image>', '<pad>']
  if swap is not None:
    i, j = swap
    words[i], words[j] = words[j], words[i]
  base, added = words[:BASE_VOCAB], words[BASE_VOCAB:]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(base)}, unk_token='<unk>'))
  tokenizer.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in added])
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.decoder = decoders.WordPiece()  # Joins words with spaces.
  tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A',
                                                           special_tokens=[('<s>', 1)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
      pad_token='<pad>', additional_special_tokens=['<image>'])


def save_llava_processor(tokenizer, out_dir: str):
  """A LlavaProcessor for tiny_llava (28x28 images, 4 image tokens) with the chat template."""
  image_processor = transformers.CLIPImageProcessorPil(size={'shortest_edge': 28},
                                                       crop_size={'height': 28, 'width': 28})
  transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
      vision_feature_select_strategy='default', num_additional_image_tokens=1,
      chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(out_dir)


def save_language_draft(llava, out_dir: str) -> str:
  """The LLaVA's language model cut to the base vocabulary (`llama_from_llava`) as a LLaMA draft
  directory, with the full word tokenizer (<image> and <pad> past the draft's ids)."""
  save(llama_from_llava(llava), out_dir)
  word_tokenizer().save_pretrained(out_dir)
  return out_dir


def llama_from_llava(llava, vocab_size: int = BASE_VOCAB) -> transformers.LlamaForCausalLM:
  """A LlamaForCausalLM with a LLaVA's language model weights cut to its first `vocab_size` ids
  (embedding and LM-head rows): the paper's layout, a text-only draft with the base vocabulary
  that agrees with the target's greedy choice whenever the prompt has no image (tiny_llava's
  greedy choice is never an id past the base vocabulary)."""
  config = copy.deepcopy(llava.config.text_config)
  config.vocab_size = vocab_size
  if config.pad_token_id is not None and config.pad_token_id >= vocab_size:
    config.pad_token_id = None  # <pad> is past the draft's ids.
  model = transformers.LlamaForCausalLM(config)
  state = {f'model.{k}': v for k, v in llava.model.language_model.state_dict().items()}
  state['model.embed_tokens.weight'] = state['model.embed_tokens.weight'][:vocab_size]
  state['lm_head.weight'] = llava.lm_head.weight[:vocab_size]
  model.load_state_dict(state)
  return model.eval()
