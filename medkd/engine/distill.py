"""Distillation as a task for the shared trainer: frozen teacher(s), a student and a recipe.

``Distiller.forward(batch)`` returns the weighted loss terms (mdistiller's ``forward_train``):
``{"loss": total, "seg": ..., "<term>": ...}``. The teacher runs in eval mode under
``torch.inference_mode`` (and, on GPU, inside Fabric's autocast like the rest of the forward); its
outputs are cloned out of inference mode so that losses may combine them with student tensors.
Feature terms capture activations with forward hooks by module name
(:class:`medkd.models.taps.FeatureTaps`): stages are discovered automatically per architecture and
paired by resolution, so any student can learn from any teacher. Adapters and projection heads live in
the loss modules: optimised, checkpointed as ``extra_state``, never part of the deployable student.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkd.config import RunConfig
from medkd.losses import DeepSupervisionLoss, build_supervised_loss
from medkd.losses.balance import TermBalancer
from medkd.losses.supervised import full_resolution_head
from medkd.losses.distill_registry import DISTILL_LOSSES
from medkd.models import FeatureTaps, discover_stages, list_tappable
from medkd.recipes import DistillTerm, Recipe
from medkd.engine.teacher_grid import MappedTeacherOutputs, mapped_members
from medkd.teachers.cache import TargetSpec, TeacherOutputCache
from medkd.teachers.combine import dice_member_weights, normalised_member_weights, target_logits, voxel_uncertainty
from medkd.teachers.manifest import load_frozen, open_teachers


class TeacherMismatchError(ValueError):
    """The teacher cannot teach this student on this data (classes, channels, dimensions)."""


def load_teacher(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen network (eval mode, no gradients) and its checkpoint metadata."""
    return load_frozen(checkpoint)


def check_teacher(teacher_state: dict[str, Any], labels: dict[str, int], in_channels: int, spatial_dims: int | None,
                  source: str) -> None:
    """Raise :class:`TeacherMismatchError` unless the teacher predicts ``labels`` from ``in_channels`` channels
    in ``spatial_dims`` (``None``: any; a teacher whose outputs are mapped onto the student's grid)."""
    spec = teacher_state["model_spec"]
    problems = []
    if dict(teacher_state["labels"]) != dict(labels):
        problems.append(f"labels {teacher_state['labels']} != dataset labels {labels}")
    if spec["in_channels"] != in_channels:
        problems.append(f"{spec['in_channels']} input channel(s), dataset has {in_channels}")
    if spatial_dims is not None and spec["spatial_dims"] != spatial_dims:
        problems.append(f"a {spec['spatial_dims']}D network, the student is trained in {spatial_dims}D")
    if problems:
        raise TeacherMismatchError(f"teacher {source} does not fit: " + "; ".join(problems))


@dataclass
class NetworkStages:
    """What pairing needs to know of one network, from dummy forwards made once per network."""

    stages: dict[str, list[str]]  # encoder / bottleneck / decoder module names
    stride: dict[str, tuple]  # module name -> stride w.r.t. the input, per axis
    channels: dict[str, int]  # module name -> output channels

    @classmethod
    def of(cls, model: nn.Module, spatial_dims: int, in_channels: int) -> "NetworkStages":
        size = 64 if spatial_dims == 2 else 32  # the dummy input discover_stages uses
        rows = list_tappable(model, (1, in_channels, *([size] * spatial_dims)))
        return cls(stages=discover_stages(model, spatial_dims, in_channels),
                   stride={row["name"]: tuple(row["stride"]) for row in rows},
                   channels={row["name"]: row["channels"] for row in rows})


def pair_taps(term: DistillTerm, student: NetworkStages, teacher: NetworkStages) -> tuple[list[str], list[str]]:
    """Student and teacher module names to compare, in pairs.

    Explicit ``student_taps``/``teacher_taps`` are paired in order. A stage selector (``encoder``,
    ``decoder``, ``bottleneck``, joined with ``+``) is resolved on each network by automatic stage
    discovery and stages are paired by *resolution* (stride w.r.t. the input), so networks of
    different depth pair where their feature grids coincide; ``bottleneck`` stages of different
    resolution (an nnU-Net teacher one level deeper than the student) pair at the deepest resolution
    both networks reach (:func:`_deepest_common_stage`).
    """
    if term.student_taps is not None:
        return list(term.student_taps), list(term.teacher_taps)
    s_names, t_names = [], []
    for part in term.taps.split("+"):
        teacher_at = {teacher.stride[name]: name for name in teacher.stages[part]}
        pairs = [(name, teacher_at[student.stride[name]]) for name in student.stages[part]
                 if student.stride[name] in teacher_at]
        if part == "bottleneck" and not pairs:  # networks of different depth (e.g. an nnU-Net teacher)
            pairs = _deepest_common_stage(student, teacher)
        s_names += [s for s, _ in pairs]
        t_names += [t for _, t in pairs]
    if not s_names:
        raise ValueError(f"no {term.taps} stage of the student has the resolution of a teacher stage; "
                         "give student_taps/teacher_taps explicitly (see `medkd inspect-model`)")
    return s_names, t_names


