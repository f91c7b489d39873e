"""Deterministic, resumable batches from a random-access data source, the same global batches
on any number of hosts.

  it = make_iterator('pretrain', load_source('lm1b', data_dir), tokenizer, batch_size=8,
                     seq_len=1024, seed=0, process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)            # dict of numpy arrays, see make_iterator()
  state = it.get_state()      # JSON-serializable; save it with the checkpoint
  it.set_state(state)         # the next batches are those an uninterrupted run would produce

Order: one global stream of examples, epoch after epoch, each epoch a permutation of range(N)
drawn by numpy's Generator seeded with (seed, epoch). A global batch of S rows is S row *slots*;
slot s reads entries s, s + S, s + 2S, ... of the stream. Host i of P holds the slots
[i * S / P, (i + 1) * S / P), each batch_size = S / P of them. A slot's rows depend on the slot
alone, never on which host reads it or how many hosts there are: so the global batches are the
same on 1 host or 64, and a state saved by P hosts resumes exactly on P' (every host takes the
cursors of its own slots from the merged state, see `merge_states`).

Rows: a conversation row (chat, multimodal) is the slot's next conversation. A packed text row
is filled to exactly seq_len pairs with the slot's next documents, the last one cut at the row's
end and continued in the slot's next row (each piece its own segment, positions from 0: see
packing.py).

State: per slot a cursor (entries of the slot read, pairs of the current document already in a
returned row), a handful of integers; on resume the current document is re-read and
re-tokenized. A background thread prefetches a few batches ahead; the state always describes the
batches already returned, never prefetched ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from mmspec_jax.data import packing
from mmspec_jax.data.conversation import ConversationEncoder

KINDS = ('pretrain', 'chat', 'multimodal')
STATE_VERSION = 2


class Cursor(NamedTuple):
  """Where a slot stands: `entry` entries of its stream read (the next is its `entry`-th), and
  `offset` pairs of that entry's document already in returned rows (packed text only)."""
  entry: int
  offset: int


class GlobalOrder:
  """The global stream of source indices: epoch after epoch, each a seeded permutation."""

  def __init__(self, num_examples: int, seed: int, num_slots: int):
    if num_examples < 1:
      raise ValueError('the source is empty: nothing to train on')
    self.num_examples, self.seed, self.num_slots = num_examples, seed, num_slots
    self._cached: dict[int, np.ndarray] = {}  # The current and the next epoch's permutations.

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cached:
      if len(self._cached) >= 2:
        self._cached.pop(min(self._cached))
      self._cached[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_examples)
    return self._cached[epoch]

  def index(self, slot: int, entry: int) -> int:
    """The source index of slot `slot`'s `entry`-th example."""
    epoch, position = divmod(slot + self.num_slots * entry, self.num_examples)
    return int(self.permutation(epoch)[position])


def _text(example: Any, key: str) -> str:
  if isinstance(example, (str, bytes)):  # A plain list of strings is a source too.
    value = example
  else:
    if key not in example:
      raise ValueError(f'example has no {key!r} field (text_key); it has {sorted(example)}')
    value = example[key]
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _record_id(example: Any) -> str:
  value = example.get('id', '?') if hasattr(example, 'get') else '?'
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _image(example: Any) -> np.ndarray:
  """uint8[H, W, 3]: the record's image, or a 1x1 black placeholder for an image-less record
  that has none."""
  if 'image' in example:
    return np.asarray(example['image'])
  if example.get('has_image', False):
    raise ValueError(f'record {_record_id(example)!r} has has_image=True but no "image"')
  return np.zeros((1, 1, 3), np.uint8)


