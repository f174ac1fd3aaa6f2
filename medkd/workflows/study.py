"""The study file of ``medkd experiment``: a validated schema, checked before any training.

A study compares students trained on labels alone with the same students distilled by each recipe,
over seeds, budgets and labelled fractions, on one dataset's held-out cases (``imagesTs`` /
``labelsTs``). Example (every key; relative paths are relative to the study file)::

    name: phantoms                     # optional, for titles
    dataset: data/Dataset001_Phantoms2D
    data: {mode: 2d, patch_size: [64, 64], batch_size: 8}   # run-config data keys shared by every run
    train: {lr: 0.003, val_every: 100}                      # run-config train keys shared by every run
    teacher:                           # trained by the study (one per labelled setting) ...
      model: {name: unet, preset: teacher, shrink: 2}
      steps: 200                       # and/or minutes
      seed: 0
      data: {batch_size: 4}            # optional: run-config keys for the teacher only, over the shared ones
      train: {val_every: 50}
    # teacher: {path: runs/teacher}    # ... or an existing run folder, best.pt or teacher set
    students:
      - {name: small, model: {name: unet, preset: student, shrink: 4}}
    recipes: [balanced-kd, logit-kd]   # shipped names or YAML files; labels-only is always added
    seeds: [0, 1, 2]
    budgets: [{steps: 200}, {minutes: 2}]   # equal-steps and equal-time views
    labeled_fractions: [0.1]           # optional (or labeled_cases: [3]); default: all labels
    unlabeled: []                      # optional folders of unlabelled images for distillation
    latency_cases: 5                   # test cases timed for CPU latency

Unknown keys are errors naming the key; so are keys the study sets itself (``data.dataset``,
``train.max_steps``, ``train.seed``...). :func:`load_study` also checks, before anything trains, that
the dataset and its test split exist, every recipe and model name is known, the teacher path and
unlabelled folders exist, and that every run config of the study validates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medkd.config import ConfigError, DataConfig, ModelConfig, TrainConfig, format_validation_error, load_yaml

#: run-config keys the study sets itself, with the study key to use instead
RESERVED = {
    "data.dataset": "dataset", "data.labeled_fraction": "labeled_fractions", "data.labeled_cases": "labeled_cases",
    "data.unlabeled": "unlabeled", "train.max_steps": "budgets", "train.max_time_min": "budgets",
    "train.max_epochs": "budgets", "train.seed": "seeds",
}
LABELS_ONLY = "labels-only"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_reserved(section: str, keys: dict[str, Any]) -> dict[str, Any]:
    """``keys`` (a ``data`` or ``train`` dict of run-config keys), refusing the ones the study sets itself."""
    known = (DataConfig if section == "data" else TrainConfig).model_fields
    for key in keys:
        if f"{section}.{key}" in RESERVED:
            raise ValueError(f"{section}.{key} is set by the study: use `{RESERVED[section + '.' + key]}`")
        if key not in known:
            raise ValueError(f"{section}.{key}: unknown run-config key; known: {', '.join(known)}")
    return keys


class Budget(_Strict):
    """A training budget: optimiser steps, wall-clock minutes, or both (whichever ends first)."""

    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> "Budget":
        if self.steps is None and self.minutes is None:
            raise ValueError("a budget needs steps or minutes")
        return self

    @property
    def tag(self) -> str:
        """Folder-name part: ``steps200``, ``min2``, ``steps200-min2``."""
        parts = ([f"steps{self.steps}"] if self.steps else []) + ([f"min{self.minutes:g}"] if self.minutes else [])
        return "-".join(parts)

    @property
    def view(self) -> str:
        """``equal steps``, ``equal time`` or, with both limits, ``steps or time``."""
        if self.minutes is None:
            return "equal steps"
        return "equal time" if self.steps is None else "steps or time"

    def train_keys(self) -> dict[str, Any]:
        """The run config's ``train.max_steps`` / ``train.max_time_min`` of this budget."""
        return {"max_steps": self.steps, "max_time_min": self.minutes}


class TeacherSpec(_Strict):
    """Either an existing teacher (``path``) or one the study trains (``model`` and a budget)."""

    path: Path | None = Field(None, description="run folder, checkpoint (best.pt) or teacher set (teachers.json)")
    model: ModelConfig | None = None
    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    seed: int = 0
    data: dict[str, Any] = Field(default_factory=dict, description="run-config data keys of the teacher only")
    train: dict[str, Any] = Field(default_factory=dict, description="run-config train keys of the teacher only")

    @field_validator("data", "train")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        return _check_reserved(info.field_name, value)

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if (self.path is None) == (self.model is None):
            raise ValueError("give teacher.path (an existing teacher) or teacher.model (trained by the study)")
        if self.model is not None and self.steps is None and self.minutes is None:
            raise ValueError("a teacher trained by the study needs teacher.steps or teacher.minutes")
        if self.path is not None and (self.steps or self.minutes or self.data or self.train):
            raise ValueError("teacher.steps/minutes/data/train apply to a trained teacher, not to teacher.path")
        return self

    @property
    def budget(self) -> Budget:
        """The trained teacher's budget (steps and/or minutes)."""
        return Budget(steps=self.steps, minutes=self.minutes)


