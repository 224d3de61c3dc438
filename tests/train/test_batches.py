"""Host-side batch assembly (memrecall/train/batches.py) against naive loops."""

import numpy as np
import pytest

from memrecall.train import batches


def test_recall_pretraining_repeats_whole_units_and_scores_the_repeat():
  """The second half is the first half's units in a shuffled order, each unit intact; the
  target mask is the repeat's real tokens (checked unit by unit)."""
  ratio, half, rows = 4, 16, 6
  ids = np.arange(1, rows * half + 1, dtype=np.int32).reshape(rows, half)  # every token distinct
  mask = np.ones((rows, half), bool)
  mask[-1, 10:] = False  # a padded last row
  rngs = [np.random.default_rng([0, r]) for r in range(3)]
  out_ids, out_mask, target = batches.recall_pretraining_chunks(ids, mask, ratio, rngs)
  assert out_ids.shape == out_mask.shape == target.shape == (rows, 2 * half)
  np.testing.assert_array_equal(out_ids[:, :half], ids)
  np.testing.assert_array_equal(out_mask[:, :half], mask)
  assert not target[:, :half].any()
  shuffled = 0
  for r in range(rows):
    units = {tuple(ids[r, u:u + ratio]): mask[r, u:u + ratio] for u in range(0, half, ratio)}
    repeat = [tuple(out_ids[r, half + u:half + u + ratio]) for u in range(0, half, ratio)]
    assert sorted(repeat) == sorted(units)  # a permutation of whole units
    shuffled += repeat != list(units)
    for k, unit in enumerate(repeat):
      at = half + k * ratio
      np.testing.assert_array_equal(out_mask[r, at:at + ratio], units[unit])
      np.testing.assert_array_equal(target[r, at:at + ratio], units[unit])
  assert shuffled >= rows - 1


def test_recall_pretraining_refuses_rows_it_cannot_split():
  ids, mask = np.zeros((4, 10), np.int32), np.ones((4, 10), bool)
  with pytest.raises(batches.BatchError, match="do not split into units of 4"):
    batches.recall_pretraining_chunks(ids, mask, 4, [np.random.default_rng(0)])
  with pytest.raises(batches.BatchError, match="4 rows do not split evenly among 3"):
    batches.recall_pretraining_chunks(ids[:, :8], mask[:, :8], 4,
                                      [np.random.default_rng(i) for i in range(3)])
