"""Tests for medkd.data.splits: splits_final.json, seeded k-fold, grouping, subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medkd.data.dataset import Case, DatasetError, DatasetInfo
from medkd.data.splits import get_split, subset_cases


def _dataset(root: Path, case_ids: list[str]) -> DatasetInfo:
    return DatasetInfo(root=root, name="t", channel_names={0: "MRI"}, labels={"background": 0, "fg": 1},
                       file_ending=".nii.gz", format="nnunet",
                       training=[Case(c, [root / f"{c}_0000.nii.gz"], None) for c in case_ids], test=[])


IDS = [f"case_{i:02d}" for i in range(11)]


def test_splits_final_json_is_used(tmp_path):
    splits = [{"train": ["case_00", "case_01"], "val": ["case_02"]},
              {"train": ["case_02", "case_00"], "val": ["case_01"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    ds = _dataset(tmp_path, ["case_00", "case_01", "case_02"])
    assert get_split(ds, 0) == (["case_00", "case_01"], ["case_02"])
    assert get_split(ds, 1, num_folds=7, group_regex="nomatch") == (["case_00", "case_02"], ["case_01"])
    with pytest.raises(IndexError, match="fold 2 out of range.*0..1"):
        get_split(ds, 2)


def test_splits_final_json_unknown_case(tmp_path):
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["case_00", "ghost"], "val": ["case_01"]}]))
    with pytest.raises(DatasetError, match="splits_final.json.*ghost"):
        get_split(_dataset(tmp_path, ["case_00", "case_01"]), 0)


@pytest.mark.parametrize("content", ["{}", "[]", "[{\"train\": []}]", "not json"])
def test_splits_final_json_malformed(tmp_path, content):
    (tmp_path / "splits_final.json").write_text(content)
    with pytest.raises(DatasetError, match="splits_final.json"):
        get_split(_dataset(tmp_path, ["case_00", "case_01"]), 0)


def test_kfold_deterministic_disjoint_and_covering(tmp_path):
    ds = _dataset(tmp_path, list(reversed(IDS)))
    vals = []
    for fold in range(5):
        train, val = get_split(ds, fold, num_folds=5, seed=3)
        assert (train, val) == get_split(ds, fold, num_folds=5, seed=3)
        assert not set(train) & set(val)
        assert sorted(train + val) == IDS
        assert train == sorted(train) and val == sorted(val)
        assert len(val) in (2, 3)
        vals.append(val)
    assert sorted(c for v in vals for c in v) == IDS  # every case validated exactly once
    other = [get_split(ds, fold, num_folds=5, seed=4)[1] for fold in range(5)]
    assert other != vals  # the seed matters


def test_kfold_independent_of_case_order(tmp_path):
    a = get_split(_dataset(tmp_path, IDS), 1, num_folds=3)
    b = get_split(_dataset(tmp_path, list(reversed(IDS))), 1, num_folds=3)
    assert a == b


def test_grouping_keeps_patients_together(tmp_path):
    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 9) for f in (1, 12)] + ["patient009_frame01"]
    ds = _dataset(tmp_path, ids)
    seen = []
    for fold in range(4):
        train, val = get_split(ds, fold, num_folds=4, group_regex=r"^(patient\d+)")
        val_patients = {c.split("_")[0] for c in val}
        train_patients = {c.split("_")[0] for c in train}
        assert not val_patients & train_patients
        seen += val
    assert sorted(seen) == sorted(ids)
    # without a capture group the whole match is the key
    train, val = get_split(ds, 0, num_folds=4, group_regex=r"patient\d+")
    assert not {c[:10] for c in val} & {c[:10] for c in train}


def test_group_regex_that_does_not_match_names_the_case(tmp_path):
    ds = _dataset(tmp_path, ["patient001_a", "patient002_a", "scan_7"])
    with pytest.raises(DatasetError, match="scan_7"):
        get_split(ds, 0, num_folds=2, group_regex=r"^(patient\d+)")
    with pytest.raises(ValueError, match="invalid group_regex"):
        get_split(ds, 0, num_folds=2, group_regex="(")


def test_bad_fold_arguments(tmp_path):
    ds = _dataset(tmp_path, IDS[:3])
    with pytest.raises(IndexError, match="fold 5"):
        get_split(ds, 5, num_folds=3)
    with pytest.raises(ValueError, match="num_folds"):
        get_split(ds, 0, num_folds=1)
    with pytest.raises(DatasetError, match="3 training cases cannot be split into 5 folds"):
        get_split(ds, 0, num_folds=5)


def test_subset_cases():
    subset = subset_cases(IDS, 0.5, seed=0)
    assert subset == sorted(subset) and set(subset) <= set(IDS)
    assert len(subset) == round(0.5 * len(IDS)) == len(set(subset))
    assert subset == subset_cases(list(reversed(IDS)), 0.5, seed=0)
    assert any(subset_cases(IDS, 0.5, seed=s) != subset for s in range(1, 5))
    assert len(subset_cases(IDS, 0.01, seed=0)) == 1
    assert subset_cases(IDS, 1.0, seed=9) == IDS
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subset_cases(IDS, bad, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        subset_cases([], 0.5, seed=0)
