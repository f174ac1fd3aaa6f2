"""Dataset description for nnU-Net v2 raw and Medical Segmentation Decathlon (MSD) layouts.

nnU-Net v2 raw::

    DatasetXXX_Name/dataset.json     {"channel_names": {"0": "MRI"}, "labels": {"background": 0, ...},
                                      "numTraining": N, "file_ending": ".nii.gz"}
    imagesTr/CASE_0000.nii.gz ...    one file per channel
    labelsTr/CASE.nii.gz
    imagesTs/, labelsTs/             optional

MSD::

    dataset.json  {"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", ...},
                   "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                   "test": ["./imagesTs/y.nii.gz"]}
    images are 4D (c, z, y, x) for several modalities, or 3D for one.

An optional ``case_metadata.json`` (``{case_id: {key: value}}``) in the dataset root adds
per-case metadata such as the acquisition site; ids not in the dataset are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medkd.data.io import SUPPORTED_ENDINGS, Geometry, PathLike, file_ending, read_image

CASE_METADATA_FILE = "case_metadata.json"


class DatasetError(ValueError):
    """The dataset description is invalid; the message names the file and/or the JSON key."""


@dataclass
class Case:
    """One case: ``image_files`` has one path per channel (nnU-Net) or one 4D/3D file (MSD)."""

    case_id: str
    image_files: list[Path]
    label_file: Path | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class DatasetInfo:
    """A loaded dataset. ``labels`` maps name -> value and includes background 0.

    ``ignore_label`` is the value of nnU-Net's optional ``"ignore"`` label (not a class).
    ``declared_num_training`` is ``numTraining`` from dataset.json (None for MSD).
    """

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    format: str
    training: list[Case]
    test: list[Case]
    ignore_label: int | None = None
    declared_num_training: int | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background; label values must be 0..K-1."""
        values = sorted(self.labels.values())
        if values != list(range(len(values))):
            raise DatasetError(
                f"{self.root / 'dataset.json'}: 'labels' values must be consecutive 0..K-1 "
                f"(background 0 included), got {values}"
            )
        return len(values)

    @property
    def class_names(self) -> list[str]:
        """Label names ordered by value (index == class value)."""
        self.num_classes  # validates
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def case(self, case_id: str) -> Case:
        """The training or test case with this id; ``KeyError`` naming it otherwise."""
        for c in (*self.training, *self.test):
            if c.case_id == case_id:
                return c
        raise KeyError(f"case {case_id!r} is not in dataset {self.name!r} ({self.root})")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: {what} is not valid JSON ({exc})") from None