def _deepest_common_stage(student: NetworkStages, teacher: NetworkStages) -> list[tuple[str, str]]:
    """The student's and the teacher's encoder/bottleneck stage at the deepest resolution both reach, as one pair
    (none when they share no resolution): what ``bottleneck`` pairs when the bottlenecks' resolutions differ."""
    def by_stride(info: NetworkStages) -> dict[tuple, str]:
        return {info.stride[n]: n for n in [*info.stages["encoder"], *info.stages["bottleneck"]]}

    s_at, t_at = by_stride(student), by_stride(teacher)
    common = [stride for stride in s_at if stride in t_at]
    if not common:
        return []
    deepest = max(common, key=math.prod)
    return [(s_at[deepest], t_at[deepest])]


def _channels(info: NetworkStages, names: list[str], which: str) -> list[int]:
    missing = [n for n in names if n not in info.channels]
    if missing:
        raise ValueError(f"{which} has no tappable module named {', '.join(missing)} (see `medkd inspect-model`)")
    return [info.channels[n] for n in names]


def _build_term(term: DistillTerm, s_channels: list[int] | None, t_channels: list[int] | None,
                spatial_dims: int, num_classes: int) -> nn.Module:
    cls = DISTILL_LOSSES[term.loss]
    available = {"student_channels": s_channels, "teacher_channels": t_channels,
                 "spatial_dims": spatial_dims, "num_classes": num_classes}
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in available.items() if k in accepted and k not in term.options}
    return cls(**kwargs, **term.options)


