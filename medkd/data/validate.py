"""Dataset validation: list every problem in a dataset instead of failing on the first.

Problem kinds (``Problem.kind``):

- ``bad-dataset-json``: dataset.json missing/malformed (then it is the only problem), or
  ``numTraining`` disagreeing with the discovered cases
- ``empty-dataset``: no training cases
- ``missing-file``: an expected image channel or label file does not exist
- ``unreadable``: a file exists but cannot be read (corrupt, truncated, RGB png, ...)
- ``shape-mismatch``: channel/label spatial shapes differ, or wrong number of channels
- ``geometry-mismatch``: spacing, origin or direction differ between channels/label
- ``unknown-label``: label values not declared in dataset.json (or non-integer values)
- ``nan-inf``: NaN or Inf voxels in an image
- ``orphan-file``: a file in imagesTr/labelsTr/imagesTs/labelsTs that belongs to no case
- ``bad-splits``: ``splits_final.json`` is invalid JSON or malformed, names unknown case ids or file
  paths, puts a case in both 'train' and 'val' of a fold, or has a fold without training cases
- ``no-foreground``: no training label holds any foreground class (nothing to learn: Dice 0)
- ``constant-image``: every training image is constant (an error), or one image channel is (a warning)
- ``absent-class`` (warning): a class declared in dataset.json appears in no training label

``Problem.severity`` is ``"error"`` (the data cannot train: ``check-data`` exits 1, ``train`` refuses)
or ``"warning"`` (suspicious: reported, training goes on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medkd.data.dataset import Case, DatasetError, DatasetInfo, image_folder_cases, load_dataset
from medkd.data.io import Geometry, ImageReadError, PathLike, read_image
from medkd.data.splits import SPLITS_FILE, splits_file_problems


@dataclass
class Problem:
    """One problem found in a dataset; ``kind`` is a short slug (see module docstring)."""

    kind: str
    message: str
    case: str | None = None
    file: Path | None = None
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        parts = [f"case {self.case}" if self.case else "", f"file {self.file}" if self.file else ""]
        where = ", ".join(part for part in parts if part)
        tag = f"[{self.kind}]" if self.severity == "error" else f"warning [{self.kind}]"
        return f"{tag} {where}: {self.message}" if where else f"{tag} {self.message}"


def errors(problems: list[Problem]) -> list[Problem]:
    """The problems that make the data unusable (``severity == "error"``)."""
    return [p for p in problems if p.severity == "error"]


@dataclass
class _Summary:
    """What the training cases hold, gathered while they are checked, for the dataset-wide checks."""

    cases: int = 0
    images_read: int = 0  # cases whose image files were all read
    constant: int = 0  # ... of which every channel is constant
    labels_read: int = 0
    class_cases: dict[int, int] = field(default_factory=dict)  # class value -> labels holding it


@dataclass
class _Loaded:
    path: Path
    array: np.ndarray
    geometry: Geometry


def _read(path: Path, case: Case, what: str, problems: list[Problem]) -> _Loaded | None:
    if not path.exists():
        problems.append(Problem("missing-file", f"{what} file is missing", case.case_id, path))
        return None
    try:
        array, geometry = read_image(path)
    except ImageReadError as exc:
        problems.append(Problem("unreadable", f"{what}: {exc.reason}", case.case_id, path))
        return None
    return _Loaded(path, array, geometry)


def _check_finite(item: _Loaded, case: Case, problems: list[Problem]) -> None:
    if not np.issubdtype(item.array.dtype, np.floating):
        return
    n_nan, n_inf = int(np.isnan(item.array).sum()), int(np.isinf(item.array).sum())
    if n_nan or n_inf:
        problems.append(Problem("nan-inf", f"image has {n_nan} NaN and {n_inf} Inf voxels", case.case_id, item.path))


def _spatial_shape(item: _Loaded) -> tuple[int, ...]:
    return item.array.shape[-item.geometry.ndim :]


def _channels_in(item: _Loaded) -> int:
    return item.array.shape[0] if item.array.ndim > item.geometry.ndim else 1


def _compare(item: _Loaded, ref: _Loaded, case: Case, what: str, problems: list[Problem]) -> None:
    """Spatial shape and geometry of ``item`` against the reference image."""
    if _spatial_shape(item) != _spatial_shape(ref):
        problems.append(Problem(
            "shape-mismatch",
            f"{what} spatial shape {_spatial_shape(item)} differs from {ref.path.name} {_spatial_shape(ref)}",
            case.case_id, item.path,
        ))
        return
    for name in item.geometry.differences(ref.geometry):
        if name == "ndim":
            continue  # same numpy shape with different geometry ndim cannot happen; guarded anyway
        problems.append(Problem(
            "geometry-mismatch",
            f"{what} {name} {getattr(item.geometry, name)} differs from {ref.path.name} {getattr(ref.geometry, name)}",
            case.case_id, item.path,
        ))


def _constant_channels(item: _Loaded) -> list[tuple[int, float]]:
    """(channel index within the file, value) of each channel of ``item`` whose voxels are all equal."""
    flat = item.array.reshape(_channels_in(item), -1)
    if not flat.size:
        return []
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    return [(c, float(lo[c])) for c in range(len(lo)) if lo[c] == hi[c]]


def _check_constant(loaded: list[_Loaded], case: Case, problems: list[Problem]) -> bool:
    """Warn about each constant channel; True when every channel of the case is constant."""
    constant = total = 0
    for item in loaded:
        total += _channels_in(item)
        for channel, value in _constant_channels(item):
            constant += 1
            where = f"channel {channel} of the image" if _channels_in(item) > 1 else "the image"
            problems.append(Problem("constant-image", f"{where} is constant (every voxel is {value:g}): it carries "
                                    "no information and normalisation makes it all zeros", case.case_id,
                                    item.path, severity="warning"))
    return total > 0 and constant == total


def _check_images(case: Case, info: DatasetInfo, problems: list[Problem],
                  summary: _Summary | None = None) -> _Loaded | None:
    """Read and check all image files of a case; return the reference (first readable) image."""
    loaded: list[_Loaded] = []
    for index, path in enumerate(case.image_files):
        what = f"image channel {index}" if info.format == "nnunet" else "image"
        item = _read(path, case, what, problems)
        if item is not None:
            _check_finite(item, case, problems)
            loaded.append(item)
    if not loaded:
        return None
    ref = loaded[0]
    for item in loaded[1:]:
        _compare(item, ref, case, f"image {item.path.name}", problems)
    all_constant = _check_constant(loaded, case, problems)
    if len(loaded) == len(case.image_files):
        if summary is not None:
            summary.images_read += 1
            summary.constant += all_constant
        found = sum(_channels_in(item) for item in loaded)
        if found != info.num_channels:
            problems.append(Problem(
                "shape-mismatch",
                f"case has {found} image channel(s), dataset.json declares {info.num_channels}",
                case.case_id, ref.path,
            ))
    return ref


def _label_values(label: np.ndarray) -> np.ndarray:
    if np.issubdtype(label.dtype, np.integer) and label.size and label.min() >= 0 and label.max() < 1 << 16:
        return np.flatnonzero(np.bincount(label.ravel()))
    return np.unique(label)


def _check_label(case: Case, info: DatasetInfo, ref: _Loaded | None, problems: list[Problem],
                 summary: _Summary | None = None) -> None:
    if case.label_file is None:
        return
    item = _read(case.label_file, case, "label", problems)
    if item is None:
        return
    if ref is not None:
        if item.array.ndim != item.geometry.ndim:
            problems.append(Problem("shape-mismatch", f"label has {item.array.ndim} dimensions with "
                                    f"{_channels_in(item)} channels; expected one channel", case.case_id, item.path))
            return
        _compare(item, ref, case, "label", problems)
    values = _label_values(item.array)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        problems.append(Problem("unknown-label", "label contains non-integer or non-finite values",
                                case.case_id, item.path))
        return
    if summary is not None:
        summary.labels_read += 1
        for value in values:
            summary.class_cases[int(value)] = summary.class_cases.get(int(value), 0) + 1
    allowed = set(info.labels.values()) | ({info.ignore_label} if info.ignore_label is not None else set())
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        problems.append(Problem(
            "unknown-label",
            f"label values {unknown} are not declared in dataset.json 'labels' (declared: {sorted(allowed)})",
            case.case_id, item.path,
        ))


def check_case(case: Case, info: DatasetInfo, summary: _Summary | None = None) -> list[Problem]:
    """All problems of one case (files, readability, shapes, geometry, labels, NaN/Inf, constant images).

    ``summary`` (training cases) gathers what :func:`_dataset_problems` needs.
    """
    problems: list[Problem] = []
    if summary is not None:
        summary.cases += 1
    ref = _check_images(case, info, problems, summary)
    _check_label(case, info, ref, problems, summary)
    return problems


def _dataset_problems(info: DatasetInfo, summary: _Summary) -> list[Problem]:
    """Dataset-wide findings, made only when every training file in question could be read."""
    problems: list[Problem] = []
    n = summary.cases
    where = ("labelsTr", "imagesTr") if info.format == "nnunet" else ("dataset.json", "dataset.json")
    labels_at, images_at = info.root / where[0], info.root / where[1]
    if n and summary.labels_read == n:
        names = {value: name for name, value in info.labels.items()}
        present = {v for v in summary.class_cases if v != 0 and v != info.ignore_label and v in names}
        if not present:
            problems.append(Problem("no-foreground", f"none of the {n} training labels holds a foreground class "
                                    "(all background): there is nothing to learn", None, labels_at))
        else:
            problems.extend(Problem("absent-class", f"class {names[v]!r} ({v}) appears in none of the {n} training "
                                    "labels: it cannot be learnt", None, labels_at, severity="warning")
                            for v in sorted(names) if v != 0 and v not in present)
    if n and summary.images_read == n and summary.constant == n:
        problems.append(Problem("constant-image", f"all {n} training images are constant: there is nothing to "
                                "learn from", None, images_at))
    return problems


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _nnunet_orphans(info: DatasetInfo, images: Path, labels: Path, cases: list[Case]) -> list[Problem]:
    ending, ids = info.file_ending, {c.case_id for c in cases}
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    problems: list[Problem] = []
    partial: set[str] = set()
    for path in _visible_files(images):
        m = pattern.match(path.name)
        if m is None:
            problems.append(Problem("orphan-file", f"image name does not follow CASE_XXXX{ending} "
                                    "(file_ending in dataset.json)", None, path))
        elif int(m.group(2)) >= info.num_channels:
            problems.append(Problem("orphan-file", f"channel {int(m.group(2))} is not declared in dataset.json "
                                    f"'channel_names' ({info.num_channels} channel(s))", m.group(1), path))
        elif m.group(1) not in ids and m.group(1) not in partial:
            partial.add(m.group(1))
            missing = images / f"{m.group(1)}_0000{ending}"
            problems.append(Problem("missing-file", "image channel 0 file is missing, so the case is not "
                                    "discovered although other channel files exist", m.group(1), missing))
    for path in _visible_files(labels):
        if not path.name.endswith(ending):
            problems.append(Problem("orphan-file", f"label ending differs from file_ending {ending!r}", None, path))
        elif path.name[: -len(ending)] not in ids | partial:
            problems.append(Problem("orphan-file", f"label file without an image ({images.name}/"
                                    f"{path.name[: -len(ending)]}_0000{ending} not found)",
                                    path.name[: -len(ending)], path))
    return problems


def _msd_orphans(info: DatasetInfo, folders: list[Path]) -> list[Problem]:
    listed = {p.resolve() for c in (*info.training, *info.test) for p in (*c.image_files, c.label_file) if p}
    problems = []
    for folder in folders:
        for path in _visible_files(folder):
            if path.resolve() not in listed:
                what = "label file without an image" if folder.name.startswith("labels") else "image"
                problems.append(Problem("orphan-file", f"{what} not listed in dataset.json", None, path))
    return problems


def find_orphans(info: DatasetInfo, include_test: bool = True) -> list[Problem]:
    """Files in imagesTr/labelsTr (and imagesTs/labelsTs) that belong to no case."""
    pairs = [("imagesTr", "labelsTr", info.training)] + ([("imagesTs", "labelsTs", info.test)] if include_test else [])
    if info.format == "msd":
        return _msd_orphans(info, [info.root / name for a, b, _ in pairs for name in (a, b)])
    return [p for a, b, cases in pairs for p in _nnunet_orphans(info, info.root / a, info.root / b, cases)]


def _iterate(cases: list[Case], progress: bool) -> Iterable[Case]:
    if not progress:
        return cases
    from tqdm import tqdm

    return tqdm(cases, desc="checking cases", unit="case")


def check_dataset(root: PathLike, include_test: bool = True, progress: bool = False) -> list[Problem]:
    """Every problem in the dataset at ``root`` (empty list: dataset is clean).

    A missing/malformed dataset.json gives a single ``bad-dataset-json`` problem. Otherwise
    ``splits_final.json`` (when present) is checked, each training case (and test case when
    ``include_test``) is read completely and checked, then what the training cases hold together
    (any foreground at all, every declared class, any non-constant image). Warnings are included:
    filter with :func:`errors`.
    """
    root = Path(root)
    try:
        info = load_dataset(root)
        info.num_classes  # validates consecutive label values
    except DatasetError as exc:
        return [Problem("bad-dataset-json", str(exc), None, root / "dataset.json")]
    problems: list[Problem] = []
    if not info.training:
        problems.append(Problem("empty-dataset", "no training cases found (nnU-Net: imagesTr/*_0000"
                                f"{info.file_ending}; MSD: 'training' list)", None, root / "imagesTr"))
    declared = info.declared_num_training
    if declared is not None and declared != len(info.training):
        problems.append(Problem("bad-dataset-json", f"key 'numTraining' is {declared} but "
                                f"{len(info.training)} training case(s) were found", None, root / "dataset.json"))
    problems.extend(Problem("bad-splits", message.removeprefix(f"{root / SPLITS_FILE}: "), None, root / SPLITS_FILE)
                    for message in splits_file_problems(info))
    summary = _Summary()
    training = {case.case_id for case in info.training}
    cases = info.training + (info.test if include_test else [])
    for case in _iterate(cases, progress):
        problems.extend(check_case(case, info, summary if case.case_id in training else None))
    problems.extend(_dataset_problems(info, summary))
    problems.extend(find_orphans(info, include_test))
    return problems


def check_image_folder(folder: PathLike, info: DatasetInfo) -> list[Problem]:
    """Every problem of an images-only folder used as unlabelled data for ``info``'s dataset.

    The images must follow the dataset's naming and file ending (``CASE_XXXX<file_ending>``), have all
    of its channels with one shape and geometry per case, be readable and hold no NaN/Inf voxels.
    """
    folder = Path(folder)
    try:
        cases = image_folder_cases(folder, info, prefixed=False)
    except DatasetError as exc:
        return [Problem("missing-file", str(exc), None, folder)]
    problems = [] if cases else [Problem("empty-dataset", f"no images named CASE_0000{info.file_ending} "
                                         "(file_ending of the dataset)", None, folder)]
    for case in cases:
        problems.extend(check_case(case, info))
    problems.extend(_nnunet_orphans(info, folder, folder / ".no-labels", cases))
    return problems