def _int_key_dict(d: Any, key: str, src: Path) -> dict[int, str]:
    """``{"0": "MRI", ...}`` -> ``{0: "MRI"}``, keys must be 0..C-1."""
    if not isinstance(d, dict) or not d:
        raise DatasetError(f"{src}: key {key!r} must be a non-empty object like {{\"0\": \"MRI\"}}")
    try:
        out = {int(k): str(v) for k, v in d.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{src}: key {key!r} must have integer keys, got {list(d)}") from None
    if sorted(out) != list(range(len(out))):
        raise DatasetError(f"{src}: key {key!r} must have keys 0..{len(out) - 1}, got {sorted(out)}")
    return out


def _nnunet_labels(d: Any, src: Path) -> tuple[dict[str, int], int | None]:
    if not isinstance(d, dict) or not d:
        raise DatasetError(f"{src}: key 'labels' must be a non-empty object like {{\"background\": 0}}")
    labels: dict[str, int] = {}
    for name, value in d.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(
                f"{src}: key 'labels' entry {name!r} is region-based ({value}); region-based labels are not supported"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{src}: key 'labels' entry {name!r} must be a non-negative integer, got {value!r}")
        labels[str(name)] = value
    ignore = labels.pop("ignore", None)
    _check_label_values(labels, src)
    return labels, ignore


def _check_label_values(labels: dict[str, int], src: Path) -> None:
    if 0 not in labels.values():
        raise DatasetError(f"{src}: key 'labels' must contain the background value 0")
    if len(set(labels.values())) != len(labels):
        raise DatasetError(f"{src}: key 'labels' has duplicate values {sorted(labels.values())}")


def _msd_labels(d: Any, src: Path) -> dict[str, int]:
    if not isinstance(d, dict) or not d:
        raise DatasetError(f"{src}: key 'labels' must be a non-empty object like {{\"0\": \"background\"}}")
    try:
        labels = {str(name): int(value) for value, name in d.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{src}: key 'labels' must map integer strings to names, got {d}") from None
    if len(labels) != len(d):
        raise DatasetError(f"{src}: key 'labels' has duplicate names {list(d.values())}")
    _check_label_values(labels, src)
    return labels


def _checked_ending(value: Any, key: str, src: Path) -> str:
    if not isinstance(value, str) or value not in SUPPORTED_ENDINGS:
        raise DatasetError(f"{src}: key {key!r} is {value!r}; supported endings: {', '.join(SUPPORTED_ENDINGS)}")
    return value


def _discover(images: Path, labels: Path, ending: str, channels: int, labelled: bool) -> list[Case]:
    """nnU-Net cases from ``images/*_0000<ending>``; label path recorded when ``labelled``."""
    suffix = "_0000" + ending
    if not images.is_dir():
        return []
    ids = sorted(p.name[: -len(suffix)] for p in images.iterdir() if p.name.endswith(suffix) and p.is_file())
    return [
        Case(
            case_id=cid,
            image_files=[images / f"{cid}_{c:04d}{ending}" for c in range(channels)],
            label_file=labels / f"{cid}{ending}" if labelled else None,
        )
        for cid in ids
        if not cid.startswith(".")
    ]


def image_folder_cases(folder: PathLike, dataset: DatasetInfo, *, prefixed: bool = True) -> list[Case]:
    """Unlabelled cases of an images-only folder named as nnU-Net names images (``CASE_XXXX<file_ending>``).

    With ``prefixed`` the case ids become ``u<6 hex of the folder path>_CASE`` so that they never collide
    with the dataset's own cases (preprocessing and teacher-output caches are keyed by case id). The
    folder is not read here: :func:`medkd.data.validate.check_image_folder` checks its files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"unlabelled image folder {folder} does not exist")
    cases = _discover(folder, folder, dataset.file_ending, dataset.num_channels, labelled=False)
    if prefixed:
        tag = "u" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:6]
        for case in cases:
            case.case_id = f"{tag}_{case.case_id}"
            case.metadata = {**case.metadata, "unlabeled_folder": str(folder)}
    return cases


def _load_nnunet(root: Path, d: dict[str, Any], src: Path) -> DatasetInfo:
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in d:
            raise DatasetError(f"{src}: missing required key {key!r} (nnU-Net v2 format)")
    channels = _int_key_dict(d["channel_names"], "channel_names", src)
    labels, ignore = _nnunet_labels(d["labels"], src)
    ending = _checked_ending(d["file_ending"], "file_ending", src)
    num_training = d["numTraining"]
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(f"{src}: key 'numTraining' must be a non-negative integer, got {num_training!r}")
    n = len(channels)
    training = _discover(root / "imagesTr", root / "labelsTr", ending, n, labelled=True)
    test = _discover(root / "imagesTs", root / "labelsTs", ending, n, labelled=(root / "labelsTs").is_dir())
    return DatasetInfo(root, str(d.get("name", root.name)), channels, labels, ending, "nnunet",
                       training, test, ignore_label=ignore, declared_num_training=num_training)


def _msd_entry_path(root: Path, value: Any, key: str, src: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{src}: key {key!r} must be a relative file path, got {value!r}")
    try:
        file_ending(value)
    except ValueError:
        raise DatasetError(f"{src}: key {key!r} has an unsupported file ending: {value!r}") from None
    parts = Path(os.path.normpath(value.replace("\\", "/"))).parts
    if Path(value).is_absolute() or value.startswith("~") or (parts and parts[0] == ".."):
        raise DatasetError(f"{src}: key {key!r} is {value!r}, which leaves the dataset folder {root}; "
                           "MSD paths must be relative and inside it")
    return root / value


def _msd_case(root: Path, entry: Any, key: str, src: Path, need_label: bool) -> Case:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DatasetError(f"{src}: key {key!r} must be an object with 'image' (and 'label'), got {entry!r}")
    if need_label and "label" not in entry:
        raise DatasetError(f"{src}: key {key}.label is missing")
    image = _msd_entry_path(root, entry["image"], f"{key}.image", src)
    label = _msd_entry_path(root, entry["label"], f"{key}.label", src) if entry.get("label") else None
    return Case(image.name[: -len(file_ending(image))], [image], label)


def _load_msd(root: Path, d: dict[str, Any], src: Path) -> DatasetInfo:
    for key in ("labels", "training"):
        if key not in d:
            raise DatasetError(f"{src}: missing required key {key!r} (MSD format)")
    channels = _int_key_dict(d["modality"], "modality", src)
    labels = _msd_labels(d["labels"], src)
    cases: dict[str, list[Case]] = {}
    for split in ("training", "test"):
        entries = d.get(split, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{src}: key {split!r} must be a list")
        cases[split] = [_msd_case(root, e, f"{split}[{i}]", src, split == "training") for i, e in enumerate(entries)]
    first = next((c.image_files[0] for c in (*cases["training"], *cases["test"])), None)
    ending = d.get("file_ending", file_ending(first) if first else ".nii.gz")
    ending = _checked_ending(ending, "file_ending", src)
    return DatasetInfo(root, str(d.get("name", root.name)), channels, labels, ending, "msd",
                       cases["training"], cases["test"])


def _attach_metadata(info: DatasetInfo) -> None:
    path = info.root / CASE_METADATA_FILE
    if not path.exists():
        return
    meta = _read_json(path, CASE_METADATA_FILE)
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must be an object {{case_id: {{key: value}}}}")
    for case in (*info.training, *info.test):
        entry = meta.get(case.case_id, {})
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: key {case.case_id!r} must be an object {{key: value}}, got {entry!r}")
        case.metadata = {str(k): str(v) for k, v in entry.items()}


def _check_unique(info: DatasetInfo, src: Path) -> None:
    seen: set[str] = set()
    for case in (*info.training, *info.test):
        if case.case_id in seen:
            raise DatasetError(f"{src}: case id {case.case_id!r} appears more than once")
        seen.add(case.case_id)


def load_dataset(root: PathLike) -> DatasetInfo:
    """Load an nnU-Net v2 raw or MSD dataset description from ``root/dataset.json``.

    Cases are discovered (nnU-Net) or listed (MSD); missing files are not checked here
    (see :func:`medkd.data.validate.check_dataset`). Raises :class:`DatasetError` naming the key.
    """
    root = Path(root)
    src = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    d = _read_json(src, "dataset.json")
    if not isinstance(d, dict):
        raise DatasetError(f"{src}: must contain a JSON object, got {type(d).__name__}")
    if "channel_names" in d:
        info = _load_nnunet(root, d, src)
    elif "modality" in d:
        info = _load_msd(root, d, src)
    else:
        raise DatasetError(f"{src}: needs key 'channel_names' (nnU-Net v2) or 'modality' (MSD)")
    _check_unique(info, src)
    _attach_metadata(info)
    return info


def _stack_channels(case: Case, dataset: DatasetInfo) -> tuple[np.ndarray, Geometry]:
    """Read the image files of ``case`` into ``(C, *spatial)`` float32 plus channel-0 geometry."""
    parts: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in case.image_files:
        array, geo = read_image(path)
        geometry = geometry or geo
        if array.ndim == geo.ndim:
            array = array[None]
        if parts and array.shape[1:] != parts[0].shape[1:]:
            raise DatasetError(
                f"{path}: spatial shape {array.shape[1:]} differs from {case.image_files[0]} {parts[0].shape[1:]}"
            )
        parts.append(array.astype(np.float32, copy=False))
    if geometry is None:
        raise DatasetError(f"case {case.case_id!r} has no image files")
    image = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if image.shape[0] != dataset.num_channels:
        raise DatasetError(
            f"{case.image_files[0]}: case {case.case_id!r} has {image.shape[0]} channels, "
            f"dataset.json declares {dataset.num_channels}"
        )
    return image, geometry


def _read_label(path: Path, spatial: tuple[int, ...]) -> np.ndarray:
    label, _ = read_image(path)
    if label.shape != spatial:
        raise DatasetError(f"{path}: label shape {label.shape} differs from image shape {spatial}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise DatasetError(f"{path}: label contains non-integer values")
    if label.size and (label.min() < np.iinfo(np.int16).min or label.max() > np.iinfo(np.int16).max):
        raise DatasetError(f"{path}: label values [{label.min()}, {label.max()}] do not fit int16")
    return label.astype(np.int16)


def read_case(case: Case, dataset: DatasetInfo) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read one case.

    Returns ``image`` float32 ``(C, *spatial)`` in numpy order (spatial ``(z, y, x)`` or ``(y, x)``),
    ``label`` int16 ``(*spatial)`` or None when the case has no label file, and channel 0's geometry.
    Raises :class:`~medkd.data.io.ImageReadError` / :class:`DatasetError` naming the file.
    """
    image, geometry = _stack_channels(case, dataset)
    label = _read_label(case.label_file, image.shape[1:]) if case.label_file is not None else None
    return image, label, geometry