class Distiller(nn.Module):
    """Student + frozen teacher(s) + recipe; ``network`` is the student (what gets deployed).

    With several teachers (``M`` members, in teacher-set order) logit terms compare the student with
    the combined target of ``recipe.teachers.combine`` (:func:`medkd.teachers.combine.target_logits`
    at the term's temperature), or, for ``mean_loss``, average the term over members. Feature terms
    get one loss module (hence one adapter set) per member and are averaged with the member weights
    ``w`` (uniform, or normalised validation Dice). With ``soft_targets`` attached (see
    :meth:`attach_cache`) logit targets come from the batch key ``"teacher"`` and no teacher runs.
    """

    def __init__(self, student: nn.Module, teachers: nn.Module | Sequence[nn.Module], recipe: Recipe, *,
                 spatial_dims: int, in_channels: int, num_classes: int,
                 member_weights: Sequence[float] | None = None):
        super().__init__()
        members = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        if not members:
            raise ValueError("a Distiller needs at least one teacher")
        if recipe.needs_uncertainty and len(members) < 2:
            raise ValueError("an uncertainty term regresses the disagreement of a teacher set: give 2+ teachers")
        self.network = student
        self.step = 0  # optimiser steps done (set by the trainer): drives the terms' warm-up
        self.teachers = nn.ModuleList(t.eval().requires_grad_(False) for t in members)
        self.recipe = recipe
        weights = normalised_member_weights(member_weights, len(members), torch.empty(0))
        self.register_buffer("member_weights", weights, persistent=False)
        self.soft_targets: list | None = None
        sup = recipe.supervised
        self.supervised = DeepSupervisionLoss(build_supervised_loss(sup.loss, **sup.options))
        self.terms = nn.ModuleDict()
        balanced = [name for name, term in recipe.terms.items() if term.balance]
        self.balancer = TermBalancer(balanced) if balanced else None
        self.taps: dict[str, list[tuple[list[str], list[str]]]] = {}  # term -> per member (student, teacher) names
        infos = None
        if recipe.needs_teacher_features:
            student_info = NetworkStages.of(student, spatial_dims, in_channels)
            infos = [(student_info, NetworkStages.of(t, spatial_dims, in_channels)) for t in members]
        for name, term in recipe.terms.items():
            if not term.uses_features:
                self.terms[name] = nn.ModuleList([_build_term(term, None, None, spatial_dims, num_classes)])
                continue
            modules, self.taps[name] = [], []
            for s_info, t_info in infos:
                s_names, t_names = pair_taps(term, s_info, t_info)
                s_ch, t_ch = _channels(s_info, s_names, "student"), _channels(t_info, t_names, "teacher")
                modules.append(_build_term(term, s_ch, t_ch, spatial_dims, num_classes))
                self.taps[name].append((s_names, t_names))
            self.terms[name] = nn.ModuleList(modules)
        self._label_aware = any(getattr(mods[0], "inputs", "") == "features+label" for mods in self.terms.values())
        student_names = sorted({n for pairs in self.taps.values() for s, _ in pairs for n in s})
        self._student_taps = FeatureTaps(student, student_names) if student_names else None
        self._teacher_taps = []
        for m, teacher in enumerate(members):
            names = sorted({n for pairs in self.taps.values() for n in pairs[m][1]})
            self._teacher_taps.append(FeatureTaps(teacher, names, detach=True) if names else None)

    def set_step(self, step: int) -> None:
        self.step = step

    def term_weight(self, name: str) -> float:
        """The recipe weight of term ``name``, ramped linearly over its ``warmup_steps``."""
        term = self.recipe.terms[name]
        ramp = min(1.0, (self.step + 1) / term.warmup_steps) if term.warmup_steps else 1.0
        return term.weight * ramp

    @property
    def teacher(self) -> nn.Module:
        """The first (for a single teacher: the) teacher network."""
        return self.teachers[0]

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teachers.eval()  # frozen: batch-norm statistics and dropout stay as trained
        return self

    def extra_modules(self) -> nn.ModuleDict:
        if self.balancer is None:
            return self.terms
        return nn.ModuleDict({**self.terms, "_balance": self.balancer})  # recipes reject '_' term names

    def logit_temperature(self) -> float:
        """The temperature a cached target is combined at: the recipe's ``teachers.combine_temperature``,
        else the one temperature of the logit terms."""
        if self.recipe.teachers.combine_temperature is not None:
            return self.recipe.teachers.combine_temperature
        temps = {float(getattr(mods[0], "temperature", 1.0)) for name, mods in self.terms.items() if name not in self.taps}
        if len(temps) > 1:
            raise ValueError(f"logit terms use different temperatures {sorted(temps)}; one cached target cannot "
                             "serve them all with several teachers: set teachers.combine_temperature "
                             "(combine once, then each term softens) or teachers.cache: false")
        return temps.pop() if temps else 1.0

    def attach_cache(self, soft_targets: list) -> None:
        """Use cached teacher targets (one per training case, batch key ``"teacher"``); drop the live teachers."""
        if self.recipe.needs_teacher_features:
            raise ValueError("a recipe with feature terms needs the live teacher; its outputs cannot be cached")
        self.soft_targets = soft_targets
        self.teachers = nn.ModuleList(self.teachers[:1])  # kept for ``teacher``; never run
        self.teachers.requires_grad_(False)

    def _teachers_forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        logits, feats = [], []
        with torch.inference_mode():
            for teacher, taps in zip(self.teachers, self._teacher_taps):
                out = teacher(image)
                logits.append(full_resolution_head(out, image.ndim))
                feats.append(dict(taps.features) if taps else {})
        # inference tensors cannot be saved for backward: clone them into ordinary tensors
        return torch.stack(logits).clone(), [{k: v.clone() for k, v in f.items()} for f in feats]

    def _logit_term(self, loss: nn.Module, s_logits: torch.Tensor, members: torch.Tensor | None,
                    cached: torch.Tensor | None) -> torch.Tensor:
        if cached is not None:
            return loss(s_logits, cached)
        options = self.recipe.teachers
        if options.combine == "mean_loss" and members.shape[0] > 1:
            return sum(w * loss(s_logits, z) for w, z in zip(self.member_weights, members))
        rule = "mean_prob" if options.combine == "mean_loss" else options.combine
        extra = {"temperature_w": options.temperature_w} if rule == "adaptive" else {}
        temperature = options.combine_temperature or getattr(loss, "temperature", 1.0)
        target = target_logits(rule, members.float(), temperature, member_weights=self.member_weights, **extra)
        return loss(s_logits, target.to(s_logits.dtype))

    def _supervised_term(self, s_out: torch.Tensor, label: torch.Tensor, labeled: torch.Tensor | None) -> torch.Tensor:
        """The supervised loss on the labelled samples of the batch only (zero when there are none)."""
        if labeled is not None and not bool(labeled.all()):
            if not bool(labeled.any()):
                return s_out.sum() * 0.0  # keeps the graph (DDP) without a label signal
            s_out, label = s_out[labeled], label[labeled]
        return self.recipe.supervised.weight * self.supervised(s_out, label)

    @staticmethod
    def _region_label(label: torch.Tensor, labeled: torch.Tensor | None, members: torch.Tensor) -> torch.Tensor:
        """Labels for label-aware feature terms: the label where known, the teachers' argmax elsewhere."""
        if labeled is None or bool(labeled.all()):
            return label
        guess = torch.softmax(members.float(), dim=2).mean(0).argmax(1, keepdim=True)
        keep = labeled.view(-1, *[1] * (label.ndim - 1))
        return torch.where(keep, label, guess.to(label.dtype))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, label, labeled = batch["image"], batch["label"], batch.get("labeled")
        cached = batch.get("teacher") if self.soft_targets is not None else None
        members, t_feats = (None, None) if cached is not None else self._teachers_forward(image)
        s_out = self.network(image)
        s_feats = dict(self._student_taps.features) if self._student_taps else {}
        s_logits = full_resolution_head(s_out, image.ndim)
        out = {"seg": self._supervised_term(s_out, label, labeled)}
        if self.balancer is not None and (labeled is None or bool(labeled.any())):
            self.balancer.observe_supervised(out["seg"])
        if members is not None and self._label_aware:
            label = self._region_label(label, labeled, members)
        for name, modules in self.terms.items():
            if getattr(modules[0], "inputs", "logits") == "logits+uncertainty":
                value = modules[0](s_logits, voxel_uncertainty(torch.softmax(members.float(), dim=2)))
            elif name not in self.taps:
                value = self._logit_term(modules[0], s_logits, members, cached)
            else:
                value = 0.0
                for m, (loss, (s_names, t_names)) in enumerate(zip(modules, self.taps[name])):
                    args = ([s_feats[n] for n in s_names], [t_feats[m][n] for n in t_names])
                    inputs = getattr(type(loss), "inputs", "features")
                    value = value + self.member_weights[m] * (loss(*args, label) if inputs == "features+label" else loss(*args))
            if self.balancer is not None and name in self.balancer.names:
                value = self.balancer.scale(name, value) * value
            out[name] = self.term_weight(name) * value
        total = sum(out.values())
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}


