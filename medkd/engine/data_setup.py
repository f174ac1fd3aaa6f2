"""From a run config to preprocessed training and validation cases (shared by train and distill)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medkd.config import ConfigError, DataConfig
from medkd.data.dataset import Case, DatasetInfo, image_folder_cases, load_dataset
from medkd.data.preprocess import PreprocessedCase, PreprocessingPlan, make_plan
from medkd.data.store import PreprocessedStore
from medkd.data.splits import get_split, labeled_subset, subset_cases
from medkd.data.validate import Problem, check_dataset, check_image_folder, errors

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
    """Preprocessed cases of a run. ``train`` are the labelled training cases; ``unlabeled`` (distillation
    runs only) the training cases whose labels a few-label run hides plus the images-only folders, with
    ``label_path`` None so no label can leak into training."""

    dataset: DatasetInfo
    plan: PreprocessingPlan
    train: list[PreprocessedCase]
    val: list[PreprocessedCase]
    unlabeled: list[PreprocessedCase] = field(default_factory=list)


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


def split_labels(cfg: DataConfig, train_ids: list[str]) -> tuple[list[str], list[str]]:
    """``(labelled ids, hidden ids)``: a few-label run keeps the labels of ``data.labeled_cases`` /
    ``data.labeled_fraction`` of the training cases (whole ``group_regex`` groups, ``labeled_seed``)."""
    if not cfg.few_labels:
        return train_ids, []
    try:
        labelled = labeled_subset(train_ids, count=cfg.labeled_cases, fraction=cfg.labeled_fraction,
                                  group_regex=cfg.group_regex, seed=cfg.labeled_seed)
    except ValueError as err:
        key = "data.labeled_cases" if cfg.labeled_cases is not None else "data.labeled_fraction"
        raise ConfigError(f"{key}: {err}") from None
    chosen = set(labelled)
    return labelled, [i for i in train_ids if i not in chosen]


def _raise_errors(root: Path, problems: list[Problem]) -> None:
    """Log each warning; raise :class:`DataCheckError` listing the errors, if any."""
    for problem in problems:
        if problem.severity != "error":
            log.warning("dataset %s: %s", root, problem)
    if errors(problems):
        raise DataCheckError(root, errors(problems))


def _unlabeled_cases(cfg: DataConfig, dataset: DatasetInfo, hidden_ids: list[str], check: bool) -> list[Case]:
    cases = [dataset.case(i) for i in hidden_ids]
    for folder in cfg.unlabeled:
        if check:
            _raise_errors(Path(folder), check_image_folder(folder, dataset))
        cases += image_folder_cases(folder, dataset)
    return cases


def plan_from(source: Path, cfg: DataConfig, dataset: DatasetInfo) -> PreprocessingPlan:
    """The preprocessing plan of checkpoint or teacher set ``source`` (``data.preprocessing_from``), checked
    against the run's mode and the dataset's channels."""
    from medkd.storage import load_checkpoint
    from medkd.teachers.manifest import open_teachers

    checkpoint = open_teachers(source).members[0].checkpoint
    plan = PreprocessingPlan.from_dict(load_checkpoint(checkpoint)["preprocessing"]["plan"])
    if plan.mode != cfg.mode:
        raise ConfigError(f"data.preprocessing_from: {checkpoint} preprocesses for data.mode={plan.mode}, "
                          f"the run has data.mode={cfg.mode}")
    if plan.num_channels != dataset.num_channels:
        raise ConfigError(f"data.preprocessing_from: {checkpoint} takes {plan.num_channels} channel(s), "
                          f"dataset {dataset.root} has {dataset.num_channels}")
    return plan


def prepare_training_data(cfg: DataConfig, seed: int = 0, check: bool | None = None,
                          with_unlabeled: bool = False, progress: bool = False) -> TrainingData:
    """Check the dataset, split it, plan preprocessing and fill the cache (reusing what is there).

    ``with_unlabeled`` (distillation) also prepares the unlabelled images (see :class:`TrainingData`);
    ``progress`` shows bars for the check and for the cases preprocessed now.
    """
    if cfg.dataset is None:
        raise ValueError("data.dataset is not set: pass --dataset or set it in the config")
    root = Path(cfg.dataset)
    check = cfg.check if check is None else check
    if check:
        _raise_errors(root, check_dataset(root, include_test=False, progress=progress))
    dataset = load_dataset(root)
    train_ids, val_ids = split_case_ids(cfg, dataset, seed=seed)
    train_ids, hidden_ids = split_labels(cfg, train_ids)
    train_cases = [dataset.case(i) for i in train_ids]
    plan = plan_from(cfg.preprocessing_from, cfg, dataset) if cfg.preprocessing_from is not None else \
        make_plan(dataset, train_cases, mode=cfg.mode, normalization=cfg.normalization,
                  target_spacing=cfg.target_spacing, crop_nonzero=cfg.crop_nonzero)
    store = PreprocessedStore(dataset, plan, cfg.cache_dir)
    workers = max(1, cfg.num_workers)
    train = store.ensure(train_cases, num_workers=workers, progress=progress)
    val = store.ensure([dataset.case(i) for i in val_ids], num_workers=workers, progress=progress)
    unlabeled = []
    if with_unlabeled:
        unlabeled = [dataclasses.replace(c, label_path=None, locations_path=None)
                     for c in store.ensure(_unlabeled_cases(cfg, dataset, hidden_ids, check), num_workers=workers,
                                          progress=progress)]
    log.info("data: %d labelled training / %d unlabelled / %d validation cases, cache %s",
             len(train), len(unlabeled), len(val), store.folder)
    return TrainingData(dataset=dataset, plan=plan, train=train, val=val, unlabeled=unlabeled)
