"""Shared test data for the tests of mmspec_jax.data (no tests here): a tiny word-level tokenizer,
JSONL/plain-text corpora and a 6-record LLaVA JSON with small PNG images, all in tmp dirs."""

import json
import os

import numpy as np
from PIL import Image

IMAGE_ID = 4
SPECIALS = ['<unk>', '<s>', '</s>', '<pad>', '<image>']
WORDS = ['USER', 'ASSISTANT', ':', '?', '.', 'what', 'is', 'in', 'the', 'image', 'a', 'cat',
         'dog', 'it', 'red', 'blue', 'and', 'which', 'answer', 'yes', 'no', 'describe', 'color']
FILLER = [f'w{i}' for i in range(300)]  # Document words; w<K> also tags conversation K.


def make_tokenizer():
  """Word-level fast tokenizer: ids 0-4 are <unk> <s> </s> <pad> <image>; BOS prepended."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + FILLER)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation()])
  tok.decoder = decoders.WordPiece(cleanup=False)  # Joins words with spaces.
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                 unk_token='<unk>', pad_token='<pad>',
                                 additional_special_tokens=['<image>'])


def make_documents(num_documents: int, seed: int = 0, max_words: int = 40) -> list[str]:
  """Distinct documents of 1..max_words filler words (document k starts with w<k>)."""
  rng = np.random.default_rng(seed)
  docs = []
  for k in range(num_documents):
    words = rng.choice(FILLER, size=int(rng.integers(1, max_words + 1))).tolist()
    docs.append(' '.join([FILLER[k]] + words))
  return docs


def write_jsonl(path, texts):
  with open(path, 'w') as f:
    for text in texts:
      f.write(json.dumps({'text': text, 'meta': 'x'}) + '\n')


# The 6 LLaVA records: 4 with images (RGB PNG, RGBA PNG, RGB JPEG, grayscale PNG), 2 text-only
# (ScienceQA style). Record k's first question contains the tag word w<k>.
IMAGE_SIZES = {0: (8, 6), 1: (5, 7), 2: (16, 16), 4: (6, 6)}


def llava_records():
  def turns(k, *qa):
    out = []
    for i, (q, a) in enumerate(qa):
      out += [{'from': 'human', 'value': q + (f' w{k}' if i == 0 else '')},
              {'from': 'gpt', 'value': a}]
    return out
  return [
      {'id': 'r0', 'image': 'a/r0.png',
       'conversations': turns(0, ('<image>\nwhat is in the image ?', 'a red cat .'))},
      {'id': 'r1', 'image': 'a/r1.png',
       'conversations': turns(1, ('describe the image\n<image>', 'a blue dog and a cat .'),
                              ('what color is it ?', 'blue .'))},
      {'id': 'r2', 'image': 'b/r2.jpg',
       'conversations': turns(2, ('<image>\nis it a dog ?', 'no .'), ('is it a cat ?', 'yes .'),
                              ('which color ?', 'red and blue .'))},
      {'id': 'r3', 'conversations': turns(3, ('which answer is red ?', 'the answer is a .'))},
      {'id': 'r4', 'image': 'r4.png',
       'conversations': turns(4, ('<image>\ndescribe the image .', 'a cat in the image .'))},
      {'id': 'r5', 'conversations': turns(5, ('is the cat red ?', 'yes .'),
                                          ('is the dog blue ?', 'no .'))},
  ]


def write_llava(root) -> tuple[str, str, dict[str, np.ndarray]]:
  """Writes root/llava.json and root/images/...; returns (json path, image folder, the RGB
  pixels each record's image should decode to, by id)."""
  images = os.path.join(root, 'images')
  expected = {}
  for k, (w, h) in IMAGE_SIZES.items():
    record = llava_records()[k]
    path = os.path.join(images, record['image'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(k)
    if k == 1:  # RGBA: stored composited on white.
      rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
      Image.fromarray(rgba, 'RGBA').save(path)
      expected[record['id']] = None  # Checked for shape only, not PIL's compositing rounding.
    elif k == 2:  # JPEG: stored as the file's own bytes.
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
      with Image.open(path) as f:
        expected[record['id']] = np.asarray(f.convert('RGB'))
    elif k == 4:  # Grayscale: converted to RGB.
      gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
      Image.fromarray(gray, 'L').save(path)
      expected[record['id']] = np.repeat(gray[..., None], 3, axis=-1)
    else:
      rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(rgb).save(path)
      expected[record['id']] = rgb
  json_path = os.path.join(root, 'llava.json')
  with open(json_path, 'w') as f:
    json.dump(llava_records(), f)
  return json_path, images, expected


def resize_images(images, size: int = 4) -> np.ndarray:
  """A stand-in for MultimodalProcessor.preprocess_images: uint8[H, W, 3] list ->
  float32[N, size, size, 3] in [0, 1]."""
  return np.stack([np.asarray(Image.fromarray(np.asarray(x, np.uint8)).resize((size, size)),
                              np.float32) / 255.0 for x in images])
