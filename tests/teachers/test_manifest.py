"""teachers.json: round trips, relative paths, and errors that name the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medkd.models import create
from medkd.storage import save_checkpoint
from medkd.teachers.manifest import (
    MANIFEST_NAME,
    ManifestError,
    TeacherMember,
    TeacherSet,
    load_manifest,
    open_teachers,
)

LABELS = {"background": 0, "a": 1}


def _checkpoint(path, seed: int = 0):
    torch.manual_seed(seed)
    network = create("unet", 2, 1, 2, preset="student")
    save_checkpoint({"model_spec": network.medkd_spec.to_dict(), "state_dict": network.state_dict(),
                     "labels": LABELS, "best_metric": 0.5, "config": {"train": {"loss": "ce", "seed": seed}}}, path)
    return path


def _set(root, names=("t0", "t1")) -> TeacherSet:
    members = [TeacherMember(name=n, checkpoint=_checkpoint(root / "members" / n / "best.pt", i), val_dice=0.5 + i / 10,
                             model="unet", loss="ce", seed=i, cases=["c1"] if i else None)
               for i, n in enumerate(names)]
    return TeacherSet(kind="uniform", members=members, labels=LABELS, source=root / MANIFEST_NAME)


def test_round_trip_with_relative_paths(tmp_path):
    teachers = _set(tmp_path / "set")
    path = teachers.save(tmp_path / "set")
    rows = json.loads(path.read_text())["members"]
    assert [r["checkpoint"] for r in rows] == ["members/t0/best.pt", "members/t1/best.pt"]
    loaded = load_manifest(path)
    assert [m.name for m in loaded.members] == ["t0", "t1"] and loaded.val_dice == [0.5, 0.6]
    assert loaded.members[1].cases == ["c1"] and loaded.labels == LABELS and loaded.kind == "uniform"
    fingerprint = teachers.fingerprint()
    assert loaded.fingerprint() == fingerprint
    shutil.move(tmp_path / "set", tmp_path / "moved")  # relative paths: the folder can move
    moved = open_teachers(tmp_path / "moved")
    assert moved.members[0].checkpoint == tmp_path / "moved" / "members" / "t0" / "best.pt"
    assert len(moved.load_networks()) == 2 and moved.fingerprint() == fingerprint


def test_a_single_checkpoint_is_a_set_of_one(tmp_path):
    single = open_teachers(_checkpoint(tmp_path / "run" / "best.pt"))
    assert single.kind == "single" and single.members[0].name == "run" and single.val_dice == [0.5]


def _write(tmp_path, data) -> str:
    path = tmp_path / MANIFEST_NAME
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["members"][0].update(checkpoint="members/gone.pt"), r"members\[0\]\.checkpoint: file not found"),
    (lambda d: d["members"][1].update(name="t0"), "member names must be unique"),
    (lambda d: d.update(format="something-else"), "is not a teacher-set manifest"),
    (lambda d: d.pop("labels"), "key 'labels' is missing"),
    (lambda d: d["members"][0].update(val_dice="high"), r"members\[0\]\.val_dice must be a number"),
    (lambda d: d["members"][0].update(colour="red"), r"members\[0\] has unknown key\(s\) colour"),
    (lambda d: d.update(kind="bagging"), "kind must be one of"),
])
def test_errors_name_the_file_and_the_key(tmp_path, mutate, needle):
    data = json.loads(_set(tmp_path).save(tmp_path).read_text())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ManifestError, match=needle) as err:
        load_manifest(tmp_path)
    assert path in str(err.value)


def test_malformed_json_and_missing_files_are_named(tmp_path):
    path = _write(tmp_path, "{not json")
    with pytest.raises(ManifestError, match="cannot read teacher-set manifest") as err:
        open_teachers(path)
    assert path in str(err.value)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="teacher not found"):
        open_teachers(tmp_path / "nope.pt")
