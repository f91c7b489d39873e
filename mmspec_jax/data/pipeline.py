"""Deterministic, resumable, per-host-sharded batches from a random-access data source.

  it = make_iterator('pretrain', load_source('lm1b', data_dir), tokenizer, batch_size=8,
                     seq_len=1024, seed=0, process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)            # dict of numpy arrays, see make_iterator()
  state = it.get_state()      # JSON-serializable; save it with the checkpoint
  it.set_state(state)         # the next batches are those an uninterrupted run would produce

Order: epoch e visits a permutation of range(N) drawn by numpy's Generator seeded with
(seed, e), cut to a multiple of process_count; host i takes entries i, i + process_count, ...,
so hosts see disjoint examples and all take the same number of batches per epoch. Epochs never
end: the iterator is infinite. The permutation is materialized (8 bytes per example per host);
that is fine for LLaVA-sized sets and lm1b, not for C4's 365M documents.

State: a cursor (epoch, position in this host's order, piece of that document) pointing at the
first piece not yet in a returned batch. For packed text this is the packing leftover: the piece
that did not fit in the last batch and the rest of its document are re-read and re-tokenized from
the source on resume, so the state stays a handful of integers. A background thread prefetches a
few batches ahead; the state always describes the batches already returned, never prefetched ones.
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
STATE_VERSION = 1


class Cursor(NamedTuple):
  epoch: int
  position: int  # Index into this host's order of the epoch.
  piece: int  # First piece of that document not yet in a batch (packed text only).


class EpochOrder:
  """This host's visiting order over a source of num_examples, one permutation per epoch."""

  def __init__(self, num_examples: int, seed: int, process_index: int, process_count: int):
    self.num_examples, self.seed = num_examples, seed
    self.process_index, self.process_count = process_index, process_count
    # Every host takes the same count per epoch, so hosts stay in step across epochs.
    self.epoch_length = num_examples // process_count
    if self.epoch_length == 0:
      raise ValueError(f'the source has {num_examples} examples, fewer than process_count='
                       f'{process_count}: some hosts would get none')
    self._cached: tuple[int, np.ndarray] | None = None

  def indices(self, epoch: int) -> np.ndarray:
    """int64[epoch_length]: source indices this host visits in `epoch`, in order."""
    if self._cached is None or self._cached[0] != epoch:
      permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      usable = permutation[:self.epoch_length * self.process_count]
      self._cached = (epoch, usable[self.process_index::self.process_count])
    return self._cached[1]

  def index(self, cursor: Cursor) -> int:
    return int(self.indices(cursor.epoch)[cursor.position])

  def advance(self, cursor: Cursor) -> Cursor:
    """The cursor at the start of the next example."""
    if cursor.position + 1 < self.epoch_length:
      return Cursor(cursor.epoch, cursor.position + 1, 0)
    return Cursor(cursor.epoch + 1, 0, 0)


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
  and its pieces are packed into rows, first fit (see packing.py)."""

  def __init__(self, source: Sequence[Any], order: EpochOrder, tokenizer, *, text_key: str,
               batch_size: int, seq_len: int, pad_id: int):
    if tokenizer.eos_token_id is None:
      raise ValueError('the tokenizer has no EOS token; packed documents must end with one')
    self.source, self.order, self.tokenizer, self.text_key = source, order, tokenizer, text_key
    self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
    self._last: tuple[int, list[packing.Pairs]] | None = None  # The document cut by a batch end.

  def pieces(self, index: int) -> list[packing.Pairs]:
    if self._last is None or self._last[0] != index:
      ids = list(self.tokenizer(_text(self.source[index], self.text_key))['input_ids'])
      if not ids or ids[-1] != self.tokenizer.eos_token_id:  # Unless the tokenizer added it.
        ids.append(self.tokenizer.eos_token_id)
      self._last = (index, packing.split_pieces(packing.to_pairs(ids), self.seq_len))
    return self._last[1]

  def next_batch(self, cursor: Cursor) -> tuple[dict[str, np.ndarray], Cursor]:
    packer = packing.RowPacker(self.batch_size, self.seq_len, self.pad_id)
    empty_in_a_row = 0
    while True:
      pieces = self.pieces(self.order.index(cursor))
      for piece in pieces[cursor.piece:]:
        if not packer.add(piece):
          return packer.take(), cursor
        cursor = cursor._replace(piece=cursor.piece + 1)
      empty_in_a_row = 0 if pieces else empty_in_a_row + 1
      if empty_in_a_row > self.order.epoch_length:
        raise ValueError('no document of the source has two or more tokens: nothing to train on')
      cursor = self.order.advance(cursor)


class ConversationBatcher:
  """One conversation a row; with `preprocess_images`, also the rows' images."""

  def __init__(self, source: Sequence[Any], order: EpochOrder, encoder: ConversationEncoder, *,
               batch_size: int, seq_len: int, pad_id: int,
               preprocess_images: Callable[[list[np.ndarray]], np.ndarray] | None = None):
    self.source, self.order, self.encoder = source, order, encoder
    self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
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

  def next_batch(self, cursor: Cursor) -> tuple[dict[str, np.ndarray], Cursor]:
    indices = []
    for _ in range(self.batch_size):
      indices.append(self.order.index(cursor))
      cursor = self.order.advance(cursor)
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
      if images.ndim != 4 or images.shape[0] != self.batch_size or images.shape[-1] != 3:
        raise ValueError(f'preprocess_images returned shape {images.shape}; expected '
                         f'[{self.batch_size}, H, W, 3]')
      images[~has_image] = 0.0
      batch['images'], batch['has_image'] = images, has_image
    return batch, cursor


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


