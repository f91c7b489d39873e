"""Tests for mmspec_jax.data.processing against transformers' LlavaProcessor, fully offline."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmspec_jax.data.processing import LLAVA_CHAT_TEMPLATE
from mmspec_jax.data.processing import MultimodalProcessor, num_image_tokens_from_config, pad_batch

IMAGE_ID = 4
SPECIALS = ['<unk>', '<s>', '</s>', '<pad>', '<image>']
WORDS = ['USER', ':', 'ASSISTANT', 'what', 'is', 'this', '?', 'and', 'that', 'hello', 'world', '.']
LLAVA_TEMPLATE = LLAVA_CHAT_TEMPLATE  # What llava-hf/llava-1.5-7b-hf ships.
CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}"
                   "{% endfor %}{% endfor %}{% if add_generation_prompt %} [bot]{% endif %}")


def make_tokenizer():
  """Word-level tokenizer: ids 0-4 are <unk> <s> </s> <pad> <image>; BOS prepended."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation()])
  tok.decoder = decoders.WordPiece()  # Joins words with spaces.
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                 unk_token='<unk>', pad_token='<pad>',
                                 additional_special_tokens=['<image>'])


def write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  from transformers import CLIPImageProcessorPil, LlavaProcessor
  root = tmp_path_factory.mktemp('ckpt')
  # LLaVA directory: saved LlavaProcessor (+ chat template) and a hand-written config.json.
  llava = root / 'llava'
  image_processor = CLIPImageProcessorPil(size={'shortest_edge': 28},
                                          crop_size={'height': 28, 'width': 28})
  # num_additional_image_tokens=1 (the CLS token) is what llava-hf's processor_config.json has;
  # with the constructor default 0 the "default" strategy would give (28/14)**2 - 1 = 3 tokens.
  LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=14,
                 vision_feature_select_strategy='default', num_additional_image_tokens=1,
                 chat_template=LLAVA_TEMPLATE).save_pretrained(llava)
  write_json(llava / 'config.json', {
      'model_type': 'llava', 'image_token_index': IMAGE_ID,
      'vision_feature_select_strategy': 'default',
      'vision_config': {'model_type': 'clip_vision_model', 'image_size': 28, 'patch_size': 14}})
  # LLaMA directory: tokenizer only, no template, no image processor.
  llama = root / 'llama'
  make_tokenizer().save_pretrained(llama)
  write_json(llama / 'config.json', {'model_type': 'llama'})
  # Tokenizer carrying its own (distinguishable) template, plus a legacy chat_template.json dir.
  custom = root / 'custom'
  tok = make_tokenizer()
  tok.chat_template = CUSTOM_TEMPLATE
  tok.save_pretrained(custom)
  legacy = root / 'legacy'
  make_tokenizer().save_pretrained(legacy)
  write_json(legacy / 'chat_template.json', {'chat_template': CUSTOM_TEMPLATE})
  # Hub layout (llava-hf): a standalone preprocessor_config.json rather than a nested one.
  image_processor.save_pretrained(legacy)
  assert (legacy / 'preprocessor_config.json').exists()
  return {'llava': str(llava), 'llama': str(llama), 'custom': str(custom), 'legacy': str(legacy),
          'root': root}


@pytest.fixture(scope='module')
def proc(dirs):
  return MultimodalProcessor.from_pretrained(dirs['llava'])


@pytest.fixture(scope='module')
def hf_proc(dirs):
  from transformers import AutoProcessor
  return AutoProcessor.from_pretrained(dirs['llava'])


def random_image(h, w, mode='RGB', seed=0):
  channels = {'RGB': 3, 'RGBA': 4, 'L': None}[mode]
  shape = (h, w) if channels is None else (h, w, channels)
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def test_defaults_from_config(proc):
  assert proc.image_token_index == IMAGE_ID
  assert proc.num_image_tokens == 4  # (28 // 14) ** 2, CLS dropped by "default".
  assert (proc.bos_token_id, proc.eos_token_id, proc.pad_token_id) == (1, 2, 3)
  assert proc.image_processor is not None and proc.chat_template is not None


def test_num_image_tokens_from_config():
  vision = {'image_size': 336, 'patch_size': 14}
  assert num_image_tokens_from_config({'vision_config': vision}) == 576
  assert num_image_tokens_from_config(
      {'vision_config': vision, 'vision_feature_select_strategy': 'full'}) == 577
  assert num_image_tokens_from_config({'model_type': 'llama'}) is None


def test_pixels_match_llava_processor(proc, hf_proc, tmp_path):
  image = random_image(45, 31)  # Non-square: exercises shortest-edge resize and center crop.
  expected = hf_proc(text='<image>', images=[image], return_tensors='np')['pixel_values']
  ours = proc.preprocess_images([image])
  assert ours.dtype == np.float32 and ours.shape == (1, 28, 28, 3)
  np.testing.assert_array_equal(ours, np.asarray(expected).transpose(0, 2, 3, 1))
  # Path, uint8 array and single-image inputs are the same pixels.
  image.save(tmp_path / 'x.png')
  np.testing.assert_array_equal(proc.preprocess_images(str(tmp_path / 'x.png')), ours)
  np.testing.assert_array_equal(proc.preprocess_images(np.asarray(image)), ours)
  np.testing.assert_array_equal(proc.preprocess_images(np.asarray(image)[None]), ours)


@pytest.mark.parametrize('mode', ['RGBA', 'L'])
def test_non_rgb_images_match_llava_processor(proc, hf_proc, mode):
  image = random_image(30, 50, mode, seed=1)
  expected = hf_proc.image_processor([image], return_tensors='np')['pixel_values']
  np.testing.assert_array_equal(proc.preprocess_images(image),
                                np.asarray(expected).transpose(0, 2, 3, 1))


