"""Reading a host's examples through grain: the global order, the per-example work (in worker
processes when asked) and the read-ahead that feeds the batchers of pipeline.py.

The global stream: entry j is example `order[j]` of the source, where epoch j // N is a seeded
permutation of range(N) computed index by index (grain's index shuffle, reseeded each epoch):
nothing of size N is ever materialized. A host with row slots `slots` of a global batch of S
slots reads, in host order k = entry * B + row, the stream's entry `entry * S + slots[row]`; the
work on each example (decode, tokenize, encode, image preprocessing) is a pure function of k, so
the examples are the same however many threads or worker processes compute them.

grain's unit of work is one *entry* of the host: its B examples, read together (a TFDS data
source reads a list of records in one call) and tokenized in one batch call (the Rust tokenizer
spreads it over threads), so grain's per-element cost is paid once per B examples.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from mmspec_jax.data import packing
from mmspec_jax.data.conversation import ConversationEncoder

# grain's index shuffle takes 32-bit seeds.
MAX_SEED = 2**32 - 1
# Host order positions: an effectively infinite range (grain wants a finite one).
_END = 2**62


class GlobalOrder:
  """order[j]: the source index of the global stream's entry j (see the module docstring).

  grain's ShuffleMapDataset computes the same indices (epoch e shuffled with seed + e); calling
  its index shuffle directly skips a dataset layer per example.
  """

  def __init__(self, num_examples: int, seed: int):
    if num_examples < 1:
      raise ValueError('the source is empty: nothing to train on')
    self.num_examples, self.seed = num_examples, seed

  def __getitem__(self, j: int) -> int:
    epoch, position = divmod(j, self.num_examples)
    return grain.experimental.index_shuffle(
        position, max_index=self.num_examples - 1, seed=(self.seed + epoch) % 2**32, rounds=4)


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


class Entry(NamedTuple):
  """One entry's B examples, encoded, in a form cheap to send from a worker process: grain moves
  each numpy array through a shared memory block of its own (a few hundred microseconds), so
  the token ids travel as one bytes object and the images as one array."""
  ids: bytes  # int32: the examples' token ids one after another
  mask: bytes | None  # bool, 1 where trained on (None: all)
  bounds: tuple[int, ...]  # example b is ids[bounds[b]:bounds[b + 1]]
  has_image: tuple[bool, ...] = ()
  images: np.ndarray | None = None  # float32[B, H', W', 3], preprocessed

  @classmethod
  def join(cls, ids: Sequence[Sequence[int]], masks: Sequence[np.ndarray] | None = None,
           **images: Any) -> Entry:
    bounds = np.cumsum([0, *map(len, ids)]).tolist()
    flat = np.concatenate([np.asarray(i, np.int32) for i in ids]) if ids else np.zeros(0, np.int32)
    mask = None if masks is None else np.concatenate([np.asarray(m, np.bool_) for m in masks])
    return cls(flat.astype(np.int32).tobytes(), None if mask is None else mask.tobytes(),
               tuple(bounds), **images)

  def pairs(self, row: int) -> packing.Pairs:
    start, stop = self.bounds[row], self.bounds[row + 1]
    ids = np.frombuffer(self.ids, np.int32)[start:stop]
    mask = None if self.mask is None else np.frombuffer(self.mask, np.bool_)[start:stop]
    return packing.to_pairs(ids, mask)


class TokenizeDocuments:
  """Text examples -> their Entry: each tokenized (BOS as the tokenizer adds it), then EOS."""

  def __init__(self, tokenizer, text_key: str):
    if tokenizer.eos_token_id is None:
      raise ValueError('the tokenizer has no EOS token; packed documents must end with one')
    self.tokenizer, self.text_key = tokenizer, text_key

  def __call__(self, examples: Sequence[Any]) -> Entry:
    eos = self.tokenizer.eos_token_id
    encoded = self.tokenizer([_text(e, self.text_key) for e in examples])['input_ids']
    # EOS appended unless the tokenizer added it.
    return Entry.join([ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded])


class EncodeConversations:
  """LLaVA records -> their pairs (and with `preprocess_images`, their preprocessed images)."""

  def __init__(self, encoder: ConversationEncoder, seq_len: int,
               preprocess_images: Callable[[list[np.ndarray]], np.ndarray] | None = None):
    self.encoder, self.seq_len, self.preprocess_images = encoder, seq_len, preprocess_images

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

  def _encode(self, example: Any) -> tuple[np.ndarray, np.ndarray]:
    if 'conversations' not in example:
      raise ValueError(f'record {_record_id(example)!r} has no "conversations" field; it has '
                       f'{sorted(example)}')
    ids, mask = self.encoder(example['conversations'])
    if self.preprocess_images is not None:
      self._check_image_tokens(ids, bool(example.get('has_image', False)), example)
    return ids, mask

  def __call__(self, examples: Sequence[Any]) -> Entry:
    ids, masks = zip(*map(self._encode, examples))
    if self.preprocess_images is None:
      return Entry.join(ids, masks)
    has_image = tuple(bool(e.get('has_image', False)) for e in examples)
    # Records without an image carry a placeholder (LlavaConversations stores a 1x1 black
    # image); it goes through the same preprocessing for a uniform shape and is then zeroed.
    images = np.array(self.preprocess_images([_image(e) for e in examples]), np.float32)
    if images.ndim != 4 or images.shape[0] != len(examples) or images.shape[-1] != 3:
      raise ValueError(f'preprocess_images returned shape {images.shape}; expected '
                       f'[{len(examples)}, H, W, 3]')
    images[~np.asarray(has_image, np.bool_)] = 0.0
    return Entry.join(ids, masks, has_image=has_image, images=images)


class ReadEntry:
  """Entry e of this host -> its B processed examples, one per row: row r holds slot slots[r]'s
  e-th example, the global stream's entry e * S + slots[r]."""

  def __init__(self, source: Sequence[Any], seed: int, slots: range, num_slots: int,
               process: Callable[[Sequence[Any]], Entry]):
    self.source, self.slots, self.num_slots, self.process = source, slots, num_slots, process
    self.order = GlobalOrder(len(source), seed)

  def __call__(self, entry: int) -> Entry:
    indices = [self.order[entry * self.num_slots + slot] for slot in self.slots]
    # TFDS data sources read a list of records in parallel; lists and other sequences one by one.
    getitems = getattr(self.source, '__getitems__', None)
    examples = getitems(indices) if getitems else [self.source[i] for i in indices]
    return self.process(examples)


