"""Tests for mmspec_jax.data.pipeline: batches, determinism, global batches independent of the
number of hosts, and resume (on the same or another number of hosts)."""

import json
import re

import numpy as np
import pytest

from mmspec_jax.data import builders, pipeline
from data_fixtures import (IMAGE_ID, llava_records, make_documents, make_tokenizer,
                               resize_images, write_jsonl, write_llava)

B, T, N = 3, 24, 5  # Rows, tokens a row, image tokens per image.
ROW_KEYS = ('inputs', 'targets', 'loss_mask', 'positions', 'segment_ids')


@pytest.fixture(scope='module')
def tok():
  return make_tokenizer()


@pytest.fixture(scope='module')
def docs():
  return [{'text': t} for t in make_documents(40, max_words=50)]


@pytest.fixture(scope='module')
def records():
  """The 6 LLaVA records as the TFDS source decodes them, with tiny images."""
  out = []
  for k, record in enumerate(llava_records()):
    has_image = 'image' in record
    out.append({'id': record['id'].encode(), 'has_image': has_image,
                'image': np.full((3 + k, 5, 3) if has_image else (1, 1, 3), 40 * k, np.uint8),
                'conversations': {'from': [t['from'].encode() for t in record['conversations']],
                                  'value': [t['value'].encode() for t in record['conversations']]}})
  return out


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def tags(tok, batch):
  """The w<K> tag of each row's conversation (K = the record index)."""
  words = [tok.convert_ids_to_tokens(row[seg > 0].tolist())
           for row, seg in zip(batch['inputs'], batch['segment_ids'])]
  return [next(w for w in row if re.fullmatch(r'w\d+', w)) for row in words]


def test_pretrain_batches(tok, docs):
  it = pipeline.make_iterator('pretrain', docs, tok, batch_size=B, seq_len=T, seed=0)
  batch = next(it)
  assert sorted(batch) == sorted(ROW_KEYS)
  for key in ROW_KEYS:
    assert batch[key].shape == (B, T), key
  assert batch['inputs'].dtype == np.int32 and batch['loss_mask'].dtype == np.float32
  seg = batch['segment_ids']
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  assert (batch['targets'][:, :-1][same] == batch['inputs'][:, 1:][same]).all()
  assert (batch['loss_mask'] == (seg > 0)).all()
  assert (seg > 0).all()  # Every row is filled to seq_len: the last document is cut at its end.
  # Each document starts with BOS at position 0 and ends predicting EOS.
  starts = batch['inputs'][(batch['positions'] == 0) & (seg > 0)]
  assert (starts == tok.bos_token_id).sum() >= 1
  assert (batch['targets'] == tok.eos_token_id).sum() >= 1
  it.close()


def test_determinism_and_seed(tok, docs):
  def run(seed, prefetch):
    with pipeline.make_iterator('pretrain', docs, tok, batch_size=B, seq_len=T, seed=seed,
                                prefetch=prefetch) as it:
      return take(it, 6)
  first = run(0, 2)
  assert_same(first, run(0, 0))  # Prefetching changes nothing.
  assert_same(first, run(0, 3))
  other = run(1, 2)
  assert any(not np.array_equal(a['inputs'], b['inputs']) for a, b in zip(first, other))


def test_global_order_visits_each_epoch_as_a_permutation():
  from mmspec_jax.data import reading
  order = reading.GlobalOrder(6, seed=3)
  stream = [order[j] for j in range(18)]  # 3 epochs, each reshuffled.
  assert sorted(stream[:6]) == sorted(stream[6:12]) == sorted(stream[12:]) == list(range(6))
  assert len({tuple(stream[:6]), tuple(stream[6:12]), tuple(stream[12:])}) == 3
  assert stream != [reading.GlobalOrder(6, seed=4)[j] for j in range(18)]
  # grain's own global shuffle, reseeded each epoch, reads the same order.
  import grain
  assert stream == list(grain.MapDataset.range(6).shuffle(seed=3).repeat(3))


@pytest.mark.parametrize('kind', ['pretrain', 'multimodal'])
def test_worker_processes_give_the_same_batches(tok, docs, records, kind):
  # Grain's worker processes read, tokenize and preprocess: the batches and the state must not
  # depend on their number, and a resume with workers must read on from the cursors.
  kwargs = dict(batch_size=B, seq_len=T if kind == 'pretrain' else 40, seed=7)
  if kind == 'multimodal':
    kwargs.update(num_image_tokens=N, preprocess_images=resize_images)
  source = docs if kind == 'pretrain' else records
  with pipeline.make_iterator(kind, source, tok, prefetch=0, **kwargs) as it:
    expected = take(it, 6)
    state = it.get_state()
    expected += take(it, 3)
  with pipeline.make_iterator(kind, source, tok, workers=2, **kwargs) as it:
    assert_same(take(it, 6), expected[:6])
    assert it.get_state() == state
    it.set_state(state)
    assert_same(take(it, 3), expected[6:])


def _global_batches(per_host):
  """Each host's list of batches -> the global batches: rows concatenated in host order."""
  return [{key: np.concatenate([host[k][key] for host in per_host]) for key in per_host[0][k]}
          for k in range(len(per_host[0]))]


