"""Deterministic, resumable batches from a random-access data source, the same global batches
on any number of hosts, read through grain.

  it = make_iterator('pretrain', load_source('lm1b', data_dir), tokenizer, batch_size=8,
                     seq_len=1024, seed=0, process_index=jax.process_index(),
                     process_count=jax.process_count(), workers=8)
  batch = next(it)            # dict of numpy arrays, see make_iterator()
  state = it.get_state()      # JSON-serializable; save it with the checkpoint
  it.set_state(state)         # the next batches are those an uninterrupted run would produce

Order: one global stream of examples, epoch after epoch, each epoch a seeded permutation of
range(N) computed index by index (grain's index shuffle: nothing of size N is materialized, see
reading.py). A global batch of S rows is S row *slots*; slot s reads entries s, s + S, s + 2S,
... of the stream. Host i of P holds the slots [i * S / P, (i + 1) * S / P), each batch_size =
S / P of them. A slot's rows depend on the slot alone, never on which host reads it, how many
hosts there are or how many worker processes read for them: so the global batches are the same
on 1 host or 64, and a state saved by P hosts resumes exactly on P' (every host takes the cursors
of its own slots from the merged state, see `merge_states`).

Rows: a conversation row (chat, multimodal) is the slot's next conversation. A packed text row
is filled to exactly seq_len pairs with the slot's next documents, the last one cut at the row's
end and continued in the slot's next row (each piece its own segment, positions from 0: see
packing.py).

Work: grain reads, tokenizes, encodes and preprocesses images ahead of time, in `workers` worker
processes (0: in threads of this process); this process only lays the rows out.

State: per slot a cursor (entries of the slot read, pairs of the current document already in a
returned row), a handful of integers, and the same for any number of workers; on resume grain
starts reading again from the cursors (the current document is re-read and re-tokenized). This,
not grain's own iterator state, is what a checkpoint holds: grain's state for worker processes is
tied to the worker count and to one host, ours is not. It always describes the batches already
returned, never those read ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from mmspec_jax.data import packing, reading
from mmspec_jax.data.conversation import ConversationEncoder

KINDS = ('pretrain', 'chat', 'multimodal')
# 3: grain's index shuffle orders the epochs (2 drew numpy permutations): an older state would
# resume in another order, so it is refused.
STATE_VERSION = 3


class Cursor(NamedTuple):
  """Where a slot stands: `entry` entries of its stream read (the next is its `entry`-th), and
  `offset` pairs of that entry's document already in returned rows (packed text only)."""
  entry: int
  offset: int


class PackedTextBatcher:
  """Packed pretraining rows: a slot's documents fill its row to seq_len pairs, the last one cut
  at the row's end."""

  def __init__(self, num_examples: int, *, seq_len: int, pad_id: int):
    self.num_examples, self.seq_len, self.pad_id = num_examples, seq_len, pad_id

  def next_row(self, reader: reading.HostReader, row: int, cursor: Cursor
               ) -> tuple[dict[str, np.ndarray], Cursor]:
    packer = packing.RowPacker(1, self.seq_len, self.pad_id)
    room, empty_in_a_row = self.seq_len, 0
    while room:
      pairs = reader.get(cursor.entry).pairs(row)
      piece = pairs.slice(cursor.offset, cursor.offset + room)
      packer.add(piece)
      room -= len(piece)
      cursor = Cursor(cursor.entry, cursor.offset + len(piece))
      if cursor.offset == len(pairs):
        cursor = Cursor(cursor.entry + 1, 0)
        reader.release(row, cursor.entry)
      empty_in_a_row = 0 if len(pairs) else empty_in_a_row + 1
      if empty_in_a_row > self.num_examples:
        raise ValueError('no document of the source has two or more tokens: nothing to train on')
    return packer.take(), cursor

  def next_batch(self, reader: reading.HostReader, cursors: Sequence[Cursor]):
    rows, advanced = zip(*(self.next_row(reader, row, cursor)
                           for row, cursor in enumerate(cursors)))
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}, list(advanced)


class ConversationBatcher:
  """One conversation a row; with images when the reader's examples carry them."""

  def __init__(self, *, seq_len: int, pad_id: int, with_images: bool):
    self.seq_len, self.pad_id, self.with_images = seq_len, pad_id, with_images

  def next_batch(self, reader: reading.HostReader, cursors: Sequence[Cursor]):
    entry = cursors[0].entry  # Every row reads one conversation a batch: the same entry.
    if any(cursor != (entry, 0) for cursor in cursors):
      raise ValueError(f'conversation cursors must all be at one entry, got {list(cursors)}: '
                       'a state from another kind of iterator?')
    examples = reader.get(entry)
    for row in range(len(cursors)):
      reader.release(row, entry + 1)
    batch = packing.one_per_row([examples.pairs(row) for row in range(len(cursors))],
                                self.seq_len, self.pad_id)
    if self.with_images:
      batch['images'] = examples.images
      batch['has_image'] = np.asarray(examples.has_image, np.bool_)
    return batch, [Cursor(entry + 1, 0) for _ in cursors]