class PackedTextBatcher:
  """Packed pretraining rows: each document is tokenized (BOS as the tokenizer adds it, then EOS)
  and a slot's documents fill its row to seq_len pairs, the last one cut at the row's end."""

  def __init__(self, source: Sequence[Any], order: GlobalOrder, tokenizer, *, text_key: str,
               seq_len: int, pad_id: int):
    if tokenizer.eos_token_id is None:
      raise ValueError('the tokenizer has no EOS token; packed documents must end with one')
    self.source, self.order, self.tokenizer, self.text_key = source, order, tokenizer, text_key
    self.seq_len, self.pad_id = seq_len, pad_id
    self._current: dict[int, tuple[int, packing.Pairs]] = {}  # slot -> its document, tokenized

  def pairs(self, slot: int, index: int) -> packing.Pairs:
    if self._current.get(slot, (None,))[0] != index:
      ids = list(self.tokenizer(_text(self.source[index], self.text_key))['input_ids'])
      if not ids or ids[-1] != self.tokenizer.eos_token_id:  # Unless the tokenizer added it.
        ids.append(self.tokenizer.eos_token_id)
      self._current[slot] = (index, packing.to_pairs(ids))
    return self._current[slot][1]

  def next_row(self, slot: int, cursor: Cursor) -> tuple[dict[str, np.ndarray], Cursor]:
    packer = packing.RowPacker(1, self.seq_len, self.pad_id)
    room, empty_in_a_row = self.seq_len, 0
    while room:
      pairs = self.pairs(slot, self.order.index(slot, cursor.entry))
      piece = pairs.slice(cursor.offset, cursor.offset + room)
      packer.add(piece)
      room -= len(piece)
      cursor = Cursor(cursor.entry, cursor.offset + len(piece))
      if cursor.offset == len(pairs):
        cursor = Cursor(cursor.entry + 1, 0)
      empty_in_a_row = 0 if len(pairs) else empty_in_a_row + 1
      if empty_in_a_row > self.order.num_examples:
        raise ValueError('no document of the source has two or more tokens: nothing to train on')
    return packer.take(), cursor

  def next_batch(self, slots: Sequence[int], cursors: Sequence[Cursor]):
    rows, advanced = zip(*(self.next_row(s, c) for s, c in zip(slots, cursors)))
    return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}, list(advanced)


class ConversationBatcher:
  """One conversation a row; with `preprocess_images`, also the rows' images."""

  def __init__(self, source: Sequence[Any], order: GlobalOrder, encoder: ConversationEncoder, *,
               seq_len: int, pad_id: int,
               preprocess_images: Callable[[list[np.ndarray]], np.ndarray] | None = None):
    self.source, self.order, self.encoder = source, order, encoder
    self.seq_len, self.pad_id = seq_len, pad_id
    self.preprocess_images = preprocess_images

  def _check_image_tokens(self, ids: np.ndarray, has_image: bool, example: Any):
    # The model writes exactly one image's features into the image token ids of a row, so a
    # row must hold all of them or none.
    where = np.flatnonzero(ids == self.encoder.image_token_id)
    expected = self.encoder.num_image_tokens if has_image else 0
    if len(where) != expected:
      raise ValueError(f'record {_record_id(example)!r}: has_image={has_image} but its text has '
                       f'{len(where)} image token ids (expected {expected}: one '
                       f'<image> placeholder per image)')
    if len(where) and where[-1] >= self.seq_len:
      raise ValueError(f'record {_record_id(example)!r}: its image tokens end at position '
                       f'{where[-1]}, past seq_len={self.seq_len}; use a longer seq_len')

  def next_batch(self, slots: Sequence[int], cursors: Sequence[Cursor]):
    indices = [self.order.index(slot, cursor.entry) for slot, cursor in zip(slots, cursors)]
    cursors = [Cursor(cursor.entry + 1, 0) for cursor in cursors]
    # TFDS data sources read a list of records in parallel; lists and other sequences one by one.
    getitems = getattr(self.source, '__getitems__', None)
    examples = getitems(indices) if getitems else [self.source[i] for i in indices]
    pairs = []
    for example in examples:
      if 'conversations' not in example:
        raise ValueError(f'record {_record_id(example)!r} has no "conversations" field; it has '
                         f'{sorted(example)}')
      ids, mask = self.encoder(example['conversations'])
      if self.preprocess_images is not None:
        self._check_image_tokens(ids, bool(example.get('has_image', False)), example)
      pairs.append(packing.to_pairs(ids, mask))
    batch = packing.one_per_row(pairs, self.seq_len, self.pad_id)
    if self.preprocess_images is not None:
      has_image = np.asarray([bool(e.get('has_image', False)) for e in examples], np.bool_)
      # Records without an image carry a placeholder (LlavaConversations stores a 1x1 black
      # image); it goes through the same preprocessing for a uniform shape and is then zeroed.
      images = np.array(self.preprocess_images([_image(e) for e in examples]), np.float32)
      if images.ndim != 4 or images.shape[0] != len(slots) or images.shape[-1] != 3:
        raise ValueError(f'preprocess_images returned shape {images.shape}; expected '
                         f'[{len(slots)}, H, W, 3]')
      images[~has_image] = 0.0
      batch['images'], batch['has_image'] = images, has_image
    return batch, cursors