class StudentSpec(_Strict):
    name: str = Field(description="label in folder names and tables")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="student"))

    @field_validator("model", mode="before")
    @classmethod
    def _student_preset(cls, value: Any) -> Any:
        """A student's model is the student preset unless it says otherwise (ModelConfig defaults to teacher)."""
        return {"preset": "student", **value} if isinstance(value, dict) else value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value) or "__" in value:
            raise ValueError(f"{value!r}: use letters, digits, '_', '-', '.' (no '__'), starting with a letter or digit")
        return value


class Study(_Strict):
    name: str = "study"
    dataset: Path
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    teacher: TeacherSpec
    students: list[StudentSpec] = Field(min_length=1)
    recipes: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budgets: list[Budget] = Field(min_length=1)
    labeled_fractions: list[float] | None = None
    labeled_cases: list[int] | None = None
    unlabeled: list[Path] = Field(default_factory=list)
    latency_cases: int = Field(5, ge=1)

    @field_validator("data", "train")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        return _check_reserved(info.field_name, value)

    @model_validator(mode="after")
    def _consistent(self) -> "Study":
        for what, values in (("students", [s.name for s in self.students]), ("seeds", self.seeds),
                             ("recipes", self.recipes), ("budgets", [b.tag for b in self.budgets])):
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{what} lists {', '.join(dupes)} more than once")
        if any(not 0 < f <= 1 for f in self.labeled_fractions or []):
            raise ValueError(f"labeled_fractions must lie in (0, 1], got {self.labeled_fractions}")
        if any(n < 1 for n in self.labeled_cases or []):
            raise ValueError(f"labeled_cases must be >= 1, got {self.labeled_cases}")
        return self

    def label_settings(self) -> list[tuple[str, dict[str, Any]]]:
        """``(tag, data keys)`` per labelled setting: ``all``, ``frac0.1`` (labeled_fraction), ``cases3``."""
        settings = [(f"frac{f:g}", {"labeled_fraction": f}) for f in self.labeled_fractions or []]
        settings += [(f"cases{n}", {"labeled_cases": n}) for n in self.labeled_cases or []]
        return settings or [("all", {})]


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def _check_paths(study: Study, source: str) -> None:
    """Dataset (with imagesTs/labelsTs), teacher path and unlabelled folders exist; errors name the key."""
    from medkd.data.dataset import DatasetError, load_dataset

    try:
        load_dataset(study.dataset)
    except DatasetError as err:
        raise ConfigError(f"{source}: dataset: {err}") from None
    for split in ("imagesTs", "labelsTs"):
        if not (study.dataset / split).is_dir():
            raise ConfigError(f"{source}: dataset: {study.dataset / split} does not exist (a study evaluates on the "
                              "dataset's held-out cases)")
    if study.teacher.path is not None and not study.teacher.path.exists():
        raise ConfigError(f"{source}: teacher.path: {study.teacher.path} does not exist")
    for index, folder in enumerate(study.unlabeled):
        if not folder.is_dir():
            raise ConfigError(f"{source}: unlabeled.{index}: folder {folder} does not exist")


def _check_names(study: Study, source: str) -> None:
    """Every recipe loads and every model name is registered; errors name the key."""
    from medkd.models import list_models
    from medkd.recipes import load_recipe

    names = [LABELS_ONLY]
    for index, recipe in enumerate(study.recipes):
        try:
            names.append(load_recipe(recipe).name)
        except ConfigError as err:
            raise ConfigError(f"{source}: recipes.{index}: {err}") from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: recipes: method name(s) {', '.join(dupes)} appear more than once")
    models = [("teacher.model.name", study.teacher.model)] if study.teacher.model else []
    models += [(f"students.{i}.model.name", s.model) for i, s in enumerate(study.students)]
    for key, model in models:
        if model.name not in list_models():
            raise ConfigError(f"{source}: {key}: unknown model {model.name!r}; known: {', '.join(list_models())}")


def load_study(path: str | Path) -> Study:
    """Read, validate and check a study file (see the module doc); relative paths become absolute.

    Raises :class:`ConfigError` naming the file and the key for anything that would fail later.
    """
    path = Path(path)
    tree = load_yaml(path, what="study file")
    try:
        study = Study.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path)).replace("configuration", "study")) from None
    base = path.resolve().parent
    study.dataset = _resolve(base, study.dataset)
    study.unlabeled = [_resolve(base, p) for p in study.unlabeled]
    study.recipes = [str(_resolve(base, Path(r))) if Path(r).suffix else r for r in study.recipes]
    if study.teacher.path is not None:
        study.teacher.path = _resolve(base, study.teacher.path)
    for data in (study.data, study.teacher.data):
        if "cache_dir" in data:
            data["cache_dir"] = str(_resolve(base, Path(data["cache_dir"])))
    _check_paths(study, str(path))
    _check_names(study, str(path))
    return study
