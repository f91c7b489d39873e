"""Tests for generating the synthetic world: files, determinism, held-out test scenes, the
tokenizer and processor, and that the data package and MultimodalProcessor read it.

The facts in the texts are tested against their scenes in test_world_text.py.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmspec_jax.data.world import Scene, generate_world, render, score, train_tokenizer
from mmspec_jax.data.world import tokenizer as world_tokenizer
from mmspec_jax.data.world.tasks import TASKS

SMALL = dict(num_train_images=30, num_test_images=6, corpus_bytes=20_000)
NUM_IMAGE_TOKENS = 64  # (64 / 8)**2.


def tree_hash(directory) -> str:
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, directory).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def load(world, name):
  with open(os.path.join(world, name), encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  out = tmp_path_factory.mktemp('world') / 'w'
  manifest = generate_world(out, seed=0, **SMALL)
  return str(out), manifest


@pytest.fixture(scope='module')
def processor(world):
  from mmspec_jax.data.processing import MultimodalProcessor
  return MultimodalProcessor.from_pretrained(os.path.join(world[0], 'tokenizer'))


def test_files_and_manifest(world):
  out, manifest = world
  assert len(os.listdir(os.path.join(out, 'images'))) == 36
  assert manifest == load(out, 'manifest.json')
  assert manifest['seed'] == 0 and manifest['num_train_images'] == 30
  assert set(manifest['versions']) >= {'numpy', 'pillow', 'tokenizers', 'transformers'}
  for split, count in (('train', 30), ('test', 6)):
    for task in TASKS:
      records = load(out, f'{split}_{task}.json')
      assert len(records) == count == manifest['records'][f'{split}_{task}.json']
      for record in records:
        assert record['task'] == task and record['id'].startswith(split)
        assert record['conversations'][0]['from'] == 'human'
        assert record['conversations'][0]['value'].startswith('<image>\n')
        image = Image.open(os.path.join(out, 'images', record['image']))
        assert image.mode == 'RGB' and image.size == (64, 64)
        # The picture is the record's scene.
        assert np.array_equal(np.asarray(image), np.asarray(render(Scene.from_json(
            record['scene']))))
  mixed = load(out, 'train_all.json')
  assert sorted(r['id'] for r in mixed) == sorted(
      r['id'] for task in TASKS for r in load(out, f'train_{task}.json'))
  assert [r['task'] for r in mixed[:12]] != sorted(r['task'] for r in mixed[:12])  # Mixed.
  with open(os.path.join(out, 'text_corpus.txt'), encoding='utf-8') as f:
    documents = f.read().split('\n\n')
  assert len(documents) == manifest['text_corpus']['documents'] and '<image>' not in documents[0]
  assert manifest['text_corpus']['bytes'] >= SMALL['corpus_bytes']


def test_test_scenes_are_held_out(world):
  out, _ = world
  key = lambda r: json.dumps(r['scene'], sort_keys=True)  # noqa: E731
  train = {key(r) for r in load(out, 'train_captioning.json')}
  test = [key(r) for r in load(out, 'test_captioning.json')]
  assert len(set(test)) == len(test) and not train & set(test)
  # Every test image has one record in each task's file.
  assert len({r['image'] for task in TASKS for r in load(out, f'test_{task}.json')}) == 6


def test_reference_answers_score_one(world):
  out, _ = world
  for task in TASKS:
    for record in load(out, f'test_{task}.json'):
      answer = record['conversations'][1]['value']
      assert score(task, answer, record) == 1.0
      if task == 'sqa':
        assert answer.startswith(f'The answer is {record["answer"]}.')
        wrong = next(l for l in 'ABCD' if l != record['answer'])
        assert score(task, f'The answer is {wrong}.', record) == 0.0


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
  out, _ = world
  generate_world(tmp_path / 'again', seed=0, **SMALL)
  generate_world(tmp_path / 'other', seed=1, **SMALL)
  assert tree_hash(tmp_path / 'again') == tree_hash(out)
  assert tree_hash(tmp_path / 'other') != tree_hash(out)
  # The first images do not depend on how many there are.
  generate_world(tmp_path / 'more', seed=0, num_train_images=31, num_test_images=6,
                 corpus_bytes=100)
  assert load(tmp_path / 'more', 'train_sqa.json')[:30] == load(out, 'train_sqa.json')
  with pytest.raises(ValueError, match='is not empty; pass overwrite=True'):
    generate_world(tmp_path / 'again', seed=0, **SMALL)
  generate_world(tmp_path / 'again', seed=0, overwrite=True, **SMALL)
  assert tree_hash(tmp_path / 'again') == tree_hash(out)


def test_generate_errors(tmp_path):
  with pytest.raises(ValueError, match='seed must be a non-negative integer'):
    generate_world(tmp_path / 'a', seed=-1)
  with pytest.raises(ValueError, match='num_train_images and num_test_images must be >= 1'):
    generate_world(tmp_path / 'a', num_test_images=0)
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'mine.txt').write_text('x')
  with pytest.raises(ValueError, match='holds no world'):
    generate_world(tmp_path / 'b', overwrite=True)


def test_tokenizer_ids_and_round_trip(world, processor):
  out, manifest = world
  tok = processor.tokenizer
  assert [tok.convert_tokens_to_ids(t) for t in ('<unk>', '<s>', '</s>', '<pad>', '<image>')] \
      == [0, 1, 2, 3, 4]
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
  assert len(tok) == manifest['vocab_size'] == 512
  from mmspec_jax.data.processing import LLAVA_CHAT_TEMPLATE
  assert processor.chat_template == LLAVA_CHAT_TEMPLATE
  texts = [t['value'] for task in TASKS for r in load(out, f'test_{task}.json')
           for t in r['conversations']]
  with open(os.path.join(out, 'text_corpus.txt'), encoding='utf-8') as f:
    texts += f.read().split('\n\n')[:50]
  for text in texts:
    ids = tok(text)['input_ids']
    assert ids[0] == 1 and 0 not in ids  # BOS first, no <unk> in world text.
    assert tok.decode(ids[1:]) == text
  assert tok('<image>\nDescribe the image.', add_special_tokens=False)['input_ids'][0] == 4
  # Whole words are single tokens: a 512 vocabulary covers the world's words.
  assert len(tok('The answer is B.', add_special_tokens=False)['input_ids']) <= 5


def test_processor_expands_images(world, processor):
  out, _ = world
  assert processor.image_token_index == 4 and processor.num_image_tokens == NUM_IMAGE_TOKENS
  prompt = processor.format_prompt('Describe the image.')
  assert prompt == 'USER: <image>\nDescribe the image. ASSISTANT:'
  ids = processor.encode(prompt, num_images=1)
  assert ids[0] == 1 and ids.count(4) == NUM_IMAGE_TOKENS
  start = ids.index(4)
  assert ids[start:start + NUM_IMAGE_TOKENS] == [4] * NUM_IMAGE_TOKENS
  pixels = processor.preprocess_images(os.path.join(out, 'images', 'test_00000.png'))
  assert pixels.shape == (1, 64, 64, 3) and pixels.dtype == np.float32
  # Against transformers' own LlavaProcessor from the same directory.
  from transformers import AutoProcessor
  hf = AutoProcessor.from_pretrained(os.path.join(out, 'tokenizer'), local_files_only=True)
  image = Image.open(os.path.join(out, 'images', 'test_00000.png'))
  reference = hf(images=image, text=prompt, return_tensors='np')
  assert reference['input_ids'][0].tolist() == ids
  np.testing.assert_allclose(reference['pixel_values'][0].transpose(1, 2, 0), pixels[0],
                             atol=1e-6)


def test_conversation_encoder_masks_answers(world, processor):
  from mmspec_jax.data.conversation import ConversationEncoder
  out, _ = world
  tok = processor.tokenizer
  encoder = ConversationEncoder(tok, image_mode='expand', num_image_tokens=NUM_IMAGE_TOKENS)
  for record in load(out, 'test_conversation.json'):
    ids, mask = encoder(record['conversations'])
    answers = [t['value'] for t in record['conversations'] if t['from'] == 'gpt']
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    spans = list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
    assert len(spans) == len(answers)
    for (start, stop), answer in zip(spans, answers):
      assert ids[stop - 1] == 2 and tok.decode(ids[start:stop - 1].tolist()) == answer
    assert ids.tolist().count(4) == NUM_IMAGE_TOKENS and not mask[ids == 4].any()
    # The first turn is exactly the decoding prompt.
    prompt = processor.encode(processor.format_prompt(
        record['conversations'][0]['value'].removeprefix('<image>\n')))
    assert ids.tolist()[:len(prompt)] == prompt
  # The language-only draft's view: no image tokens at all.
  drop_ids, _ = ConversationEncoder(tok)(load(out, 'test_sqa.json')[0]['conversations'])
  assert 4 not in drop_ids.tolist()


def test_llava_builder_reads_the_world(world, tmp_path):
  from mmspec_jax.data import builders
  out, _ = world
  builder = builders.prepare(
      'llava_conversations', tmp_path / 'tfds', json_files=os.path.join(out, 'train_all.json'),
      image_folder=os.path.join(out, 'images'),
      validation_json_files=os.path.join(out, 'test_sqa.json'))
  train, validation = builder.as_data_source('train'), builder.as_data_source('validation')
  assert len(train) == 90 and len(validation) == 6
  by_id = {r['id']: r for r in load(out, 'train_all.json')}
  example = train[0]
  record = by_id[example['id'].decode()]
  assert example['has_image'] and example['image_file'].decode() == record['image']
  np.testing.assert_array_equal(example['image'],
                                np.asarray(render(Scene.from_json(record['scene']))))
  assert [v.decode() for v in example['conversations']['value']] == [
      t['value'] for t in record['conversations']]


def test_tokenizer_and_processor_errors(tmp_path):
  with pytest.raises(ValueError, match='vocab_size must be at least 64'):
    train_tokenizer(['a b c'], vocab_size=10)
  with pytest.raises(ValueError, match='at least one non-empty text'):
    train_tokenizer(['<image>'])
  tok = train_tokenizer(['red circle blue star'] * 5, tmp_path / 'tok', vocab_size=64)
  assert (tmp_path / 'tok' / 'tokenizer.json').exists()
  with pytest.raises(ValueError, match='patch_size must divide image_size'):
    world_tokenizer.write_processor(tok, tmp_path / 'p', image_size=64, patch_size=7)
  world_tokenizer.write_processor(str(tmp_path / 'tok'), tmp_path / 'p', image_size=32,
                                  patch_size=8)
  from mmspec_jax.data.processing import MultimodalProcessor
  assert MultimodalProcessor.from_pretrained(tmp_path / 'p').num_image_tokens == 16


def test_cli(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mmspec_jax.data.world', f'--out_dir={tmp_path / "cli"}', '--seed=3',
       '--num_train_images=5', '--num_test_images=2', '--corpus_bytes=1000'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert 'images and records 7/7' in result.stderr and 'wrote' in result.stdout
  assert load(tmp_path / 'cli', 'manifest.json')['seed'] == 3