class _Failure(NamedTuple):
  error: BaseException


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
  while not stop.is_set():
    try:
      out.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(batcher, slots, cursors, out: queue.Queue, stop: threading.Event):
  # A module-level function, not a method: the thread must not keep the iterator alive.
  try:
    while not stop.is_set():
      batch, cursors = batcher.next_batch(slots, cursors)
      if not _put(out, (batch, cursors), stop):
        return
  except BaseException as e:  # pylint: disable=broad-except  # Re-raised by __next__.
    _put(out, _Failure(e), stop)


class BatchIterator:
  """An infinite iterator of this host's batches with get_state() / set_state() (see the module
  docstring)."""

  def __init__(self, batcher, order: GlobalOrder, slots: range, *, kind: str, prefetch: int = 2):
    """Args:
      batcher: PackedTextBatcher or ConversationBatcher; its next_batch(slots, cursors) ->
        (batch, cursors) must depend on the slots and cursors alone.
      order: the GlobalOrder the batcher reads through.
      slots: this host's row slots, in row order.
      kind: recorded in the state, so a state is not restored into another kind of iterator.
      prefetch: batches computed ahead in a background thread; 0 computes them in next().
    """
    if prefetch < 0:
      raise ValueError(f'prefetch must be >= 0, got {prefetch}')
    self._batcher, self._order, self._slots = batcher, order, slots
    self._kind, self._prefetch = kind, prefetch
    self._cursors = [Cursor(0, 0) for _ in slots]  # After the last batch returned.
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch == 0:
      batch, self._cursors = self._batcher.next_batch(self._slots, self._cursors)
      return batch
    if self._thread is None:
      self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self._prefetch)
      self._thread = threading.Thread(
          target=_produce, args=(self._batcher, self._slots, self._cursors, self._queue,
                                 self._stop),
          daemon=True, name='BatchIterator-prefetch')
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, _Failure):
      self.close()  # The next call starts over from the last good cursors.
      raise item.error
    batch, self._cursors = item
    return batch

  def close(self):
    """Stops the prefetch thread (it restarts on the next __next__)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = self._stop = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
      pass

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _identity(self) -> dict[str, Any]:
    order = self._order
    return {'version': STATE_VERSION, 'kind': self._kind, 'seed': order.seed,
            'num_examples': order.num_examples, 'num_slots': order.num_slots}

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable: the identity of the order and, per slot of this host, its cursor after
    the last batch returned by next(). `merge_states` joins the hosts' states into one."""
    return {**self._identity(), 'cursors': {
        str(slot): list(cursor) for slot, cursor in zip(self._slots, self._cursors)}}

  def set_state(self, state: dict[str, Any]):
    """Continues from a get_state() (or a merge of every host's) of iterators over the same
    source, seed, kind and global batch: from this host's slots' cursors."""
    missing = sorted({'cursors', *self._identity()} - set(state))
    if missing:
      raise ValueError(f'iterator state is missing {missing}')
    for key, value in self._identity().items():
      if state[key] != value:
        hint = ('; the global batch (batch_size x hosts) must not change across a resume'
                if key == 'num_slots' else '')
        raise ValueError(f'iterator state has {key}={state[key]!r} but this iterator has '
                         f'{value!r}; a state only restores an iterator built the same way{hint}')
    absent = [slot for slot in self._slots if str(slot) not in state['cursors']]
    if absent:
      raise ValueError(f'iterator state holds no cursor for row slots {absent} (it has '
                       f'{sorted(map(int, state["cursors"]))}): merge every host\'s state '
                       'with merge_states() before saving it')
    cursors = [Cursor(*map(int, state['cursors'][str(slot)])) for slot in self._slots]
    if any(cursor.entry < 0 or cursor.offset < 0 for cursor in cursors):
      raise ValueError(f'iterator state cursors out of range: {cursors}')
    self.close()  # Drops prefetched batches: they followed the old cursors.
    self._cursors = cursors


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One state holding every host's slots, from each host's get_state(): what a checkpoint saves,
  so that any number of hosts can resume from it."""
  identities = [{k: v for k, v in state.items() if k != 'cursors'} for state in states]
  if any(identity != identities[0] for identity in identities):
    raise ValueError(f'the hosts\' iterator states differ in more than their cursors: '
                     f'{identities}')
  cursors = {}
  for state in states:
    cursors.update(state['cursors'])
  return {**identities[0], 'cursors': cursors}


def make_iterator(kind: str, source: Sequence[Any], tokenizer, *, batch_size: int, seq_len: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  image_mode: str | None = None, num_image_tokens: int | None = None,
                  image_token_id: int | None = None,
                  preprocess_images: Callable[[list[np.ndarray]], np.ndarray] | None = None,
                  text_key: str = 'text', prefetch: int = 2) -> BatchIterator:
  """This host's batch iterator over a random-access source.

  Args:
    kind: 'pretrain' (documents `source[i][text_key]`, packed), 'chat' (LLaVA conversations
      `source[i]['conversations']`, one a row, <image> dropped) or 'multimodal' (conversations
      with their images; `source[i]['image']` uint8[H, W, 3] and `source[i]['has_image']`).
    source: len() and [i] random access: load_source(...), builder.as_data_source(split), a list.
    tokenizer: a transformers tokenizer.
    batch_size: B, rows per batch on this host (the global batch is B x process_count).
    seq_len: T, tokens per row.
    seed: orders the epochs (non-negative).
    process_index, process_count: this host and the number of hosts: it reads row slots
      [process_index * B, (process_index + 1) * B) of the global batch.
    image_mode: conversation kinds only: 'drop' for chat (the default); 'expand' (default) or
      'keep' for multimodal.
    num_image_tokens: image token copies per image ('expand').
    image_token_id: the id of <image>; defaults to the tokenizer's.
    preprocess_images: multimodal only: list of B uint8[H, W, 3] -> float32[B, H', W', 3], e.g.
      MultimodalProcessor.preprocess_images.
    text_key: the text feature of a pretraining source ('text' for c4, lm1b and TextCorpus).
    prefetch: batches prepared ahead in a background thread (0: none).
  Returns:
    A BatchIterator whose batches hold inputs int32[B, T], targets int32[B, T], loss_mask
    float32[B, T], positions int32[B, T], segment_ids int32[B, T] (see packing.py), and for
    'multimodal' also images float32[B, H', W', 3] (zeros where has_image is False) and
    has_image bool[B].
  """
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f'batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, got {process_index}, '
                     f'{process_count}')
  order = GlobalOrder(len(source), int(seed), batch_size * process_count)
  slots = range(process_index * batch_size, (process_index + 1) * batch_size)
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  if kind == 'pretrain':
    if image_mode is not None or preprocess_images is not None:
      raise ValueError("kind='pretrain' reads text only; image_mode and preprocess_images do not "
                       'apply')
    batcher = PackedTextBatcher(source, order, tokenizer, text_key=text_key, seq_len=seq_len,
                                pad_id=pad_id)
  else:
    allowed = ('drop',) if kind == 'chat' else ('expand', 'keep')
    image_mode = image_mode or allowed[0]
    if image_mode not in allowed:
      raise ValueError(f'kind={kind!r} takes image_mode in {allowed}, got {image_mode!r}')
    if kind == 'chat' and preprocess_images is not None:
      raise ValueError("kind='chat' drops images; use kind='multimodal' to get them")
    if kind == 'multimodal' and preprocess_images is None:
      raise ValueError("kind='multimodal' needs preprocess_images (e.g. "
                       'MultimodalProcessor.preprocess_images)')
    encoder = ConversationEncoder(tokenizer, image_mode=image_mode,
                                  num_image_tokens=num_image_tokens, image_token_id=image_token_id)
    batcher = ConversationBatcher(source, order, encoder, seq_len=seq_len, pad_id=pad_id,
                                  preprocess_images=preprocess_images)
  return BatchIterator(batcher, order, slots, kind=kind, prefetch=prefetch)
