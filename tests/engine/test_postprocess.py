"""nnU-Net-style post-processing: largest component, the decision rule, and where it is applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medkd.engine.postprocess import (
    Postprocessing,
    decide_postprocessing,
    keep_largest_component,
    read_postprocessing,
    write_postprocessing,
)

LABELS = {"background": 0, "A": 1, "B": 2}


def test_keeps_exactly_the_largest_blob_per_class_2d():
    seg = np.zeros((12, 12), np.uint8)
    seg[1:4, 1:4] = 1  # 9 voxels: kept
    seg[8:10, 8:10] = 1  # 4 voxels: removed
    seg[4, 4] = 1  # touches the big blob at a corner: same component (full connectivity)
    seg[6:8, 1:3] = 2  # another class: untouched
    out = keep_largest_component(seg, [1])
    expected = seg.copy()
    expected[8:10, 8:10] = 0
    assert np.array_equal(out, expected) and seg[8, 8] == 1  # the input is not modified


def test_keeps_exactly_the_largest_blob_per_class_3d():
    seg = np.zeros((6, 10, 10), np.uint8)
    seg[0:6, 1:3, 1:3] = 1  # a column through all slices: 24 voxels, one component in 3D
    seg[2, 5:9, 5:9] = 1  # 16 voxels in one slice (larger than the column's 4 per slice)
    seg[4, 6:9, 6:9] = 2
    seg[0, 6:8, 6:8] = 2  # smaller blob of class 2
    out = keep_largest_component(seg, [1])
    assert (out == 1).sum() == 24 and (out[2, 5:9, 5:9] == 0).all()
    both = Postprocessing(classes=(1, 2)).apply(seg)
    assert (both == 2).sum() == 9 and (both[0, 6:8, 6:8] == 0).all()


def _blob_cases():
    """Reference: one A blob, two separate B blobs. Prediction: A plus a spurious A blob, B exact."""
    ref = np.zeros((20, 20), np.uint8)
    ref[2:6, 2:6] = 1
    ref[14:18, 2:6] = 2
    ref[14:18, 14:18] = 2
    pred = ref.copy()
    pred[9:11, 9:11] = 1
    return [pred, pred.copy()], [ref, ref.copy()]


def test_decision_applies_where_it_helps_and_not_where_it_hurts():
    preds, refs = _blob_cases()
    record = decide_postprocessing(preds, refs, LABELS)
    assert record["num_cases"] == 2
    assert not record["foreground_as_one"]["applied"]  # would delete the B blobs
    a, b = record["classes"]["A"], record["classes"]["B"]
    assert a["applied"] and a["dice_with"] == 1.0 and a["dice_without"] == pytest.approx(32 / 36, abs=1e-6)
    assert not b["applied"] and b["dice_without"] == 1.0 and b["dice_with"] == pytest.approx(2 / 3, abs=1e-6)
    post = Postprocessing.from_record(record)
    assert post == Postprocessing(foreground=(), classes=(1,))
    assert np.array_equal(post.apply(preds[0]), refs[0])


def test_foreground_as_one_comes_first_and_class_steps_start_from_it():
    ref = np.zeros((16, 16), np.uint8)
    ref[2:8, 2:5] = 1
    ref[2:8, 5:8] = 2  # A and B touch: one foreground component
    pred = ref.copy()
    pred[12:14, 12:14] = 2  # spurious B far away
    record = decide_postprocessing([pred], [ref], {**LABELS, "C": 3})
    assert record["foreground_as_one"]["applied"]
    b = record["classes"]["B"]
    assert b["dice_without"] == 1.0 and not b["applied"]  # nothing left to gain after step 1
    c = record["classes"]["C"]  # absent everywhere: NaN Dice, never applied
    assert c == {"label": 3, "applied": False, "dice_without": None, "dice_with": None}
    assert np.array_equal(Postprocessing.from_record(record).apply(pred), ref)


def test_record_round_trip_and_errors_name_file_and_key(tmp_path):
    preds, refs = _blob_cases()
    path = write_postprocessing(tmp_path / "postprocessing.json", decide_postprocessing(preds, refs, LABELS))
    assert Postprocessing.from_record(read_postprocessing(path)).classes == (1,)
    broken = json.loads(path.read_text())
    del broken["classes"]["A"]["applied"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"postprocessing\.json.*applied"):
        read_postprocessing(path)
