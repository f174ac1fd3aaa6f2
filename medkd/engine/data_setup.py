"""From a run config to preprocessed training and validation cases (shared by train and distill)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medkd.config import ConfigError, DataConfig
from medkd.data.dataset import DatasetInfo, load_dataset
from medkd.data.preprocess import PreprocessedCase, PreprocessedStore, PreprocessingPlan, make_plan
from medkd.data.splits import get_split, subset_cases
from medkd.data.validate import check_dataset

log = logging.getLogger(__name__)


class DataCheckError(ValueError):
    """The dataset failed validation; ``problems`` lists every finding."""

    def __init__(self, root: Path, problems: list):
        self.problems = problems
        listing = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"dataset {root} has {len(problems)} problem(s):\n{listing}{more}")


@dataclass
class TrainingData:
    dataset: DatasetInfo
    plan: PreprocessingPlan
    train: list[PreprocessedCase]
    val: list[PreprocessedCase]


def _listing(ids: list[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def select_cases(cases: list[str], train_ids: list[str], val_ids: list[str], fold: int = 0) -> list[str]:
    """The training cases named by ``data.cases`` (sorted); they must be training cases of this fold.

    Raises:
        ConfigError: ids not in the dataset's training cases, or in this fold's validation split
            (training on them would leak into validation); the message names ``data.cases`` and the ids.
    """
    train, val = set(train_ids), set(val_ids)
    in_val = sorted(c for c in cases if c in val)
    unknown = sorted(c for c in cases if c not in train and c not in val)
    problems = []
    if unknown:
        problems.append(f"unknown training case id(s) {_listing(unknown)}")
    if in_val:
        problems.append(f"case id(s) {_listing(in_val)} are in the validation split of fold {fold}")
    if problems:
        raise ConfigError(f"data.cases: {'; '.join(problems)}")
    return sorted(cases)


def split_case_ids(cfg: DataConfig, dataset: DatasetInfo, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training ids, validation ids)`` a run trains and validates on, both sorted.

    The fold split (:func:`~medkd.data.splits.get_split`), then ``data.cases`` (if set), then the
    seeded ``data.data_fraction`` subset (seed = ``train.seed``) of the training ids.
    """
    train_ids, val_ids = get_split(dataset, fold=cfg.fold, num_folds=cfg.num_folds, group_regex=cfg.group_regex)
    if cfg.cases is not None:
        train_ids = select_cases(cfg.cases, train_ids, val_ids, fold=cfg.fold)
    if cfg.data_fraction < 1.0:
        train_ids = subset_cases(train_ids, cfg.data_fraction, seed=seed)
    return train_ids, val_ids


def prepare_training_data(cfg: DataConfig, seed: int = 0, check: bool | None = None) -> TrainingData:
    """Check the dataset, split it, plan preprocessing and fill the cache (reusing what is there)."""
    if cfg.dataset is None:
        raise ValueError("data.dataset is not set: pass --dataset or set it in the config")
    root = Path(cfg.dataset)
    if check if check is not None else cfg.check:
        problems = check_dataset(root, include_test=False)
        if problems:
            raise DataCheckError(root, problems)
    dataset = load_dataset(root)
    train_ids, val_ids = split_case_ids(cfg, dataset, seed=seed)
    train_cases = [dataset.case(i) for i in train_ids]
    val_cases = [dataset.case(i) for i in val_ids]
    plan = make_plan(dataset, train_cases, mode=cfg.mode, normalization=cfg.normalization,
                     target_spacing=cfg.target_spacing, crop_nonzero=cfg.crop_nonzero)
    store = PreprocessedStore(dataset, plan, cfg.cache_dir)
    train = store.ensure(train_cases, num_workers=max(1, cfg.num_workers))
    val = store.ensure(val_cases, num_workers=max(1, cfg.num_workers))
    log.info("data: %d training / %d validation cases, cache %s", len(train), len(val), store.folder)
    return TrainingData(dataset=dataset, plan=plan, train=train, val=val)
