"""Tests for medkd.data.dataset: nnU-Net v2 / MSD loading, metadata, read_case, malformed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medkd.data.dataset import Case, DatasetError, DatasetInfo, load_dataset, read_case
from medkd.data.io import ImageReadError, read_image, write_image


def _edit_json(root, **changes):
    path = root / "dataset.json"
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d))


def test_nnunet_two_channels(nnunet_factory):
    root = nnunet_factory(num_train=3, num_test=2, channels=2)
    ds = load_dataset(root)
    assert ds.format == "nnunet" and ds.name == "Dataset001_Tiny" and ds.file_ending == ".nii.gz"
    assert ds.channel_names == {0: "mod0", 1: "mod1"} and ds.num_channels == 2
    assert ds.labels == {"background": 0, "liver": 1, "tumour": 2}
    assert ds.num_classes == 3 and ds.class_names == ["background", "liver", "tumour"]
    assert [c.case_id for c in ds.training] == ["case_000", "case_001", "case_002"]
    assert [c.case_id for c in ds.test] == ["case_003", "case_004"]
    case = ds.case("case_001")
    assert case.image_files == [root / "imagesTr" / "case_001_0000.nii.gz", root / "imagesTr" / "case_001_0001.nii.gz"]
    assert case.label_file == root / "labelsTr" / "case_001.nii.gz"
    assert ds.case("case_004").label_file == root / "labelsTs" / "case_004.nii.gz"
    image, label, geometry = read_case(case, ds)
    assert image.shape == (2, 4, 5, 6) and image.dtype == np.float32
    assert label.shape == (4, 5, 6) and label.dtype == np.int16
    np.testing.assert_array_equal(image[1], read_image(case.image_files[1])[0])
    assert geometry.matches(read_image(case.image_files[0])[1])
    assert set(np.unique(label)) == {0, 1, 2}


def test_nnunet_test_without_labels_and_missing_files_are_recorded(nnunet_factory):
    root = nnunet_factory(num_train=2, num_test=1, test_labels=False)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    ds = load_dataset(root)
    assert ds.test[0].label_file is None
    assert read_case(ds.test[0], ds)[1] is None
    assert ds.training[1].label_file == root / "labelsTr" / "case_001.nii.gz"  # recorded, not raised
    with pytest.raises(ImageReadError, match="case_001.nii.gz"):
        read_case(ds.training[1], ds)


def test_nnunet_2d_png(nnunet_factory):
    root = nnunet_factory(num_train=2, num_test=0, channels=1, shape=(7, 9), ending=".png")
    ds = load_dataset(root)
    image, label, geometry = read_case(ds.training[0], ds)
    assert image.shape == (1, 7, 9) and label.shape == (7, 9) and geometry.ndim == 2


def test_msd_4d_two_modalities(msd_factory):
    root = msd_factory(num_train=2, num_test=1, channels=2)
    ds = load_dataset(root)
    assert ds.format == "msd" and ds.channel_names == {0: "mod0", 1: "mod1"}
    assert ds.labels == {"background": 0, "liver": 1, "tumour": 2} and ds.file_ending == ".nii.gz"
    assert [c.case_id for c in ds.training] == ["tiny_00", "tiny_01"]
    assert ds.training[0].image_files == [root / "imagesTr" / "tiny_00.nii.gz"]
    assert [c.case_id for c in ds.test] == ["tiny_02"] and ds.test[0].label_file is None
    image, label, geometry = read_case(ds.case("tiny_01"), ds)
    assert image.shape == (2, 4, 5, 6) and label.shape == (4, 5, 6) and geometry.ndim == 3


def test_msd_single_modality_3d(msd_factory):
    ds = load_dataset(msd_factory(channels=1))
    image, _, _ = read_case(ds.training[0], ds)
    assert image.shape == (1, 4, 5, 6)


def test_channel_count_mismatch_in_read_case(msd_factory):
    root = msd_factory(channels=2)
    _edit_json(root, modality={"0": "a", "1": "b", "2": "c"})
    ds = load_dataset(root)
    with pytest.raises(DatasetError, match="tiny_00.nii.gz.*3"):
        read_case(ds.training[0], ds)


def test_label_shape_mismatch_in_read_case(nnunet_factory):
    root = nnunet_factory(num_train=1, num_test=0)
    label = root / "labelsTr" / "case_000.nii.gz"
    write_image(np.zeros((4, 5, 7), np.uint8), read_image(label)[1], label)
    ds = load_dataset(root)
    with pytest.raises(DatasetError, match="case_000.nii.gz"):
        read_case(ds.training[0], ds)


def test_case_metadata_and_unknown_case(nnunet_factory):
    root = nnunet_factory(num_train=2, num_test=1)
    (root / "case_metadata.json").write_text(json.dumps({"case_000": {"site": "site1", "age": 40}, "gone": {}}))
    ds = load_dataset(root)
    assert ds.case("case_000").metadata == {"site": "site1", "age": "40"}
    assert ds.case("case_001").metadata == {}
    with pytest.raises(KeyError, match="case_999"):
        ds.case("case_999")
    (root / "case_metadata.json").write_text("{broken")
    with pytest.raises(DatasetError, match="case_metadata.json"):
        load_dataset(root)


def test_ignore_label_is_not_a_class(nnunet_factory):
    root = nnunet_factory(num_train=1, num_test=0)
    _edit_json(root, labels={"background": 0, "liver": 1, "tumour": 2, "ignore": 3})
    ds = load_dataset(root)
    assert ds.ignore_label == 3 and ds.num_classes == 3


def test_non_consecutive_labels():
    ds = DatasetInfo(root=Path("/x"), name="x", channel_names={0: "CT"},
                     labels={"background": 0, "a": 2}, file_ending=".nii.gz", format="nnunet",
                     training=[Case("c", [], None)], test=[])
    with pytest.raises(DatasetError, match="labels"):
        ds.num_classes


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"channel_names": None}, "channel_names"),
        ({"labels": None}, "labels"),
        ({"numTraining": None}, "numTraining"),
        ({"file_ending": None}, "file_ending"),
        ({"file_ending": ".jpg"}, "file_ending"),
        ({"numTraining": "three"}, "numTraining"),
        ({"channel_names": {"zero": "CT"}}, "channel_names"),
        ({"channel_names": {"1": "CT"}}, "channel_names"),
        ({"channel_names": {}}, "channel_names"),
        ({"labels": {"background": 0, "liver": [1, 2]}}, "region-based"),
        ({"labels": {"liver": 1}}, "labels"),
        ({"labels": {"background": 0, "liver": "one"}}, "labels"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "labels"),
    ],
)
def test_malformed_nnunet_json(nnunet_factory, changes, key):
    root = nnunet_factory(num_train=1, num_test=0)
    _edit_json(root, **changes)
    with pytest.raises(DatasetError, match=key) as info:
        load_dataset(root)
    assert "dataset.json" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"training": None}, "training"),
        ({"training": [{"image": "./imagesTr/tiny_00.nii.gz"}]}, r"training\[0\].label"),
        ({"training": [{"label": "./labelsTr/tiny_00.nii.gz"}]}, r"training\[0\]"),
        ({"training": [{"image": "./imagesTr/tiny_00.jpg", "label": "x.nii.gz"}]}, r"training\[0\].image"),
        ({"test": "imagesTs"}, "test"),
        ({"modality": ["CT"]}, "modality"),
        ({"labels": {"zero": "background"}}, "labels"),
    ],
)
def test_malformed_msd_json(msd_factory, changes, key):
    root = msd_factory()
    _edit_json(root, **changes)
    with pytest.raises(DatasetError, match=key):
        load_dataset(root)


def test_missing_or_invalid_dataset_json(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="dataset.json not found"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json is not valid JSON"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(DatasetError, match="channel_names.*modality"):
        load_dataset(tmp_path)


def test_duplicate_msd_case_ids(msd_factory):
    root = msd_factory(num_train=2, num_test=0)
    entry = {"image": "./imagesTr/tiny_00.nii.gz", "label": "./labelsTr/tiny_00.nii.gz"}
    _edit_json(root, training=[entry, entry])
    with pytest.raises(DatasetError, match="tiny_00.*more than once"):
        load_dataset(root)
