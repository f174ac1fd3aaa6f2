"""check-data finds data that cannot train (errors) or looks wrong (warnings), beyond unreadable files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medkd.data.dataset import DatasetError, load_dataset
from medkd.data.io import read_image, write_image
from medkd.data.splits import get_split
from medkd.data.validate import Problem, check_dataset, errors


def _kinds(problems: list[Problem]) -> list[tuple[str, str]]:
    return sorted((p.kind, p.severity) for p in problems)


@pytest.fixture
def clean(nnunet_factory):
    root = nnunet_factory(num_train=4, num_test=1, channels=1)
    assert check_dataset(root) == []
    return root


IDS = ["case_000", "case_001", "case_002", "case_003"]


@pytest.mark.parametrize("content,needle", [
    ('[{"train": ["case_000"', "not valid JSON"),
    (json.dumps([{"train": IDS[:2] + ["ghost"], "val": IDS[2:]}]), "unknown case id(s): ghost"),
    (json.dumps([{"train": IDS[:2] + ["../../etc/passwd"], "val": IDS[2:]}]), "file paths, not case ids"),
    (json.dumps([{"train": IDS[:3], "val": IDS[2:]}]), "both 'train' and 'val': case_002"),
    (json.dumps([{"train": IDS[:3], "val": IDS[3:]}, {"train": [], "val": IDS}]), "fold 1 has an empty 'train'"),
])
def test_unusable_splits_file_is_an_error(clean, content, needle):
    """Each of these passed check-data before (train rejected some of them later, one at a time)."""
    (clean / "splits_final.json").write_text(content)
    [problem] = check_dataset(clean)
    assert (problem.kind, problem.severity, problem.file) == ("bad-splits", "error", clean / "splits_final.json")
    assert needle in problem.message
    with pytest.raises(DatasetError):  # train refuses the same file (the fold with the problem)
        get_split(load_dataset(clean), 1 if "fold 1" in needle else 0)


def test_every_bad_fold_is_listed(clean):
    splits = [{"train": ["ghost"], "val": IDS}, {"train": IDS[:3], "val": IDS[2:]}]
    (clean / "splits_final.json").write_text(json.dumps(splits))
    messages = [p.message for p in check_dataset(clean)]
    assert len(messages) == 2 and messages[0].startswith("fold 0") and messages[1].startswith("fold 1")


def test_labels_that_are_all_background_are_an_error(clean):
    for path in (clean / "labelsTr").iterdir():
        label, geometry = read_image(path)
        write_image(np.zeros_like(label), geometry, path)
    problems = check_dataset(clean)
    [problem] = errors(problems)
    assert (problem.kind, problem.file) == ("no-foreground", clean / "labelsTr")
    assert "none of the 4 training labels" in problem.message


def test_a_class_in_no_training_label_is_a_warning(clean):
    for path in (clean / "labelsTr").iterdir():
        label, geometry = read_image(path)
        write_image(np.where(label == 2, 1, label).astype(label.dtype), geometry, path)
    assert _kinds(check_dataset(clean)) == [("absent-class", "warning")]
    assert "'tumour' (2)" in check_dataset(clean)[0].message


def test_constant_images_are_warned_and_all_constant_is_an_error(clean):
    first = clean / "imagesTr" / "case_000_0000.nii.gz"
    image, geometry = read_image(first)
    write_image(np.full_like(image, 7), geometry, first)
    [problem] = check_dataset(clean)
    assert (problem.kind, problem.severity, problem.case) == ("constant-image", "warning", "case_000")
    assert problem.file == first
    assert "every voxel is 7" in problem.message and str(problem).startswith("warning [constant-image]")
    for path in (clean / "imagesTr").iterdir():
        write_image(np.zeros_like(image), geometry, path)
    problems = check_dataset(clean)
    assert _kinds(problems) == [("constant-image", "error")] + [("constant-image", "warning")] * 4
    assert "all 4 training images are constant" in errors(problems)[0].message


def test_unreadable_labels_do_not_make_a_dataset_wide_verdict(clean):
    for path in (clean / "labelsTr").iterdir():
        path.write_bytes(b"junk")
    assert {p.kind for p in check_dataset(clean)} == {"unreadable"}


@pytest.mark.parametrize("entry", ["../outside/secret.nii.gz", "./imagesTr/../../outside/secret.nii.gz",
                                   "/abs/outside/secret.nii.gz"])
def test_msd_paths_leaving_the_dataset_are_refused(msd_factory, entry):
    """Before, the file outside the dataset was read as a training case and check-data passed."""
    root = msd_factory(num_train=2, num_test=0, channels=1)
    outside = root.parent / "outside" / "secret.nii.gz"
    image, geometry = read_image(root / "imagesTr" / "tiny_00.nii.gz")
    write_image(image, geometry, outside)
    d = json.loads((root / "dataset.json").read_text())
    d["training"].append({"image": entry, "label": "./labelsTr/tiny_00.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"key 'training\[2\].image' .*leaves the dataset folder"):
        load_dataset(root)
    [problem] = check_dataset(root)
    assert problem.kind == "bad-dataset-json" and "training[2].image" in problem.message
