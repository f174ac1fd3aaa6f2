"""nnU-Net-style post-processing: largest component, the decision rule, and where it is applied."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import build_config
from medkd.data.dataset import load_dataset
from medkd.data.io import read_image
from medkd.data.preprocess import make_plan
from medkd.engine.inference import Predictor, predict_folder
from medkd.engine.postprocess import (
    Postprocessing,
    decide_postprocessing,
    keep_largest_component,
    read_postprocessing,
    write_postprocessing,
)
from medkd.engine.trainer import train
from medkd.models import create
from medkd.storage import load_checkpoint, save_checkpoint

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


def test_components_tied_for_largest_are_all_kept_as_nnunet_keeps_them():
    seg = np.zeros((10, 10), np.uint8)
    seg[0:2, 0:2] = 1
    seg[6:8, 6:8] = 1  # the same size: kept too
    seg[0, 9] = 1  # smaller: removed
    out = keep_largest_component(seg, [1])
    assert (out == 1).sum() == 8 and out[0, 9] == 0


def _blob_cases():
    """Reference: one A blob, two separate B blobs. Prediction: A plus a spurious A blob, B exact."""
    ref = np.zeros((20, 20), np.uint8)
    ref[2:6, 2:6] = 1
    ref[14:18, 2:6] = 2
    ref[14:18, 14:17] = 2  # smaller than the other B blob: keeping the largest would delete it
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
    assert not b["applied"] and b["dice_without"] == 1.0 and b["dice_with"] == pytest.approx(32 / 44, abs=1e-6)
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


# ----------------------------------------------------------------------------- where it is applied

def _two_organ_blobs(image: np.ndarray) -> np.ndarray:
    """Probabilities (5, y, x) for a phantom image: organ (1) in a big and a small blob, else background."""
    probs = np.zeros((5, *image.shape[1:]), np.float32)
    probs[0] = 1.0
    for rows, cols in [(slice(5, 15), slice(5, 15)), (slice(40, 44), slice(40, 44))]:
        probs[:, rows, cols] = 0.0
        probs[1, rows, cols] = 1.0
    return probs


@pytest.fixture()
def checkpoint_with_decision(phantoms_2d, tmp_path):
    dataset = load_dataset(phantoms_2d)
    plan = make_plan(dataset, dataset.training[:2], mode="2d")
    model = create("unet", 2, 1, dataset.num_classes, preset="student")
    path = tmp_path / "run" / "m.pt"
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(), "step": 5,
                     "preprocessing": {"plan": plan.to_dict(), "patch_size": [32, 32]},
                     "labels": dict(dataset.labels)}, path)
    classes = {n: {"label": v, "applied": v == 1, "dice_without": 0.5, "dice_with": 0.6}
               for n, v in dataset.labels.items() if v}
    write_postprocessing(path.parent / "postprocessing.json", {
        "checkpoint": "m.pt", "step": 5, "foreground_as_one": {"applied": False}, "classes": classes})
    return path


def _organ_voxels(folder):
    return [int((read_image(p)[0] == 1).sum()) for p in sorted(folder.glob("*.png"))]


def test_predictor_applies_the_stored_decision_unless_told_not_to(checkpoint_with_decision, phantoms_2d, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(Predictor, "predict_arrays", lambda self, image, geometry: _two_organ_blobs(image))
    assert Predictor(checkpoint_with_decision).postprocessing == Postprocessing(classes=(1,))
    predict_folder(Predictor(checkpoint_with_decision), phantoms_2d / "imagesTs", tmp_path / "post")
    predict_folder(Predictor(checkpoint_with_decision, postprocess=False), phantoms_2d / "imagesTs", tmp_path / "raw")
    assert _organ_voxels(tmp_path / "post") == [100, 100] and _organ_voxels(tmp_path / "raw") == [116, 116]
    runner = CliRunner()
    for flag, voxels in [([], 100), (["--no-postprocess"], 116)]:
        out = tmp_path / f"cli{len(flag)}"
        result = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint_with_decision), "-i",
                                     str(phantoms_2d / "imagesTs"), "-o", str(out), *flag])
        assert result.exit_code == 0, result.output
        assert _organ_voxels(out) == [voxels, voxels]


def test_a_decision_for_other_weights_is_not_applied(checkpoint_with_decision, caplog):
    record_path = checkpoint_with_decision.parent / "postprocessing.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "step": 4}))
    with caplog.at_level(logging.WARNING):
        assert Predictor(checkpoint_with_decision).postprocessing is None
    assert "not applied" in caplog.text and "step 4" in caplog.text


def test_a_run_folder_gets_its_decision_and_the_cli_redecides_it(phantoms_2d, tmp_path, tiny_config):
    run = tmp_path / "run"
    train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2)), run)
    record = read_postprocessing(run / "postprocessing.json")
    assert record["checkpoint"] == "best.pt" and record["step"] == load_checkpoint(run / "best.pt")["step"]
    assert record["cases"] == ["phantom_004", "phantom_009"] and record["whole_slice"] is False  # the default
    assert list(record["classes"]) == ["organ", "core", "neighbour", "lesion"]
    assert Predictor(run / "best.pt").postprocessing == Postprocessing.from_record(record)
    (run / "postprocessing.json").unlink()
    result = CliRunner().invoke(app, ["postprocess", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert "all foreground as one" in result.output and read_postprocessing(run / "postprocessing.json") == record
