"""Tests for medkd.data.validate: each kind of bad input gives its own, well-located problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medkd.data.io import Geometry, read_image, write_image
from medkd.data.phantoms import make_phantoms
from medkd.data.validate import Problem, check_dataset


def _only(problems: list[Problem], kind: str) -> Problem:
    matching = [p for p in problems if p.kind == kind]
    assert len(matching) == 1, f"expected one {kind!r} problem, got {[str(p) for p in problems]}"
    return matching[0]


def _rewrite(path, array=None, geometry=None):
    old, old_geometry = read_image(path)
    write_image(old if array is None else array, old_geometry if geometry is None else geometry, path)


@pytest.fixture
def clean(nnunet_factory):
    root = nnunet_factory(num_train=3, num_test=1, channels=2)
    assert check_dataset(root) == []
    return root


def test_clean_phantoms_have_no_problems(tmp_path):
    root2 = make_phantoms(tmp_path / "p2", spatial_dims=2, num_train=4, num_test=2, shape=(32, 32))
    root3 = make_phantoms(tmp_path / "p3", spatial_dims=3, num_train=3, num_test=1, shape=(16, 24, 24))
    assert check_dataset(root2, progress=True) == []
    assert check_dataset(root3) == []


def test_truncated_file_is_unreadable(clean):
    path = clean / "imagesTr" / "case_001_0001.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    problem = _only(check_dataset(clean), "unreadable")
    assert (problem.case, problem.file) == ("case_001", path)
    assert "case_001" in str(problem) and str(path) in str(problem)


def test_garbage_label_is_unreadable(clean):
    path = clean / "labelsTr" / "case_002.nii.gz"
    path.write_bytes(b"\x00garbage")
    problem = _only(check_dataset(clean), "unreadable")
    assert (problem.case, problem.file) == ("case_002", path)


@pytest.mark.parametrize(
    "rel", ["imagesTr/case_001_0001.nii.gz", "labelsTr/case_002.nii.gz", "labelsTs/case_003.nii.gz"]
)
def test_missing_channel_or_label(clean, rel):
    (clean / rel).unlink()
    problems = check_dataset(clean)
    problem = _only(problems, "missing-file")
    assert problem.file == clean / rel and problem.case == rel.split("/")[1][:8]
    assert len(problems) == 1


def test_missing_channel_zero_is_reported_not_orphaned(clean):
    (clean / "imagesTr" / "case_000_0000.nii.gz").unlink()
    problems = check_dataset(clean)
    problem = _only(problems, "missing-file")
    assert (problem.case, problem.file.name) == ("case_000", "case_000_0000.nii.gz")
    assert "numTraining" in _only(problems, "bad-dataset-json").message
    assert not [p for p in problems if p.kind == "orphan-file"]


def test_image_without_channel_zero_alone_makes_label_orphan(nnunet_factory):
    root = nnunet_factory(num_train=2, num_test=0, channels=1)
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    problem = _only(check_dataset(root), "orphan-file")
    assert problem.file == root / "labelsTr" / "case_001.nii.gz"


@pytest.mark.parametrize("target", ["imagesTr/case_001_0001.nii.gz", "labelsTr/case_001.nii.gz"])
def test_shape_mismatch(clean, target):
    _rewrite(clean / target, array=np.zeros((4, 5, 7), np.uint8))
    problem = _only(check_dataset(clean), "shape-mismatch")
    assert (problem.case, problem.file) == ("case_001", clean / target)
    assert "(4, 5, 7)" in problem.message and "(4, 5, 6)" in problem.message


@pytest.mark.parametrize("field", ["spacing", "origin", "direction"])
def test_geometry_mismatch(clean, field):
    path = clean / "imagesTr" / "case_002_0001.nii.gz"
    geometry = read_image(path)[1]
    changed = {
        "spacing": (geometry.spacing[0] * 1.5, *geometry.spacing[1:]),
        "origin": (geometry.origin[0] + 3.0, *geometry.origin[1:]),
        "direction": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0),
    }[field]
    kwargs = {"spacing": geometry.spacing, "origin": geometry.origin, "direction": geometry.direction, field: changed}
    _rewrite(path, geometry=Geometry(**kwargs))
    problem = _only(check_dataset(clean), "geometry-mismatch")
    assert (problem.case, problem.file) == ("case_002", path)
    assert field in problem.message


def test_label_geometry_mismatch(clean):
    path = clean / "labelsTr" / "case_000.nii.gz"
    geometry = read_image(path)[1]
    _rewrite(path, geometry=Geometry(geometry.spacing, (0.0, 0.0, 0.0), geometry.direction))
    problem = _only(check_dataset(clean), "geometry-mismatch")
    assert problem.file == path and "origin" in problem.message


def test_undeclared_label_values_are_named(clean):
    path = clean / "labelsTr" / "case_001.nii.gz"
    label = read_image(path)[0]
    label[0, 0, :2] = [7, 9]
    _rewrite(path, array=label)
    problem = _only(check_dataset(clean), "unknown-label")
    assert (problem.case, problem.file) == ("case_001", path)
    assert "[7, 9]" in problem.message


def test_non_integer_label(clean):
    path = clean / "labelsTr" / "case_001.nii.gz"
    label = read_image(path)[0].astype(np.float32)
    label[0, 0, 0] = 0.5
    _rewrite(path, array=label)
    assert _only(check_dataset(clean), "unknown-label").file == path


@pytest.mark.parametrize(("value", "word"), [(np.nan, "1 NaN"), (np.inf, "1 Inf"), (-np.inf, "1 Inf")])
def test_nan_and_inf(clean, value, word):
    path = clean / "imagesTr" / "case_000_0000.nii.gz"
    image = read_image(path)[0]
    image[1, 2, 3] = value
    _rewrite(path, array=image)
    problem = _only(check_dataset(clean), "nan-inf")
    assert (problem.case, problem.file) == ("case_000", path) and word in problem.message


def test_empty_dataset(clean):
    shutil.rmtree(clean / "imagesTr")
    shutil.rmtree(clean / "labelsTr")
    problems = check_dataset(clean)
    assert _only(problems, "empty-dataset").case is None
    assert {p.kind for p in problems} == {"empty-dataset", "bad-dataset-json"}  # + numTraining mismatch


NON_CONSECUTIVE = ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 2}, '
                   '"numTraining": 3, "file_ending": ".nii.gz"}')


@pytest.mark.parametrize("content", ["{oops", '{"channel_names": {"0": "CT"}}', NON_CONSECUTIVE])
def test_malformed_dataset_json_is_a_single_problem(clean, content):
    (clean / "dataset.json").write_text(content)
    problems = check_dataset(clean)
    assert len(problems) == 1 and problems[0].kind == "bad-dataset-json"
    assert problems[0].file == clean / "dataset.json"


def test_orphan_label_and_stray_files(clean):
    shutil.copy(clean / "labelsTr" / "case_000.nii.gz", clean / "labelsTr" / "case_777.nii.gz")
    shutil.copy(clean / "imagesTr" / "case_000_0000.nii.gz", clean / "imagesTr" / "case_000_0002.nii.gz")
    (clean / "imagesTr" / "notes.txt").write_text("hello")
    (clean / "imagesTr" / ".DS_Store").write_text("")
    problems = check_dataset(clean)
    orphans = {p.file.name: p for p in problems if p.kind == "orphan-file"}
    assert set(orphans) == {"case_777.nii.gz", "case_000_0002.nii.gz", "notes.txt"}
    assert orphans["case_777.nii.gz"].case == "case_777" and "without an image" in orphans["case_777.nii.gz"].message
    assert len(problems) == 3


def test_every_problem_is_listed_and_include_test(clean):
    (clean / "imagesTr" / "case_000_0001.nii.gz").unlink()
    (clean / "labelsTr" / "case_002.nii.gz").write_bytes(b"junk")
    (clean / "labelsTs" / "case_003.nii.gz").unlink()
    problems = check_dataset(clean)
    located = sorted((p.kind, p.case) for p in problems)
    assert located == [("missing-file", "case_000"), ("missing-file", "case_003"), ("unreadable", "case_002")]
    assert sorted((p.kind, p.case) for p in check_dataset(clean, include_test=False)) == located[:1] + located[2:]


def test_msd_channel_count_and_orphans(msd_factory):
    root = msd_factory(num_train=2, num_test=1, channels=2)
    d = json.loads((root / "dataset.json").read_text())
    d["modality"] = {"0": "a", "1": "b", "2": "c"}
    (root / "dataset.json").write_text(json.dumps(d))
    shutil.copy(root / "labelsTr" / "tiny_00.nii.gz", root / "labelsTr" / "extra.nii.gz")
    problems = check_dataset(root)
    assert sorted(p.case for p in problems if p.kind == "shape-mismatch") == ["tiny_00", "tiny_01", "tiny_02"]
    assert _only(problems, "orphan-file").file == root / "labelsTr" / "extra.nii.gz"


def test_problem_str():
    p = Problem("missing-file", "label file is missing", "case_1", None)
    assert str(p) == "[missing-file] case case_1: label file is missing"
    assert str(Problem("empty-dataset", "none")) == "[empty-dataset] none"
    assert str(Problem("unreadable", "bad", "c", Path("a/b.nii"))) == "[unreadable] case c, file a/b.nii: bad"
