"""Teacher sets: several trained teachers described by one manifest (``teachers.json``).

A teacher set is what ``medkd train-teachers`` writes and what ``distill``, ``predict`` and
``evaluate`` accept wherever they accept one checkpoint. :func:`open_teachers` takes either a
manifest file, a folder that holds ``teachers.json``, or a single checkpoint (a set of one), so
code downstream never distinguishes the cases.

``teachers.json`` (checkpoint paths relative to the manifest's folder)::

    {"format": "medkd-teacher-set-v1",
     "kind": "uniform" | "diverse" | "subset" | "multitask" | "nnunet" | "single",
     "labels": {"background": 0, ...},
     "members": [{"name": "unet_seed0", "checkpoint": "members/unet_seed0/best.pt",
                  "val_dice": 0.87, "model": "unet", "loss": "dice_ce", "seed": 0,
                  "cases": null | ["case_001", ...], "info": {...}}, ...]}

Members are listed in a fixed order; that order is the member axis ``M`` of stacked outputs
(see :mod:`medkd.teachers.combine`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkd.models import create_from_spec
from medkd.storage import CheckpointError, atomic_write_text, load_checkpoint

MANIFEST_NAME = "teachers.json"
MANIFEST_FORMAT = "medkd-teacher-set-v1"
SET_KINDS = ("single", "uniform", "diverse", "subset", "multitask", "nnunet")  # nnunet: folds of an imported model


class ManifestError(ValueError):
    """A teacher-set manifest is missing, malformed, or names a missing checkpoint; the message names the file."""


@dataclass
class TeacherMember:
    """One teacher of a set. ``checkpoint`` is absolute once loaded."""

    name: str
    checkpoint: Path
    val_dice: float | None = None
    model: str | None = None
    loss: str | None = None
    seed: int | None = None
    cases: list[str] | None = None  # training cases of a subset teacher
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSet:
    kind: str
    members: list[TeacherMember]
    labels: dict[str, int]
    source: Path  # the manifest (or the single checkpoint) it was read from

    def __post_init__(self) -> None:
        if self.kind not in SET_KINDS:
            raise ManifestError(f"{self.source}: kind must be one of {', '.join(SET_KINDS)}, got {self.kind!r}")
        if not self.members:
            raise ManifestError(f"{self.source}: a teacher set needs at least one member")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ManifestError(f"{self.source}: member names must be unique, got {names}")

    def __len__(self) -> int:
        return len(self.members)

    @property
    def val_dice(self) -> list[float | None]:
        return [m.val_dice for m in self.members]

    def dice_weights(self) -> list[float]:
        """Validation Dice per member, for ``dice_member_weights``; raises when a member has none."""
        missing = [m.name for m in self.members if m.val_dice is None]
        if missing:
            raise ManifestError(f"{self.source}: no validation Dice recorded for member(s) {', '.join(missing)}")
        return [float(m.val_dice) for m in self.members]

    def fingerprint(self) -> str:
        """A hash of the members' checkpoint bytes, in member order (changes when any teacher changes)."""
        digest = hashlib.sha256()
        for member in self.members:
            digest.update(member.name.encode())
            digest.update(file_sha256(member.checkpoint).encode())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the manifest atomically; checkpoint paths are stored relative to its folder where possible."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST_NAME
        members = []
        for member in self.members:
            row = asdict(member)
            row["checkpoint"] = _relative(Path(member.checkpoint), path.parent)
            members.append(row)
        text = json.dumps({"format": MANIFEST_FORMAT, "kind": self.kind, "labels": self.labels, "members": members},
                          indent=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
        return path

    def load_networks(self, device: str | torch.device = "cpu") -> list[nn.Module]:
        """Every member network, frozen (eval mode, no gradients), in member order."""
        return [load_frozen(m.checkpoint, device)[0] for m in self.members]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def load_frozen(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A network from a medkd checkpoint, frozen (eval mode, no gradients), and the checkpoint's metadata."""
    state = load_checkpoint(checkpoint)
    network = create_from_spec(state["model_spec"])
    network.load_state_dict(state["state_dict"])
    network.to(device).eval().requires_grad_(False)
    return network, state


def is_manifest(path: str | Path) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST_NAME).is_file()) or path.suffix == ".json"


def _member_from_row(row: Any, index: int, base: Path, source: Path) -> TeacherMember:
    where = f"{source}: members[{index}]"
    if not isinstance(row, dict):
        raise ManifestError(f"{where} must be an object, got {type(row).__name__}")
    unknown = set(row) - {f for f in TeacherMember.__dataclass_fields__}
    if unknown:
        raise ManifestError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("name", "checkpoint"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ManifestError(f"{where}.{key} is missing or not a string")
    checkpoint = Path(row["checkpoint"])
    checkpoint = checkpoint if checkpoint.is_absolute() else base / checkpoint
    if not checkpoint.is_file():
        raise ManifestError(f"{where}.checkpoint: file not found: {checkpoint}")
    val = row.get("val_dice")
    if val is not None and not isinstance(val, (int, float)):
        raise ManifestError(f"{where}.val_dice must be a number or null, got {val!r}")
    return TeacherMember(**{**row, "checkpoint": checkpoint})


def load_manifest(path: str | Path) -> TeacherSet:
    """Read and validate ``teachers.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"teacher-set manifest not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"cannot read teacher-set manifest {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a teacher-set manifest (missing format={MANIFEST_FORMAT!r})")
    for key, kind in (("kind", str), ("labels", dict), ("members", list)):
        if not isinstance(data.get(key), kind):
            raise ManifestError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    members = [_member_from_row(row, i, path.parent, path) for i, row in enumerate(data["members"])]
    return TeacherSet(kind=data["kind"], members=members, labels=dict(data["labels"]), source=path)


def _member_from_checkpoint(checkpoint: Path, state: dict[str, Any]) -> TeacherMember:
    best = state.get("best_metric")
    config = state.get("config") or {}
    return TeacherMember(name=checkpoint.parent.name or "teacher", checkpoint=checkpoint,
                         val_dice=float(best) if isinstance(best, (int, float)) and best > -1 else None,
                         model=state["model_spec"].get("name"), loss=(config.get("train") or {}).get("loss"),
                         seed=(config.get("train") or {}).get("seed"))


def open_teachers(path: str | Path) -> TeacherSet:
    """A teacher set from a manifest, a folder holding ``teachers.json``, or one checkpoint (a set of one)."""
    path = Path(path)
    if is_manifest(path):
        return load_manifest(path)
    if not path.is_file():
        raise ManifestError(f"teacher not found: {path} (expected a checkpoint .pt, a {MANIFEST_NAME} "
                            "or a folder holding one)")
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ManifestError(str(err)) from None
    return TeacherSet(kind="single", members=[_member_from_checkpoint(path, state)], labels=dict(state["labels"]),
                      source=path)
