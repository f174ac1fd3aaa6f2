"""Validated run configuration (pydantic), loaded from plain YAML and overridable from the CLI.

A run is described by three sections, mirroring how nnU-Net separates concerns:

* ``data``  - which dataset and fold, preprocessing, 2D/3D sampling and augmentation;
* ``model`` - a registry name plus size preset (see :mod:`medkd.models.registry`);
* ``train`` - loss, optimiser, budget, validation, checkpointing and devices;
* ``plan``  - (optional) the ``medkd plan`` configuration the run's defaults came from.

The fully resolved config is written to every run directory as ``config.yaml``; loading that file
reproduces the run. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """MONAI augmentations applied on the fly to training patches (probabilities per sample)."""

    enabled: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1, description="per spatial axis (nnU-Net mirrors; consider 0 for "
                             "short budgets on data with a fixed anatomical orientation)")
    rotate_prob: float = Field(0.2, ge=0, le=1)
    rotate_deg: float = Field(15.0, ge=0, le=180)
    scale_prob: float = Field(0.2, ge=0, le=1)
    scale_range: tuple[float, float] = (0.85, 1.25)
    intensity_prob: float = Field(0.15, ge=0, le=1, description="multiplicative brightness")
    gamma_prob: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(0.1, ge=0)


class DataConfig(_Strict):
    dataset: Path | None = Field(None, description="nnU-Net v2 raw or MSD dataset folder")
    fold: int = Field(0, ge=0)
    num_folds: int = Field(5, ge=2)
    group_regex: str | None = Field(None, description="keep cases whose regex match is equal in one fold")
    data_fraction: float = Field(1.0, gt=0, le=1, description="seeded subset of the training cases")
    cases: list[str] | None = Field(None, description="train on these case ids only (chosen after the fold split; "
                                    "data_fraction then subsets them); the validation split is unchanged")
    labeled_cases: int | None = Field(None, ge=1, description="few-label runs: keep the labels of this many training "
                                      "cases (whole group_regex groups, seeded by labeled_seed); the other training "
                                      "cases become unlabelled images")
    labeled_fraction: float | None = Field(None, gt=0, le=1, description="like labeled_cases, as a fraction")
    labeled_seed: int = Field(0, description="seed of the labelled-case choice (independent of train.seed, so a "
                              "teacher and its students keep the same labels)")
    unlabeled: list[Path] = Field(default_factory=list, description="folders of images without labels (nnU-Net "
                                  "naming CASE_XXXX<file_ending>); distillation terms also train on them")
    unlabeled_ratio: float = Field(0.5, ge=0, lt=1, description="distillation: share of each batch drawn from the "
                                   "unlabelled images (when there are any); the supervised term sees only labelled samples")
    mode: Literal["2d", "3d"] = "2d"
    patch_size: list[int] = Field(default_factory=lambda: [128, 128])
    whole_slice_inference: bool = Field(False, description="2D mode: validation and `medkd predict` run whole "
                                         "slices (zero-padded to a multiple of the network's largest stride) "
                                         "instead of a sliding window of patch_size; for networks trained on "
                                         "(nearly) whole slices. 3D always slides a window")
    batch_size: int = Field(16, ge=1)
    foreground_oversample: float = Field(0.33, ge=0, le=1)
    normalization: Literal["auto", "zscore", "ct", "none"] = "auto"
    target_spacing: list[float] | None = Field(None, description="numpy order (z, y, x); 2D resamples in-plane only")
    crop_nonzero: bool = True
    preprocessing_from: Path | None = Field(None, description="use the preprocessing plan of this checkpoint or "
                                            "teacher set (its first member) instead of planning one: e.g. an "
                                            "imported nnU-Net teacher's (`medkd distill` sets it for those); "
                                            "normalization, target_spacing and crop_nonzero are then ignored")
    cache_dir: Path | None = Field(None, description="preprocessed-case cache (default: $MEDKD_CACHE or ./.cache/medkd)")
    num_workers: int = Field(2, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    check: bool = Field(True, description="validate the whole dataset before training")

    @model_validator(mode="after")
    def _patch_matches_mode(self) -> "DataConfig":
        want = 2 if self.mode == "2d" else 3
        if len(self.patch_size) != want:
            raise ValueError(f"data.patch_size has {len(self.patch_size)} entries but data.mode={self.mode} needs {want}")
        if any(p < 8 for p in self.patch_size):
            raise ValueError(f"data.patch_size entries must be >= 8, got {self.patch_size}")
        if self.labeled_cases is not None and self.labeled_fraction is not None:
            raise ValueError("give data.labeled_cases or data.labeled_fraction, not both")
        if self.cases is not None:
            if not self.cases:
                raise ValueError("data.cases must list at least one case id (or be null for all training cases)")
            dupes = sorted({c for c in self.cases if self.cases.count(c) > 1})
            if dupes:
                raise ValueError(f"data.cases lists case id(s) more than once: {', '.join(dupes)}")
        return self

    @property
    def spatial_dims(self) -> int:
        return 2 if self.mode == "2d" else 3

    @property
    def few_labels(self) -> bool:
        """Whether only part of the training cases keep their labels."""
        return self.labeled_cases is not None or self.labeled_fraction is not None


class ModelConfig(_Strict):
    name: str = "unet"
    preset: Literal["teacher", "student"] = "teacher"
    shrink: int | None = Field(None, ge=0, le=6, description="ReCo-KD width reduction t: C' = max(4, C / 2^t)")
    deep_supervision: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    loss: Literal["dice_ce", "dice_lovasz", "ce", "dice", "lovasz"] = "dice_ce"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(3e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD only (Nesterov)")
    poly_exponent: float = Field(0.9, ge=0)
    grad_clip: float | None = Field(12.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    max_epochs: int | None = Field(None, ge=1)
    steps_per_epoch: int = Field(250, ge=1)
    max_time_min: float | None = Field(None, gt=0, description="wall-clock budget; the poly schedule follows elapsed time")
    val_every: int = Field(250, ge=1)
    val_max_cases: int | None = Field(None, ge=1, description="validate on the first N validation cases only")
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str | list[int] = Field(1, description="Fabric devices: a count, 'auto', or device indices [i, ...]")
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: str = Field("auto", description="'auto' = 32-true on CPU, bf16-mixed/16-mixed on GPU")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    progress: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _has_budget(self) -> "TrainConfig":
        if self.max_steps is None and self.max_epochs is None and self.max_time_min is None:
            raise ValueError("train needs a budget: set max_steps, max_epochs or max_time_min")
        return self

    def step_budget(self) -> int | None:
        """Total optimiser steps allowed by max_steps / max_epochs (the smaller), or None if time-only."""
        budgets = [b for b in (self.max_steps, self.max_epochs and self.max_epochs * self.steps_per_epoch) if b]
        return min(budgets) if budgets else None


class DistillConfig(_Strict):
    """Present for distillation runs: the frozen teacher and the fully resolved recipe."""

    teacher: Path = Field(description="checkpoint of the teacher (best.pt of a training run)")
    recipe: dict[str, Any] = Field(description="resolved recipe (see medkd.recipes), stored for reproducibility")


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_epochs=50))
    distill: DistillConfig | None = None
    plan: dict[str, Any] | None = Field(None, description="the plan this run was configured from (`medkd plan`): "
                                        "{configuration, plans}; stored for reference, the keys above are what runs")

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def set_by_dotted_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating sub-dicts as needed."""
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
    node[leaf] = value


def build_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "<overrides>") -> RunConfig:
    """Merge dotted-key ``overrides`` (None values ignored) into ``base`` and validate."""
    tree: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base or {}))  # deep copy of plain data
    for key, value in (overrides or {}).items():
        if value is not None:
            set_by_dotted_key(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping; errors name the file (``what`` says what kind of file it is)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must contain a mapping at the top level")
    return tree


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    base = load_yaml(path) if path else {}
    return build_config(base, overrides, source=str(path) if path else "<command line>")


def save_config(config: RunConfig, path: Path) -> None:
    from medkd.storage import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
