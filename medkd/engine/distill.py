"""Distillation as a task for the shared trainer: a frozen teacher, a student and a recipe.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkd.config import RunConfig
from medkd.losses import DeepSupervisionLoss, build_supervised_loss
from medkd.losses.distill_registry import DISTILL_LOSSES
from medkd.models.taps import FeatureTaps, discover_stages, list_tappable
from medkd.recipes import DistillTerm, Recipe
from medkd.teachers.manifest import load_frozen


class TeacherMismatchError(ValueError):
    """The teacher cannot teach this student on this data (classes, channels, dimensions)."""


def load_teacher(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen network (eval mode, no gradients) and its checkpoint metadata."""
    return load_frozen(checkpoint)


def check_teacher(teacher_state: dict[str, Any], labels: dict[str, int], in_channels: int, spatial_dims: int,
                  source: str) -> None:
    spec = teacher_state["model_spec"]
    problems = []
    if dict(teacher_state["labels"]) != dict(labels):
        problems.append(f"labels {teacher_state['labels']} != dataset labels {labels}")
    if spec["in_channels"] != in_channels:
        problems.append(f"{spec['in_channels']} input channel(s), dataset has {in_channels}")
    if spec["spatial_dims"] != spatial_dims:
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
    different depth pair where their feature grids coincide.
    """
    if term.student_taps is not None:
        return list(term.student_taps), list(term.teacher_taps)
    s_names, t_names = [], []
    for part in term.taps.split("+"):
        teacher_at = {teacher.stride[name]: name for name in teacher.stages[part]}
        for name in student.stages[part]:
            if student.stride[name] in teacher_at:
                s_names.append(name)
                t_names.append(teacher_at[student.stride[name]])
    if not s_names:
        raise ValueError(f"no {term.taps} stage of the student has the resolution of a teacher stage; "
                         "give student_taps/teacher_taps explicitly (see `medkd inspect-model`)")
    return s_names, t_names


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
    """Student + frozen teacher + recipe; ``network`` is the student (what gets deployed)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, recipe: Recipe, *, spatial_dims: int,
                 in_channels: int, num_classes: int):
        super().__init__()
        self.network = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.recipe = recipe
        sup = recipe.supervised
        self.supervised = DeepSupervisionLoss(build_supervised_loss(sup.loss, **sup.options))
        self.terms = nn.ModuleDict()
        self.taps: dict[str, tuple[list[str], list[str]]] = {}
        infos = None
        if recipe.needs_teacher_features:
            infos = (NetworkStages.of(student, spatial_dims, in_channels), NetworkStages.of(teacher, spatial_dims, in_channels))
        for name, term in recipe.terms.items():
            s_ch = t_ch = None
            if term.uses_features:
                s_names, t_names = pair_taps(term, *infos)
                s_ch, t_ch = _channels(infos[0], s_names, "student"), _channels(infos[1], t_names, "teacher")
                self.taps[name] = (s_names, t_names)
            self.terms[name] = _build_term(term, s_ch, t_ch, spatial_dims, num_classes)
        student_names = sorted({n for s, _ in self.taps.values() for n in s})
        teacher_names = sorted({n for _, t in self.taps.values() for n in t})
        self._student_taps = FeatureTaps(student, student_names) if student_names else None
        self._teacher_taps = FeatureTaps(teacher, teacher_names, detach=True) if teacher_names else None

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # frozen: batch-norm statistics and dropout stay as trained
        return self

    def extra_modules(self) -> nn.ModuleDict:
        return self.terms

    def _teacher_forward(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.inference_mode():
            logits = self.teacher(image)
            feats = dict(self._teacher_taps.features) if self._teacher_taps else {}
        # inference tensors cannot be saved for backward: clone them into ordinary tensors
        return logits.clone(), {k: v.clone() for k, v in feats.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        t_logits, t_feats = self._teacher_forward(image)
        s_out = self.network(image)
        s_feats = dict(self._student_taps.features) if self._student_taps else {}
        s_logits = s_out[:, 0] if s_out.ndim == t_logits.ndim + 1 else s_out  # deep supervision: full-res head
        seg = self.recipe.supervised.weight * self.supervised(s_out, label)
        out = {"seg": seg}
        for name, loss in self.terms.items():
            term = self.recipe.terms[name]
            inputs = getattr(type(loss), "inputs", "logits")
            if inputs == "logits":
                value = loss(s_logits, t_logits)
            else:
                s_names, t_names = self.taps[name]
                args = ([s_feats[n] for n in s_names], [t_feats[n] for n in t_names])
                value = loss(*args, label) if inputs == "features+label" else loss(*args)
            out[name] = term.weight * value
        total = sum(out.values())
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}


def distill_task_factory(config: RunConfig):
    """A ``task_factory`` for :class:`medkd.engine.trainer.Trainer` built from ``config.distill``."""
    from medkd.recipes import recipe_from_dict

    def factory(student: nn.Module, data, cfg: RunConfig) -> Distiller:
        teacher, state = load_teacher(cfg.distill.teacher)
        check_teacher(state, data.dataset.labels, data.dataset.num_channels, cfg.data.spatial_dims, str(cfg.distill.teacher))
        recipe = recipe_from_dict(cfg.distill.recipe, source=f"{cfg.distill.teacher} recipe")
        return Distiller(student, teacher, recipe, spatial_dims=cfg.data.spatial_dims,
                         in_channels=data.dataset.num_channels, num_classes=data.dataset.num_classes)

    return factory