def test_preprocessor_config_json_layout(dirs, proc):
  image = random_image(45, 31)
  legacy = MultimodalProcessor.from_pretrained(dirs['legacy'])
  np.testing.assert_array_equal(legacy.preprocess_images(image), proc.preprocess_images(image))


def test_batch_of_images(proc):
  out = proc.preprocess_images([random_image(40, 28), random_image(28, 60, seed=2)])
  assert out.shape == (2, 28, 28, 3)


@pytest.mark.parametrize('num_images', [1, 2])
def test_encode_matches_llava_processor(proc, hf_proc, num_images):
  prompt = proc.format_prompt('what is this ?')
  if num_images == 2:
    prompt = prompt.replace('ASSISTANT', 'and that <image> ASSISTANT')
  images = [random_image(33, 47, seed=s) for s in range(num_images)]
  expected = hf_proc(text=prompt, images=images, return_tensors='np')['input_ids'][0]
  ours = proc.encode(prompt, num_images=num_images)
  assert ours == expected.tolist()
  assert ours[0] == proc.bos_token_id
  assert ours.count(IMAGE_ID) == 4 * num_images


def test_encode_without_images(proc):
  ids = proc.encode('hello world .', num_images=0)
  assert ids == [1, 14, 15, 16]
  assert proc.decode(ids + [2]) == 'hello world.'  # Tokenizer's space clean-up before '.'.
  assert proc.decode(np.asarray(proc.encode('<image> hello'))) == 'hello'


def test_format_prompt_uses_template(dirs, proc):
  # llava-hf's template renders exactly the hard-coded LLaVA-1.5 format.
  assert proc.format_prompt('what is this?') == 'USER: <image>\nwhat is this? ASSISTANT:'
  assert proc.format_prompt('hi', has_image=False) == 'USER: hi ASSISTANT:'
  for name in ('custom', 'legacy'):  # Tokenizer template; legacy processor chat_template.json.
    p = MultimodalProcessor.from_pretrained(dirs[name])
    assert p.format_prompt('hi') == '[user]<image> hi [bot]'
    assert p.format_prompt('hi', has_image=False) == '[user] hi [bot]'


def test_format_prompt_fallback(dirs):
  p = MultimodalProcessor.from_pretrained(dirs['llama'])
  assert p.chat_template is None
  assert p.format_prompt('what is this?') == 'USER: <image>\nwhat is this? ASSISTANT:'
  assert p.format_prompt('what is this?', has_image=False) == 'USER: what is this? ASSISTANT:'


def test_text_only_directory(dirs):
  p = MultimodalProcessor.from_pretrained(dirs['llama'])
  # No config image_token_index: the tokenizer's <image> id; no vision_config: no token count.
  assert p.image_processor is None and p.image_token_index == IMAGE_ID
  assert p.num_image_tokens is None
  with pytest.raises(ValueError, match='no image processor'):
    p.preprocess_images(random_image(28, 28))
  with pytest.raises(ValueError, match='num_image_tokens is unknown'):
    p.encode('USER: <image>\nhi')
  p = MultimodalProcessor.from_pretrained(dirs['llama'], num_image_tokens=7)
  assert p.encode('<image> hello', num_images=1) == [1] + [IMAGE_ID] * 7 + [14]


def test_errors(dirs, proc):
  with pytest.raises(ValueError, match='directory not found'):
    MultimodalProcessor.from_pretrained(os.path.join(dirs['root'], 'missing'))
  empty = dirs['root'] / 'empty'
  empty.mkdir()
  write_json(empty / 'config.json', {'model_type': 'llama'})
  with pytest.raises(ValueError, match='no tokenizer files'):
    MultimodalProcessor.from_pretrained(empty)
  with pytest.raises(ValueError, match=r"maps '<image>' to 4"):
    MultimodalProcessor.from_pretrained(dirs['llava'], image_token_index=32000)
  with pytest.raises(ValueError, match=r'1 <image> placeholder\(s\).*num_images=2'):
    proc.encode(proc.format_prompt('hi'), num_images=2)
  with pytest.raises(ValueError, match='uint8'):
    proc.preprocess_images(np.zeros((28, 28, 3), np.float32))


def test_pad_batch(proc):
  ids, lengths = pad_batch([[5, 6, 7], [8], []], pad_id=0)
  assert ids.dtype == np.int32 and lengths.dtype == np.int32
  np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 1, 0])
  ids, lengths = proc.pad_batch([[5, 6], [8]], pad_to=4)  # Tokenizer's <pad> id (3).
  np.testing.assert_array_equal(ids, [[5, 6, 3, 3], [8, 3, 3, 3]])
  np.testing.assert_array_equal(lengths, [2, 1])
  with pytest.raises(ValueError, match='pad_to=1'):
    pad_batch([[1, 2]], 0, pad_to=1)


def test_converted_directory_keeps_everything_the_processor_needs(dirs, tmp_path):
  """Conversion and export copy the non-weight files; the processor must load from the copy."""
  from mmspec_jax.convert.loading import copy_tokenizer_files
  for name in ('llava', 'llama'):
    source = dirs[name]
    copy = tmp_path / name
    copy.mkdir()
    copy_tokenizer_files(source, str(copy))
    original, copied = (MultimodalProcessor.from_pretrained(d) for d in (source, str(copy)))
    prompt = original.format_prompt('what is this ?', has_image=name == 'llava')
    assert copied.format_prompt('what is this ?', has_image=name == 'llava') == prompt
    num_images = 1 if name == 'llava' else 0
    assert copied.encode(prompt, num_images=num_images) == original.encode(
        prompt, num_images=num_images)