def _host_batches(kind, source, tok, num_hosts, count, global_batch=4, **kwargs):
  """The global batches `num_hosts` hosts produce: their rows concatenated in host order."""
  hosts = [pipeline.make_iterator(kind, source, tok, batch_size=global_batch // num_hosts,
                                  seed=5, process_index=i, process_count=num_hosts, **kwargs)
           for i in range(num_hosts)]
  batches = [take(it, count) for it in hosts]
  states = [it.get_state() for it in hosts]
  for it in hosts:
    it.close()
  return _global_batches(batches), pipeline.merge_states(states)


@pytest.mark.parametrize('kind', ['pretrain', 'chat'])
def test_global_batches_do_not_depend_on_the_number_of_hosts(tok, docs, records, kind):
  source, seq_len = (docs, T) if kind == 'pretrain' else (records, 64)
  one, state = _host_batches(kind, source, tok, 1, 4, seq_len=seq_len)
  for num_hosts in (2, 4):
    many, merged = _host_batches(kind, source, tok, num_hosts, 4, seq_len=seq_len)
    assert_same(many, one)
    assert merged == state


def test_hosts_see_disjoint_conversations_covering_the_epoch(tok, records):
  seen = []
  for host in range(2):
    with pipeline.make_iterator('chat', records, tok, batch_size=1, seq_len=64, seed=5,
                                process_index=host, process_count=2) as it:
      seen.append([tags(tok, b)[0] for b in take(it, 3)])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == [f'w{k}' for k in range(6)]


@pytest.mark.parametrize('kind', ['pretrain', 'chat'])
def test_a_state_saved_on_two_hosts_resumes_on_one_or_four(tok, docs, records, kind):
  source, seq_len = (docs, T) if kind == 'pretrain' else (records, 64)
  _, merged = _host_batches(kind, source, tok, 2, 3, seq_len=seq_len)
  expected, _ = _host_batches(kind, source, tok, 1, 7, seq_len=seq_len)
  for num_hosts in (1, 4):
    hosts = [pipeline.make_iterator(kind, source, tok, batch_size=4 // num_hosts, seed=5,
                                    seq_len=seq_len, process_index=i, process_count=num_hosts)
             for i in range(num_hosts)]
    for it in hosts:
      it.set_state(json.loads(json.dumps(merged)))
    resumed = [take(it, 4) for it in hosts]
    for it in hosts:
      it.close()
    assert_same(_global_batches(resumed), expected[3:])
  # One host's own state lacks the other host's slots: refused on a host that reads them.
  with pipeline.make_iterator(kind, source, tok, batch_size=2, seed=5, seq_len=seq_len,
                              process_index=0, process_count=2) as it:
    own = it.get_state()
  with pipeline.make_iterator(kind, source, tok, batch_size=2, seed=5, seq_len=seq_len,
                              process_index=1, process_count=2) as it:
    with pytest.raises(ValueError, match=r'no cursor for row slots \[2, 3\]'):
      it.set_state(own)


@pytest.mark.parametrize('kind', ['pretrain', 'chat', 'multimodal'])
def test_resume_gives_the_same_batches(tok, docs, records, kind):
  kwargs = dict(batch_size=B, seq_len=T if kind == 'pretrain' else 40, seed=7)
  if kind == 'multimodal':
    kwargs.update(num_image_tokens=N, preprocess_images=resize_images)
  source = docs if kind == 'pretrain' else records
  it = pipeline.make_iterator(kind, source, tok, **kwargs)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # Survives a JSON round trip.
  expected = take(it, 4)
  it.close()
  fresh = pipeline.make_iterator(kind, source, tok, **kwargs)
  fresh.set_state(state)
  assert_same(take(fresh, 4), expected)
  # Also after batches were prefetched past the state, on the same iterator.
  fresh.set_state(state)
  assert_same(take(fresh, 4), expected)
  fresh.close()
  if kind != 'pretrain':  # 3 batches of 3 over 6 records: the state lies in the second epoch.
    assert state['cursors'] == {str(slot): [3, 0] for slot in range(B)}


def test_resume_inside_a_cut_document(tok):
  # Long documents are cut across batches: some state must point into the middle of one.
  docs = [{'text': t} for t in make_documents(12, seed=1, max_words=120)]
  it = pipeline.make_iterator('pretrain', docs, tok, batch_size=2, seq_len=16, seed=0)
  states, batches = [], []
  for _ in range(12):
    states.append(it.get_state())
    batches.append(next(it))
  it.close()
  cut = [i for i, s in enumerate(states) if any(offset for _, offset in s['cursors'].values())]
  assert cut, states
  resumed = pipeline.make_iterator('pretrain', docs, tok, batch_size=2, seq_len=16, seed=0)
  resumed.set_state(states[cut[0]])
  assert_same(take(resumed, 12 - cut[0]), batches[cut[0]:])
  resumed.close()