def _exit_with_parent(worker_index: int, worker_count: int):
  """grain worker init: the worker exits once the process that started it is gone. A training
  process killed with SIGKILL (a preemption, a crash) would otherwise leave its workers running,
  blocked on a queue nobody reads, on a host that resumes the run."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access  # No cleanup: the reader is gone.

  threading.Thread(target=watch, daemon=True, name='exit-with-parent').start()


def _absl_flags_ready():
  # grain's worker processes read its absl flags, which only an absl app (train.py) parses;
  # from a library call or a test, they take their defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class HostReader:
  """This host's entries (see Entry), read ahead by grain.

  Entries come from one grain iterator from `start` on (a thread reads ahead; with workers > 0,
  worker processes do the reading and processing, each a slice of the entries, and grain hands
  them back in order). Packed rows consume documents at different rates, so an entry waits in a
  buffer until every row has moved past it; past `max_buffered` entries, later ones are dropped
  and recomputed here when asked for, so memory stays bounded and the results do not change.
  """

  def __init__(self, read: ReadEntry, start: int, *, read_ahead: int, workers: int,
               max_buffered: int):
    self._read, self._max_buffered = read, max_buffered
    entries = grain.MapDataset.range(start, _END).map(read)
    dataset = entries.to_iter_dataset(grain.ReadOptions(
        num_threads=1 if read_ahead else 0, prefetch_buffer_size=max(read_ahead, 1)))
    if workers:
      _absl_flags_ready()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=max(1, read_ahead)),
          worker_init_fn=_exit_with_parent)
    self._iterator = iter(dataset)
    self._next = start  # The entry the iterator yields next.
    self._floor = [start] * len(read.slots)  # Per row: entries below it are never asked again.
    self._buffer: dict[int, Entry] = {}

  def get(self, entry: int) -> Entry:
    if entry in self._buffer:
      return self._buffer[entry]
    if entry < self._next:  # Read ahead and dropped: recompute it here.
      return self._read(entry)
    while True:
      value = next(self._iterator)
      got, self._next = self._next, self._next + 1
      if got == entry or len(self._buffer) < self._max_buffered:
        self._buffer[got] = value
      if got == entry:
        return value

  def release(self, row: int, entry: int):
    """Row `row` will never ask for entries below `entry` again."""
    low = min(self._floor)
    self._floor[row] = max(self._floor[row], entry)
    for old in range(low, min(self._floor)):
      self._buffer.pop(old, None)

  def close(self):
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