def _cache_device(cfg: RunConfig) -> str:
    if cfg.train.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def distill_task_factory(config: RunConfig):
    """A ``task_factory`` for :class:`medkd.engine.trainer.Trainer` built from ``config.distill``.

    ``distill.teacher`` is one checkpoint or a teacher set (``teachers.json`` or its folder). When the
    recipe allows it (:attr:`medkd.recipes.Recipe.uses_cache`) the combined teacher target of every
    training case is computed once into the teacher-output cache and the teachers never run during
    training. In a DDP run the trainer builds rank 0's task first (filling the cache), then the other
    ranks' (reading it); entries are written atomically.
    """
    from medkd.recipes import recipe_from_dict

    def factory(student: nn.Module, data, cfg: RunConfig) -> Distiller:
        teacher_set = open_teachers(cfg.distill.teacher)
        recipe = recipe_from_dict(cfg.distill.recipe, source=f"{cfg.distill.teacher} recipe")
        networks, states = zip(*(load_frozen(m.checkpoint) for m in teacher_set.members))
        mapped = any(mapped_members(states, data.plan))
        if mapped and not recipe.uses_cache:
            raise TeacherMismatchError(
                f"teacher {cfg.distill.teacher} preprocesses with its nnU-Net plan and the student with another; "
                "a recipe that runs the teacher live (feature terms, or teachers.cache: false) needs one grid: set "
                f"data.preprocessing_from: {cfg.distill.teacher} (what `medkd distill` does by default)")
        for member, state in zip(teacher_set.members, states):
            check_teacher(state, data.dataset.labels, data.dataset.num_channels,
                          None if mapped else cfg.data.spatial_dims, str(member.checkpoint))
        weights = None
        if recipe.teachers.member_weights == "val_dice":
            weights = dice_member_weights(teacher_set.dice_weights(), power=recipe.teachers.dice_power).tolist()
        distiller = Distiller(student, networks, recipe, spatial_dims=cfg.data.spatial_dims,
                              in_channels=data.dataset.num_channels, num_classes=data.dataset.num_classes,
                              member_weights=weights)
        if recipe.uses_cache:
            single = len(networks) == 1 and recipe.teachers.top_k is None  # plain logits: one entry for every T
            spec = TargetSpec(rule="mean_logits" if single else recipe.teachers.combine,
                              temperature=1.0 if single else distiller.logit_temperature(),
                              member_weights=None if single or weights is None else tuple(weights),
                              temperature_w=recipe.teachers.temperature_w, top_k=recipe.teachers.top_k)
            cache = TeacherOutputCache.for_teachers(teacher_set, data.plan, spec, data.dataset.num_classes,
                                                    cfg.data.patch_size, cfg.data.cache_dir)
            outputs = MappedTeacherOutputs([m.checkpoint for m in teacher_set.members], data.dataset.num_channels,
                                           _cache_device(cfg)) if mapped else None
            distiller.attach_cache(cache.ensure([*data.train, *data.unlabeled], networks, mode=cfg.data.mode,
                                                in_channels=data.dataset.num_channels, device=_cache_device(cfg),
                                                member_outputs=outputs, progress=cfg.train.progress))
        return distiller

    return factory