def _produce(batcher, cursor: Cursor, out: queue.Queue, stop: threading.Event):
  # A module-level function, not a method: the thread must not keep the iterator alive.
  try:
    while not stop.is_set():
      batch, cursor = batcher.next_batch(cursor)
      if not _put(out, (batch, cursor), stop):
        return
  except BaseException as e:  # pylint: disable=broad-except  # Re-raised by __next__.
    _put(out, _Failure(e), stop)


class BatchIterator:
  """An infinite iterator of batches with get_state() / set_state() (see the module docstring)."""

  def __init__(self, batcher, order: EpochOrder, *, kind: str, prefetch: int = 2):
    """Args:
      batcher: PackedTextBatcher or ConversationBatcher; its next_batch(cursor) -> (batch,
        cursor) must depend on the cursor alone.
      order: the EpochOrder the batcher reads through.
      kind: recorded in the state, so a state is not restored into another kind of iterator.
      prefetch: batches computed ahead in a background thread; 0 computes them in next().
    """
    if prefetch < 0:
      raise ValueError(f'prefetch must be >= 0, got {prefetch}')
    self._batcher, self._order, self._kind, self._prefetch = batcher, order, kind, prefetch
    self._cursor = Cursor(0, 0, 0)  # After the last batch returned.
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch == 0:
      batch, self._cursor = self._batcher.next_batch(self._cursor)
      return batch
    if self._thread is None:
      self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self._prefetch)
      self._thread = threading.Thread(
          target=_produce, args=(self._batcher, self._cursor, self._queue, self._stop),
          daemon=True, name='BatchIterator-prefetch')
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, _Failure):
      self.close()  # The next call starts over from the last good cursor.
      raise item.error
    batch, self._cursor = item
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
            'num_examples': order.num_examples, 'process_index': order.process_index,
            'process_count': order.process_count}

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable ints and strings: the identity of the order and the cursor after the
    last batch returned by next()."""
    return {**self._identity(), 'epoch': self._cursor.epoch, 'position': self._cursor.position,
            'piece': self._cursor.piece}

  def set_state(self, state: dict[str, Any]):
    """Continues from a get_state() of an iterator built with the same arguments."""
    missing = sorted({'epoch', 'position', 'piece', *self._identity()} - set(state))
    if missing:
      raise ValueError(f'iterator state is missing {missing}')
    for key, value in self._identity().items():
      if state[key] != value:
        raise ValueError(f'iterator state has {key}={state[key]!r} but this iterator has '
                         f'{value!r}; a state only restores an iterator built the same way')
    cursor = Cursor(int(state['epoch']), int(state['position']), int(state['piece']))
    if (cursor.epoch < 0 or not 0 <= cursor.position < self._order.epoch_length
        or cursor.piece < 0):
      raise ValueError(f'iterator state cursor out of range: {cursor} (epoch length '
                       f'{self._order.epoch_length})')
    self.close()  # Drops prefetched batches: they followed the old cursor.
    self._cursor = cursor


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
    batch_size: B, rows per batch on this host.
    seq_len: T, tokens per row.
    seed: orders the epochs (non-negative).
    process_index, process_count: this host and the number of hosts.
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
  order = EpochOrder(len(source), int(seed), process_index, process_count)
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  if kind == 'pretrain':
    if image_mode is not None or preprocess_images is not None:
      raise ValueError("kind='pretrain' reads text only; image_mode and preprocess_images do not "
                       'apply')
    batcher = PackedTextBatcher(source, order, tokenizer, text_key=text_key,
                                batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
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
    batcher = ConversationBatcher(source, order, encoder, batch_size=batch_size, seq_len=seq_len,
                                  pad_id=pad_id, preprocess_images=preprocess_images)
  return BatchIterator(batcher, order, kind=kind, prefetch=prefetch)
