"""Examples -> fixed-size rows for next-token training: packed text, or one conversation a row.

Shapes: B rows (batch_size), T tokens a row (seq_len), L tokens in an example.

An example (ids int32[L], mask bool[L]) is first turned into L - 1 (input, target, weight) pairs:
inputs = ids[:-1], targets = ids[1:], weights = mask[1:]. Targets are therefore always the next
token *of the same document*: a document's last token (EOS) is a target but never an input, so no
position is ever asked to predict the first token of the following document, and a document can be
cut anywhere without losing a prediction. For text pretraining the mask is all ones.

Every row dict has
  inputs       int32[B, T]    pad_id on padding
  targets      int32[B, T]    the next token; pad_id on padding
  loss_mask    float32[B, T]  the pair's weight; 0 on padding
  positions    int32[B, T]    0, 1, ... from the start of each segment; 0 on padding
  segment_ids  int32[B, T]    1, 2, ... per segment in a row; 0 on padding
Attention must stay within a segment (segment_ids equal and non-zero).

Packing (pretraining): a document longer than T is cut into pieces of T pairs (the last one
shorter). Each piece is its own segment and its positions restart at 0: a row cannot attend to the
previous row, so the piece is seen without its left context either way, and restarting keeps every
position below T (the positions the model is trained on match the context it gets). Pieces go to
the first row of the batch with room (first fit); the batch is complete when a piece fits in no row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

ROW_KEYS = ('inputs', 'targets', 'loss_mask', 'positions', 'segment_ids')


class Pairs(NamedTuple):
  """(input, target, weight) pairs of one example or of a piece of one."""
  inputs: np.ndarray  # int32[N]
  targets: np.ndarray  # int32[N], targets[i] follows inputs[i] in the document
  weights: np.ndarray  # float32[N], 1 where targets[i] is trained on

  def __len__(self) -> int:
    return len(self.inputs)

  def slice(self, start: int, stop: int) -> Pairs:
    return Pairs(self.inputs[start:stop], self.targets[start:stop], self.weights[start:stop])


def to_pairs(ids: Sequence[int] | np.ndarray, mask: Sequence[bool] | np.ndarray | None = None
             ) -> Pairs:
  """ids int32[L] (and mask bool[L], default all True) -> L - 1 pairs (0 if L < 2)."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  weights = (np.ones(len(ids), np.float32) if mask is None
             else np.asarray(mask, np.float32).reshape(-1))
  if len(weights) != len(ids):
    raise ValueError(f'mask has {len(weights)} entries for {len(ids)} token ids')
  return Pairs(ids[:-1], ids[1:], weights[1:])


def split_pieces(pairs: Pairs, seq_len: int) -> list[Pairs]:
  """Cuts pairs into pieces of seq_len (the last one shorter); none for an empty example."""
  return [pairs.slice(start, start + seq_len) for start in range(0, len(pairs), seq_len)]


def empty_rows(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """All-padding rows: the dict of the module docstring, every row empty."""
  shape = (batch_size, seq_len)
  return {'inputs': np.full(shape, pad_id, np.int32), 'targets': np.full(shape, pad_id, np.int32),
          'loss_mask': np.zeros(shape, np.float32), 'positions': np.zeros(shape, np.int32),
          'segment_ids': np.zeros(shape, np.int32)}


def _write(rows: dict[str, np.ndarray], row: int, start: int, piece: Pairs, segment: int):
  stop = start + len(piece)
  rows['inputs'][row, start:stop] = piece.inputs
  rows['targets'][row, start:stop] = piece.targets
  rows['loss_mask'][row, start:stop] = piece.weights
  rows['positions'][row, start:stop] = np.arange(len(piece), dtype=np.int32)
  rows['segment_ids'][row, start:stop] = segment


class RowPacker:
  """Packs pieces of at most seq_len pairs into batch_size rows, first fit."""

  def __init__(self, batch_size: int, seq_len: int, pad_id: int = 0):
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f'batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}')
    self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
    self._reset()

  def _reset(self):
    self._rows = empty_rows(self.batch_size, self.seq_len, self.pad_id)
    self._used = [0] * self.batch_size  # Filled length of each row.
    self._segments = [0] * self.batch_size  # Segments in each row so far.

  @property
  def is_empty(self) -> bool:
    return not any(self._used)

  def add(self, piece: Pairs) -> bool:
    """Writes the piece into the first row with room; False (nothing written) if none has."""
    if len(piece) > self.seq_len:
      raise ValueError(f'a piece of {len(piece)} pairs does not fit rows of {self.seq_len}; '
                       'cut it with split_pieces()')
    if not len(piece):
      return True
    for row in range(self.batch_size):
      if self.seq_len - self._used[row] >= len(piece):
        self._segments[row] += 1
        _write(self._rows, row, self._used[row], piece, self._segments[row])
        self._used[row] += len(piece)
        return True
    return False

  def take(self) -> dict[str, np.ndarray]:
    """The rows filled so far (the rest padding); starts a new, empty batch."""
    rows = self._rows
    self._reset()
    return rows


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray | None]], *, batch_size: int,
         seq_len: int, pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Packs (ids int32[L], mask bool[L] or None) examples into batches of rows, in order.

  Yields dicts of [batch_size, seq_len] arrays (see the module docstring); the last batch may be
  partly padding. BatchIterator does the same thing resumably, from a cursor into a data source.
  """
  packer = RowPacker(batch_size, seq_len, pad_id)
  for ids, mask in examples:
    for piece in split_pieces(to_pairs(ids, mask), seq_len):
      if not packer.add(piece):
        yield packer.take()
        packer.add(piece)  # Always fits: the batch is empty and the piece at most seq_len.
  if not packer.is_empty:
    yield packer.take()


def one_per_row(examples: Sequence[Pairs], seq_len: int, pad_id: int = 0
                ) -> dict[str, np.ndarray]:
  """One example a row (chat / multimodal): truncated to seq_len pairs, segment 1, padded.

  Args:
    examples: B examples' pairs.
  Returns:
    The row dict of the module docstring with B rows.
  """
  rows = empty_rows(len(examples), seq_len, pad_id)
  for row, pairs in enumerate(examples):
    _write(rows, row, 0, pairs.slice(0, seq_len), segment=1)
  return rows