def test_chat_and_multimodal_rows(tok, records):
  chat = pipeline.make_iterator('chat', records, tok, batch_size=6, seq_len=64, seed=0)
  batch = next(chat)
  chat.close()
  assert sorted(batch) == sorted(ROW_KEYS)
  assert (batch['inputs'] != IMAGE_ID).all()  # Images dropped.
  assert set(batch['segment_ids'].ravel().tolist()) == {0, 1}
  mm = pipeline.make_iterator('multimodal', records, tok, batch_size=6, seq_len=64, seed=0,
                              num_image_tokens=N, preprocess_images=resize_images)
  batch = next(mm)
  mm.close()
  assert batch['images'].shape == (6, 4, 4, 3) and batch['images'].dtype == np.float32
  assert batch['has_image'].dtype == np.bool_
  by_tag = dict(zip(tags(tok, batch), range(6)))
  for k, record in enumerate(llava_records()):
    row = by_tag[f'w{k}']
    assert batch['has_image'][row] == ('image' in record)
    assert (batch['inputs'][row] == IMAGE_ID).sum() == (N if 'image' in record else 0)
    if 'image' in record:
      np.testing.assert_allclose(batch['images'][row], 40 * k / 255.0, rtol=1e-6)
    else:
      assert (batch['images'][row] == 0).all()


def test_tfds_sources_end_to_end(tok, tmp_path):
  write_jsonl(tmp_path / 'docs.jsonl', make_documents(20))
  builders.prepare('text_corpus', tmp_path / 'tfds', files=str(tmp_path / 'docs.jsonl'))
  text = builders.load_source('text_corpus', tmp_path / 'tfds', text_key='text')
  it = pipeline.make_iterator('pretrain', text, tok, batch_size=B, seq_len=T, seed=0)
  assert next(it)['inputs'].shape == (B, T)
  it.close()
  json_path, image_folder, _ = write_llava(str(tmp_path))
  builders.prepare('llava_conversations', tmp_path / 'tfds', json_files=json_path,
                   image_folder=image_folder)
  llava = builders.load_source('llava_conversations', tmp_path / 'tfds')
  it = pipeline.make_iterator('multimodal', llava, tok, batch_size=6, seq_len=64, seed=0,
                              num_image_tokens=N, preprocess_images=resize_images)
  batch = next(it)
  it.close()
  assert batch['has_image'].sum() == 4 and (batch['inputs'] == IMAGE_ID).sum() == 4 * N
  # 'chat' drops images: they need not even be decoded.
  import tensorflow_datasets as tfds
  undecoded = builders.load_source('llava_conversations', tmp_path / 'tfds',
                                   decoders={'image': tfds.decode.SkipDecoding()})
  assert isinstance(undecoded[0]['image'], bytes)
  it = pipeline.make_iterator('chat', undecoded, tok, batch_size=6, seq_len=64, seed=0)
  assert (next(it)['inputs'] != IMAGE_ID).all()
  it.close()


def test_data_package_imports_no_model_or_training_code():
  # jax itself is allowed: grain imports it.
  import subprocess
  import sys
  code = ('import sys; import mmspec_jax.data.builders, mmspec_jax.data.pipeline; '
          'bad = [m for m in sys.modules if m.startswith(("mmspec_jax.models", '
          '"mmspec_jax.training", "mmspec_jax.decoding", "flax", "optax"))]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_errors(tok, docs, records):
  make = pipeline.make_iterator
  with pytest.raises(ValueError, match="kind must be one of"):
    make('vision', docs, tok, batch_size=B, seq_len=T, seed=0)
  with pytest.raises(ValueError, match='needs preprocess_images'):
    make('multimodal', records, tok, batch_size=B, seq_len=T, seed=0, num_image_tokens=N)
  with pytest.raises(ValueError, match=r"kind='chat' takes image_mode in \('drop',\)"):
    make('chat', records, tok, batch_size=B, seq_len=T, seed=0, image_mode='expand')
  with pytest.raises(ValueError, match='the source is empty'):
    make('chat', [], tok, batch_size=B, seq_len=T, seed=0)
  with pytest.raises(ValueError, match="no 'body' field"):
    next(make('pretrain', docs, tok, batch_size=B, seq_len=T, seed=0, text_key='body'))
  # Image tokens cut off by seq_len would leave the model a partial image.
  with pytest.raises(ValueError, match='past seq_len=6'):
    next(make('multimodal', records, tok, batch_size=6, seq_len=6, seed=0, num_image_tokens=N,
              preprocess_images=resize_images, prefetch=0))
  it = make('pretrain', docs, tok, batch_size=B, seq_len=T, seed=0)
  state = it.get_state()
  other = make('pretrain', docs, tok, batch_size=B, seq_len=T, seed=1)
  with pytest.raises(ValueError, match='state has seed=0 but this iterator has 1'):
    other.set_state(state)
  with pytest.raises(ValueError, match=r"missing \['cursors'\]"):
    it.set_state({k: v for k, v in state.items() if k != 'cursors'})
  wider = make('pretrain', docs, tok, batch_size=B, seq_len=T, seed=0, process_count=2)
  with pytest.raises(ValueError, match='global batch .* must not change'):
    wider.set_state(state)
