"""Distillation recipes: a named, validated weighted sum of loss terms, shipped as plain YAML.

A recipe file (``recipes/*.yaml``) looks like::

    name: logit-kd
    paper: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015
    description: supervised Dice+CE plus temperature-softened KL to the teacher
    supervised: {loss: dice_ce, weight: 1.0}
    terms:
      kl: {loss: kl, weight: 0.5, warmup_steps: 0, balance: false, options: {temperature: 4.0}}
    data: {data_fraction: 1.0}          # optional data overrides (e.g. 0.5 for the contrastive paper)
    teachers: {combine: mean_prob, member_weights: uniform, cache: true}   # optional, see TeacherOptions

``terms.<name>.loss`` is a name from :mod:`medkd.losses.distill_registry`; feature terms also say
which stages they tap (``taps: encoder | decoder | bottleneck | encoder+decoder`` resolved per model
by automatic stage discovery, or explicit ``student_taps`` / ``teacher_taps`` module names, paired
in order). Options are passed to the loss class unchanged, so every choice the paper leaves open is
an option there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medkd.config import ConfigError, format_validation_error, load_yaml

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
StageSelector = Literal["encoder", "decoder", "bottleneck", "encoder+decoder", "encoder+bottleneck"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedTerm(_Strict):
    loss: Literal["dice_ce", "dice_lovasz", "ce", "dice", "lovasz"] = "dice_ce"
    weight: float = Field(1.0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class DistillTerm(_Strict):
    loss: str
    weight: float = Field(ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear ramp of the weight: w * min(1, (step + 1) / warmup_steps)")
    balance: bool = Field(False, description="rescale the term to contribute weight x the supervised loss on "
                          "average (moving averages of detached losses, see medkd.losses.balance)")
    options: dict[str, Any] = Field(default_factory=dict)
    taps: StageSelector | None = None
    student_taps: list[str] | None = None
    teacher_taps: list[str] | None = None

    @model_validator(mode="after")
    def _taps_consistent(self) -> "DistillTerm":
        explicit = (self.student_taps is None, self.teacher_taps is None)
        if explicit[0] != explicit[1]:
            raise ValueError("student_taps and teacher_taps must be given together")
        if self.student_taps is not None and len(self.student_taps) != len(self.teacher_taps):
            raise ValueError(f"{len(self.student_taps)} student_taps but {len(self.teacher_taps)} teacher_taps")
        if self.taps is not None and self.student_taps is not None:
            raise ValueError("give either taps (a stage selector) or explicit student_taps/teacher_taps")
        return self

    @property
    def uses_features(self) -> bool:
        return self.taps is not None or self.student_taps is not None


class RecipeData(_Strict):
    data_fraction: float | None = Field(None, gt=0, le=1)


class TeacherOptions(_Strict):
    """How several teachers (a teacher set) become one target, and whether their outputs are cached.

    ``combine`` (see :mod:`medkd.teachers.combine`): ``mean_prob`` (average member probabilities,
    ensemble paper), ``mean_logits`` (softmax of averaged logits), ``adaptive`` (per-voxel confidence
    weights x per-member weights, prostate multi-teacher paper), ``mean_loss`` (each logit term
    computed per member and averaged: for KL this is the mean of per-member KL terms, which is not
    the KL to the mean). Feature terms always get one adapter set per member and are averaged with
    the member weights. ``member_weights``: ``uniform`` or ``val_dice`` (validation Dice from the
    teacher-set manifest, ``w_m = d_m^dice_power / sum_k d_k^dice_power``). ``cache``: precompute the
    combined target once (:mod:`medkd.teachers.cache`) when the recipe needs no teacher features and
    the rule is not ``mean_loss``; ``top_k`` keeps only the k largest classes per voxel there.
    ``combine_temperature``: by default each logit term combines the members at its own temperature
    ``T`` (exact: ``softmax(g / T)`` is the members' combined distribution at ``T``), so a cached
    target serves only recipes whose logit terms share one ``T``. With ``combine_temperature: T_c``
    the members are combined once at ``T_c`` into ``g = T_c log p_{T_c}`` (with ``T_c = 1``: the
    ensemble's own prediction) and every term softens that ``g`` with its own ``T``: for ``T != T_c``
    its target is the combined distribution re-softened, not the mean of the re-softened members.
    No effect with one teacher (``g`` is then the teacher's logits).
    """

    combine: Literal["mean_prob", "mean_logits", "adaptive", "mean_loss"] = "mean_prob"
    member_weights: Literal["uniform", "val_dice"] = "uniform"
    dice_power: float = Field(1.0, ge=0)
    temperature_w: float = Field(1.0, gt=0, description="temperature of the adaptive per-voxel weights")
    cache: bool = True
    top_k: int | None = Field(None, ge=1)
    combine_temperature: float | None = Field(None, gt=0)


class Recipe(_Strict):
    name: str
    paper: str
    description: str = ""
    supervised: SupervisedTerm = Field(default_factory=SupervisedTerm)
    terms: dict[str, DistillTerm] = Field(default_factory=dict)
    data: RecipeData = Field(default_factory=RecipeData)
    teachers: TeacherOptions = Field(default_factory=TeacherOptions)

    @model_validator(mode="after")
    def _known_losses(self) -> "Recipe":
        from medkd.losses.distill_registry import DISTILL_LOSSES

        for name, term in self.terms.items():
            if name.startswith("_") or "." in name:
                raise ValueError(f"terms.{name}: term names may not start with '_' or contain '.'")
            if term.loss not in DISTILL_LOSSES:
                raise ValueError(f"terms.{name}.loss: unknown loss {term.loss!r}; known: {', '.join(sorted(DISTILL_LOSSES))}")
            needs = getattr(DISTILL_LOSSES[term.loss], "inputs", "logits")
            if needs.startswith("features") and not term.uses_features:
                raise ValueError(f"terms.{name}: loss {term.loss!r} needs feature taps (taps: encoder|decoder|...)")
        return self

    @property
    def needs_teacher_features(self) -> bool:
        return any(term.uses_features for term in self.terms.values())

    @property
    def uses_cache(self) -> bool:
        """Teacher outputs come from the cache (no live teacher): logit terms only, a cacheable rule."""
        return (self.teachers.cache and not self.needs_teacher_features and self.teachers.combine != "mean_loss"
                and not self.needs_uncertainty)

    @property
    def needs_uncertainty(self) -> bool:
        """A term regresses the ensemble's uncertainty map (computed from live members, not cached)."""
        from medkd.losses.distill_registry import DISTILL_LOSSES

        return any(getattr(DISTILL_LOSSES[t.loss], "inputs", "logits") == "logits+uncertainty"
                   for t in self.terms.values())


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``medkd recipes`` lists them) or a YAML file; errors name the file and key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(list_recipes())}")
    return recipe_from_dict(load_yaml(path, what="recipe file"), source=str(path))


def recipe_from_dict(tree: Any, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