class BatchIterator:
  """An infinite iterator of this host's batches with get_state() / set_state() (see the module
  docstring)."""

  def __init__(self, batcher, read: reading.ReadEntry, *, kind: str, seed: int,
               num_examples: int, prefetch: int = 2, workers: int = 0):
    """Args:
      batcher: PackedTextBatcher or ConversationBatcher; its next_batch(reader, cursors) ->
        (batch, cursors) must depend on the cursors alone.
      read: this host's ReadEntry (its slots, in row order, and the work on each example).
      kind, seed, num_examples: recorded in the state, so that a state is not restored into an
        iterator that would read another order.
      prefetch: batches read ahead (0: none, all work done in next()).
      workers: worker processes reading and processing examples (0: a thread of this process).
    """
    if prefetch < 0 or workers < 0:
      raise ValueError(f'prefetch and workers must be >= 0, got {prefetch}, {workers}')
    self._batcher, self._read = batcher, read
    self._kind, self._seed, self._num_examples = kind, seed, num_examples
    self._prefetch, self._workers = prefetch, workers
    self._slots = read.slots
    self._cursors = [Cursor(0, 0) for _ in self._slots]  # After the last batch returned.
    self._reader: reading.HostReader | None = None

  def __iter__(self) -> BatchIterator:
    return self

  def _open_reader(self) -> reading.HostReader:
    reader = reading.HostReader(
        self._read, min(cursor.entry for cursor in self._cursors), read_ahead=self._prefetch,
        workers=self._workers, max_buffered=max(64, 2 * self._prefetch))
    for row, cursor in enumerate(self._cursors):
      reader.release(row, cursor.entry)
    return reader

  def __next__(self) -> dict[str, np.ndarray]:
    if self._reader is None:
      self._reader = self._open_reader()
    try:
      batch, self._cursors = self._batcher.next_batch(self._reader, self._cursors)
    except BaseException:
      self.close()  # The next call starts over from the last good cursors.
      raise
    return batch

  def close(self):
    """Stops grain's readers and workers (they start again on the next __next__)."""
    if self._reader is not None:
      self._reader.close()
      self._reader = None

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
    return {'version': STATE_VERSION, 'kind': self._kind, 'seed': self._seed,
            'num_examples': self._num_examples, 'num_slots': self._read.num_slots}

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
                if key == 'num_slots' else
                '; it was saved by an older version of this pipeline, which ordered the data '
                'otherwise' if key == 'version' else '')
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
    self.close()  # Drops what was read ahead: it followed the old cursors.
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
                  text_key: str = 'text', prefetch: int = 2, workers: int = 0) -> BatchIterator:
  """This host's batch iterator over a random-access source.

  Args:
    kind: 'pretrain' (documents `source[i][text_key]`, packed), 'chat' (LLaVA conversations
      `source[i]['conversations']`, one a row, <image> dropped) or 'multimodal' (conversations
      with their images; `source[i]['image']` uint8[H, W, 3] and `source[i]['has_image']`).
    source: len() and [i] random access: load_source(...), builder.as_data_source(split), a list.
      With workers > 0 it is pickled into each worker (TFDS data sources are).
    tokenizer: a transformers tokenizer.
    batch_size: B, rows per batch on this host (the global batch is B x process_count).
    seq_len: T, tokens per row.
    seed: orders the epochs (0 <= seed < 2**32).
    process_index, process_count: this host and the number of hosts: it reads row slots
      [process_index * B, (process_index + 1) * B) of the global batch.
    image_mode: conversation kinds only: 'drop' for chat (the default); 'expand' (default) or
      'keep' for multimodal.
    num_image_tokens: image token copies per image ('expand').
    image_token_id: the id of <image>; defaults to the tokenizer's.
    preprocess_images: multimodal only: list of uint8[H, W, 3] -> float32[len, H', W', 3], e.g.
      MultimodalProcessor.preprocess_images.
    text_key: the text feature of a pretraining source ('text' for c4, lm1b and TextCorpus).
    prefetch: batches read ahead (0: none, all work done in next()).
    workers: worker processes that read, tokenize and preprocess (0: a thread of this process).
      Any count gives the same batches.
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
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= reading.MAX_SEED:
    raise ValueError(f'seed must be an int in [0, 2**32), got {seed!r}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, got {process_index}, '
                     f'{process_count}')
  num_slots = batch_size * process_count
  slots = range(process_index * batch_size, (process_index + 1) * batch_size)
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  if kind == 'pretrain':
    if image_mode is not None or preprocess_images is not None:
      raise ValueError("kind='pretrain' reads text only; image_mode and preprocess_images do not "
                       'apply')
    process = reading.TokenizeDocuments(tokenizer, text_key)
    batcher = PackedTextBatcher(len(source), seq_len=seq_len, pad_id=pad_id)
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
    process = reading.EncodeConversations(encoder, seq_len, preprocess_images)
    batcher = ConversationBatcher(seq_len=seq_len, pad_id=pad_id,
                                  with_images=preprocess_images is not None)
  read = reading.ReadEntry(source, int(seed), slots, num_slots, process)
  return BatchIterator(batcher, read, kind=kind, seed=int(seed), num_examples=len(source),
                       prefetch=prefetch, workers=workers)
