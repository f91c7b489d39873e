"""Tests for mmspec_jax.data.builders: preparing local files as array_record TFDS datasets and
reading them back by random access, fully offline."""

import os

import numpy as np
import pytest

from mmspec_jax.data import builders
from data_fixtures import llava_records, make_documents, write_jsonl, write_llava


def texts(source):
  return [source[i]['text'].decode('utf-8') for i in range(len(source))]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  docs = make_documents(30)
  write_jsonl(root / 'part-0.jsonl', docs[:18])
  write_jsonl(root / 'part-1.jsonl', docs[18:])
  data_dir = root / 'tfds'
  builder = builders.prepare('text_corpus', data_dir, config_name='jsonl',
                             files=str(root / '*.jsonl'), validation_fraction=0.25)
  return docs, root, data_dir, builder


def test_text_corpus_jsonl_with_held_out_fraction(corpus):
  docs, _, data_dir, builder = corpus
  assert builder.info.file_format.value == 'array_record'
  train = texts(builder.as_data_source('train'))
  validation = texts(builder.as_data_source('validation'))
  assert sorted(train + validation) == sorted(docs)  # Disjoint and complete.
  assert 0 < len(validation) < len(train)
  # load_source finds it by name (the only config, then by explicit config) and random-accesses.
  source = builders.load_source('text_corpus', data_dir, split='validation', text_key='text')
  assert texts(source) == validation
  assert len(builders.load_source('text_corpus/jsonl:1.0.0', data_dir)) == len(train)


def test_text_corpus_paragraphs_files_and_reuse(corpus, tmp_path):
  _, _, data_dir, _ = corpus
  (tmp_path / 'a.txt').write_text('w1 w2\nw3\n\n\n  w4 w5  \n \nw6\n')
  (tmp_path / 'b.txt').write_text('w7\n\nw8\n')
  (tmp_path / 'v.txt').write_text('w9 w10\n\nw11\n')
  kwargs = dict(files=[str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt')],
                validation_files=str(tmp_path / 'v.txt'))
  builder = builders.prepare('text_corpus', data_dir, config_name='paragraphs', **kwargs)
  assert sorted(texts(builder.as_data_source('train'))) == sorted(
      ['w1 w2\nw3', 'w4 w5', 'w6', 'w7', 'w8'])
  assert sorted(texts(builder.as_data_source('validation'))) == ['w11', 'w9 w10']
  by_file = builders.prepare(builders.TextCorpus, data_dir, config_name='files',
                             files=str(tmp_path / '[ab].txt'), document_per='file')
  assert sorted(texts(by_file.as_data_source('train'))) == [
      'w1 w2\nw3\n\n\n  w4 w5  \n \nw6', 'w7\n\nw8']
  assert list(by_file.info.splits) == ['train']
  # Preparing again with the same sources reuses; with others it refuses.
  builders.prepare('text_corpus', data_dir, config_name='paragraphs', **kwargs)
  with pytest.raises(ValueError, match='prepared from other sources'):
    builders.prepare('text_corpus', data_dir, config_name='paragraphs',
                     files=str(tmp_path / 'a.txt'))
  with pytest.raises(ValueError, match='several prepared configs'):
    builders.load_source('text_corpus', data_dir)


@pytest.fixture(scope='module')
def llava(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava')
  json_path, image_folder, pixels = write_llava(str(root))
  data_dir = root / 'tfds'
  builder = builders.prepare('llava_conversations', data_dir, json_files=json_path,
                             image_folder=image_folder)
  return builder, pixels, data_dir


def test_llava_conversations_roundtrip(llava):
  builder, pixels, data_dir = llava
  source = builders.load_source('llava_conversations', data_dir)
  assert len(source) == 6
  by_id = {source[i]['id'].decode(): source[i] for i in range(len(source))}
  for record in llava_records():
    example = by_id[record['id']]
    turns = example['conversations']
    assert [t.decode() for t in turns['from']] == [t['from'] for t in record['conversations']]
    assert [t.decode() for t in turns['value']] == [t['value'] for t in record['conversations']]
    image = example['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    if 'image' in record:
      assert example['has_image'] and example['image_file'].decode() == record['image']
      with __import__('PIL.Image').Image.open(os.path.join(data_dir, '..', 'images',
                                                           record['image'])) as f:
        assert image.shape[:2] == (f.height, f.width)
      if pixels[record['id']] is not None:
        np.testing.assert_array_equal(image, pixels[record['id']])
    else:  # No image: a 1x1 black placeholder and has_image False.
      assert not example['has_image'] and example['image_file'] == b''
      np.testing.assert_array_equal(image, np.zeros((1, 1, 3), np.uint8))
  assert builder.info.features['has_image'].np_dtype == np.bool_


def test_llava_held_out_fraction(tmp_path):
  json_path, image_folder, _ = write_llava(str(tmp_path))
  builder = builders.prepare('llava_conversations', tmp_path / 'tfds', json_files=json_path,
                             image_folder=image_folder, validation_fraction=0.5)
  ids = [e['id'].decode() for split in ('train', 'validation')
         for e in builder.as_data_source(split)]
  assert sorted(ids) == [f'r{k}' for k in range(6)]


def test_missing_image_names_the_file(tmp_path):
  json_path, image_folder, _ = write_llava(str(tmp_path))
  os.remove(os.path.join(image_folder, 'b', 'r2.jpg'))
  with pytest.raises(ValueError, match=r'image file not found: .*b/r2\.jpg .*id \'r2\''):
    builders.prepare('llava_conversations', tmp_path / 'tfds', json_files=json_path,
                     image_folder=image_folder)
  with pytest.raises(ValueError, match='no image_folder was given'):
    builders.prepare('llava_conversations', tmp_path / 'tfds', config_name='x',
                     json_files=json_path)


def test_source_and_dataset_errors(tmp_path, corpus):
  _, _, data_dir, _ = corpus
  with pytest.raises(ValueError, match=r"no file matches '.*nope/\*\.jsonl'"):
    builders.prepare('text_corpus', tmp_path, files=str(tmp_path / 'nope' / '*.jsonl'))
  with pytest.raises(ValueError, match='no source files given'):
    builders.prepare('text_corpus', tmp_path)
  with pytest.raises(ValueError, match=r"unknown source argument\(s\) \['json_files'\]"):
    builders.prepare('text_corpus', tmp_path, json_files='x')
  with pytest.raises(ValueError, match="unknown builder 'c4'"):
    builders.prepare('c4', tmp_path)
  (tmp_path / 'bad.jsonl').write_text('{"text": "w1"}\n{"body": "w2"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl line 2: no string field 'text'"):
    builders.prepare('text_corpus', tmp_path / 'tfds', files=str(tmp_path / 'bad.jsonl'))
  # A dataset that is not prepared is never downloaded: the error names it.
  with pytest.raises(ValueError, match=r"dataset 'c4/en' is not prepared in .*prepare it first"):
    builders.load_source('c4/en', data_dir)
  with pytest.raises(ValueError, match="dataset 'lm1b' is not prepared"):
    builders.load_source('lm1b', tmp_path / 'no_such_dir')
  with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'validation'\]"):
    builders.load_source('text_corpus/jsonl', data_dir, split='test')
  with pytest.raises(ValueError, match="no feature 'content'"):
    builders.load_source('text_corpus/jsonl', data_dir, text_key='content')
