"""Train/validation splits: nnU-Net's ``splits_final.json`` or a seeded (grouped) k-fold."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medkd.data.dataset import DatasetError, DatasetInfo

SPLITS_FILE = "splits_final.json"


def _load_splits(path: Path) -> list:
    """The folds of ``splits_final.json``; :class:`DatasetError` naming the file when unreadable or malformed."""
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{path}: must be a non-empty list of {{'train': [...], 'val': [...]}}")
    return splits


def _listing(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:10]) + (f" ... ({len(ids)} in all)" if len(ids) > 10 else "")


def _fold_problems(path: Path, fold: int, entry: object, known: set[str]) -> list[str]:
    """Everything that makes fold ``fold`` of ``splits_final.json`` unusable for training (messages name the file)."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("train", "val")):
        return [f"{path}: fold {fold} must be an object with lists 'train' and 'val'"]
    train, val = [str(c) for c in entry["train"]], [str(c) for c in entry["val"]]
    problems = []
    paths = {c for c in train + val if "/" in c or "\\" in c or c.startswith(".")}
    if paths:
        problems.append(f"{path}: fold {fold} names file paths, not case ids (they would leave the dataset): "
                        f"{_listing(paths)}")
    unknown = set(train + val) - known - paths
    if unknown:
        problems.append(f"{path}: fold {fold} names {len(unknown)} unknown case id(s): {_listing(unknown)}")
    overlap = set(train) & set(val)
    if overlap:
        problems.append(f"{path}: fold {fold} has cases in both 'train' and 'val': {_listing(overlap)}")
    if not train:
        problems.append(f"{path}: fold {fold} has an empty 'train' list")
    return problems


def splits_file_problems(dataset: DatasetInfo) -> list[str]:
    """Every problem of the dataset's ``splits_final.json`` over all folds (empty: usable or absent).

    ``medkd check-data`` reports these; :func:`get_split` refuses a fold with any of them.
    """
    path = dataset.root / SPLITS_FILE
    if not path.exists():
        return []
    try:
        splits = _load_splits(path)
    except DatasetError as exc:
        return [str(exc)]
    known = {c.case_id for c in dataset.training}
    return [msg for fold, entry in enumerate(splits) for msg in _fold_problems(path, fold, entry, known)]


def _split_from_file(dataset: DatasetInfo, fold: int) -> tuple[list[str], list[str]]:
    path = dataset.root / SPLITS_FILE
    splits = _load_splits(path)
    if not 0 <= fold < len(splits):
        raise IndexError(f"{path}: fold {fold} out of range, the file defines folds 0..{len(splits) - 1}")
    problems = _fold_problems(path, fold, splits[fold], {c.case_id for c in dataset.training})
    if problems:
        raise DatasetError("; ".join(problems))
    entry = splits[fold]
    return sorted(str(c) for c in entry["train"]), sorted(str(c) for c in entry["val"])


def group_cases(case_ids: Iterable[str], group_regex: str | None) -> dict[str, list[str]]:
    """Map group key -> sorted case ids. Without a regex each case is its own group.

    The key is regex group 1 when the pattern has a group, else the whole match (``re.search``).
    A case the regex does not match raises :class:`DatasetError` naming it.
    """
    ids = sorted(set(case_ids))
    if group_regex is None:
        return {c: [c] for c in ids}
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise ValueError(f"invalid group_regex {group_regex!r}: {exc}") from None
    groups: dict[str, list[str]] = {}
    for cid in ids:
        m = pattern.search(cid)
        if m is None:
            raise DatasetError(f"group_regex {group_regex!r} does not match case id {cid!r}")
        key = m.group(1) if pattern.groups >= 1 else m.group(0)
        groups.setdefault(key, []).append(cid)
    return groups


def assign_folds(groups: dict[str, list[str]], num_folds: int, seed: int) -> list[list[str]]:
    """Distribute groups over ``num_folds`` folds: seeded shuffle, then largest groups first into
    the currently smallest fold (ties -> lowest fold index). Returns sorted case ids per fold."""
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    shuffled.sort(key=lambda k: -len(groups[k]))  # stable: equal sizes keep the shuffled order
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    for key in shuffled:
        target = min(range(num_folds), key=lambda f: (len(folds[f]), f))
        folds[target].extend(groups[key])
    return [sorted(f) for f in folds]


def get_split(
    dataset: DatasetInfo,
    fold: int = 0,
    num_folds: int = 5,
    group_regex: str | None = None,
    seed: int = 12345,
) -> tuple[list[str], list[str]]:
    """``(train_case_ids, val_case_ids)`` for ``fold``, both sorted.

    Uses ``root/splits_final.json`` (nnU-Net format) when present, in which case ``num_folds``,
    ``group_regex`` and ``seed`` are ignored. Otherwise a deterministic k-fold over the training
    case ids, seeded with ``seed``; with ``group_regex`` (e.g. ``r"^(patient\\d+)"``) cases with the
    same match stay in the same fold. ``IndexError`` for a fold out of range.
    """
    if (dataset.root / SPLITS_FILE).is_file():
        return _split_from_file(dataset, fold)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise IndexError(f"fold {fold} out of range for num_folds={num_folds} (valid: 0..{num_folds - 1})")
    groups = group_cases((c.case_id for c in dataset.training), group_regex)
    if len(groups) < num_folds:
        what = "groups" if group_regex else "training cases"
        raise DatasetError(
            f"{dataset.root}: {len(groups)} {what} cannot be split into {num_folds} folds"
        )
    folds = assign_folds(groups, num_folds, seed)
    val = folds[fold]
    train = sorted(c for f, ids in enumerate(folds) if f != fold for c in ids)
    return train, val


def subset_cases(case_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Seeded random subset of ``round(fraction * n)`` (at least 1) distinct case ids, sorted."""
    ids = sorted(set(case_ids))
    if not ids:
        raise ValueError("subset_cases needs at least one case id")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(ids))))
    chosen = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in chosen)


def labeled_subset(case_ids: Sequence[str], *, count: int | None = None, fraction: float | None = None,
                   group_regex: str | None = None, seed: int = 0) -> list[str]:
    """The training cases whose labels a few-label run keeps (sorted); the others become unlabelled images.

    Groups (``group_regex``, e.g. one patient's frames) are kept whole: groups are drawn in a seeded
    random order until ``count`` cases (or ``round(fraction * n)``, at least one group) are reached,
    so the result may exceed the target by part of one group. The choice depends only on the case ids,
    the target and ``seed``: a teacher and its students with the same settings keep the same labels.
    """
    if (count is None) == (fraction is None):
        raise ValueError("give exactly one of count and fraction")
    ids = sorted(set(case_ids))
    if not ids:
        raise ValueError("labeled_subset needs at least one case id")
    target = count if count is not None else max(1, int(round(fraction * len(ids))))
    if target > len(ids):
        raise ValueError(f"{target} labelled cases requested but the training split has only {len(ids)}")
    groups = list(group_cases(ids, group_regex).values())
    order = np.random.default_rng(seed).permutation(len(groups))
    chosen: list[str] = []
    for index in order:
        if len(chosen) >= target:
            break
        chosen.extend(groups[index])
    return sorted(chosen)
