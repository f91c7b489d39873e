"""Tests for mmspec_jax.data.packing: packed rows and one-conversation rows."""

import numpy as np
import pytest

from mmspec_jax.data import packing

PAD = 3


def segments(rows):
  """Every (row, segment id) -> (inputs, targets, weights, positions) of that segment."""
  out = {}
  for b in range(rows['inputs'].shape[0]):
    for s in sorted(set(rows['segment_ids'][b].tolist()) - {0}):
      where = rows['segment_ids'][b] == s
      out[b, s] = tuple(rows[k][b][where].tolist() for k in
                        ('inputs', 'targets', 'loss_mask', 'positions'))
  return out


def check_row_invariants(rows, seq_len):
  assert rows['inputs'].dtype == np.int32 and rows['targets'].dtype == np.int32
  assert rows['loss_mask'].dtype == np.float32
  assert rows['positions'].dtype == np.int32 and rows['segment_ids'].dtype == np.int32
  for key in packing.ROW_KEYS:
    assert rows[key].shape[1] == seq_len, key
  seg = rows['segment_ids']
  pad = seg == 0
  assert (rows['loss_mask'][pad] == 0).all() and (rows['positions'][pad] == 0).all()
  assert (rows['inputs'][pad] == PAD).all() and (rows['targets'][pad] == PAD).all()
  for row in seg:
    used = row[row > 0]
    # Segments are 1, 2, ... left to right, contiguous, and padding only at the end.
    assert used.tolist() == sorted(used.tolist()) and set(used.tolist()) == set(
        range(1, int(used.max(initial=0)) + 1))
    assert (row[len(used):] == 0).all()
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  # Within a segment, the target of t is the input of t + 1, and positions count up by one.
  assert (rows['targets'][:, :-1][same] == rows['inputs'][:, 1:][same]).all()
  assert (rows['positions'][:, 1:][same] == rows['positions'][:, :-1][same] + 1).all()
  starts = (seg > 0) & ~np.concatenate([np.zeros((seg.shape[0], 1), bool), same], axis=1)
  assert (rows['positions'][starts] == 0).all()


def test_pack_invariants_and_exact_coverage():
  rng = np.random.default_rng(0)
  seq_len, batch_size = 16, 3
  docs = [rng.integers(5, 100, size=n).astype(np.int32) for n in
          [2, 5, 17, 16, 40, 3, 9, 1, 12, 33, 8]]  # Incl. longer than T and one too short.
  batches = list(packing.pack(((d, None) for d in docs), batch_size=batch_size,
                              seq_len=seq_len, pad_id=PAD))
  expected = []
  for d in docs:
    for piece in packing.split_pieces(packing.to_pairs(d), seq_len):
      expected.append((piece.inputs.tolist(), piece.targets.tolist()))
  found = []
  for rows in batches:
    assert rows['inputs'].shape == (batch_size, seq_len)
    check_row_invariants(rows, seq_len)
    for inputs, targets, weights, _ in segments(rows).values():
      assert weights == [1.0] * len(inputs)
      found.append((inputs, targets))
  # Every pair of every document is in exactly one segment, pieces of T restarting positions;
  # so no document's last token is ever asked to predict the next document's first one.
  assert sorted(found) == sorted(expected)
  assert sum(len(i) for i, _ in found) == sum(len(d) - 1 for d in docs)
  # The 40-token document (39 pairs) became pieces of 16, 16 and 7, continuing where cut.
  long_doc = docs[4].tolist()
  assert [i + t[-1:] for i, t in found if i == long_doc[:16]] == [long_doc[:17]]
  assert [i + t[-1:] for i, t in found if i == long_doc[16:32]] == [long_doc[16:33]]
  assert [i + t[-1:] for i, t in found if i == long_doc[32:39]] == [long_doc[32:40]]


def test_mask_shifts_with_targets():
  ids = np.arange(10, 20, dtype=np.int32)
  mask = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], bool)
  pairs = packing.to_pairs(ids, mask)
  assert pairs.targets.tolist() == ids[1:].tolist()
  # The weight of a pair is the mask of its target: predicting token 13 from 12 is trained.
  assert pairs.weights.tolist() == mask[1:].astype(np.float32).tolist()
  rows = next(packing.pack([(ids, mask)], batch_size=1, seq_len=12, pad_id=PAD))
  assert rows['loss_mask'][0, :9].tolist() == mask[1:].tolist()
  assert rows['loss_mask'][0, 9:].tolist() == [0, 0, 0]


def test_one_per_row_truncates_and_pads():
  short = packing.to_pairs(np.arange(5, 9), [0, 0, 1, 1])
  long = packing.to_pairs(np.arange(20, 40), np.ones(20, bool))
  rows = packing.one_per_row([short, long, packing.to_pairs([7])], seq_len=8, pad_id=PAD)
  check_row_invariants(rows, 8)
  assert rows['segment_ids'].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8, [0] * 8]
  assert rows['inputs'][1].tolist() == list(range(20, 28))
  assert rows['targets'][1].tolist() == list(range(21, 29))
  assert rows['loss_mask'][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_row_packer_first_fit_and_errors():
  packer = packing.RowPacker(batch_size=2, seq_len=6, pad_id=PAD)
  for n in (4, 5, 2):  # 4 -> row 0, 5 -> row 1, 2 -> row 0 (fills it).
    assert packer.add(packing.to_pairs(np.arange(n + 1) + 10))
  assert not packer.add(packing.to_pairs(np.arange(3)))  # Room 1 in row 1 only.
  rows = packer.take()
  assert rows['segment_ids'].tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 0]]
  assert packer.is_empty
  with pytest.raises(ValueError, match='does not fit rows of 6'):
    packer.add(packing.to_pairs(np.arange(8)))
  with pytest.raises(ValueError, match='mask has 2 entries for 3'):
    packing.to_pairs([1, 2, 3], [1, 1])
