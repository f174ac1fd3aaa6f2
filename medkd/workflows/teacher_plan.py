"""Teacher-set plans: which members a set has (``medkd train-teachers --kind ...``), and ``plan.json``.

Kinds of set (each member is an ordinary medkd training run):

* ``uniform``   - ``N`` members, one architecture and loss, seeds ``seed + 0 .. seed + N - 1``;
* ``diverse``   - the grid ``models x losses`` (default unet/basicunet/segresnet x dice_ce/ce), as in
  the heterogeneous ensembles of Noothout et al. 2022; member ``i`` has seed ``seed + i``;
* ``subset``    - ``K`` members, each trained on its own disjoint part of the fold's training cases
  (``data.cases``): a seeded random partition into ``K`` nearly equal parts, or, with ``group_by``,
  whole groups of a case-metadata key (e.g. ``site``) assigned to ``K`` parts balancing case counts;
* ``multitask`` - ``N`` uniform members, each a multi-task teacher (:mod:`medkd.engine.multitask`).

A plan is pure data (:class:`TeacherPlan`); :mod:`medkd.workflows.train_teachers` trains it.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medkd.config import RunConfig, TrainConfig, build_config

PLAN_FORMAT = "medkd-teacher-plan-v1"
PLAN_KINDS = ("uniform", "diverse", "subset", "multitask")
DEFAULT_MEMBERS = 3
DEFAULT_SUBSETS = 3
DEFAULT_DIVERSE_MODELS = ("unet", "basicunet", "segresnet")
DEFAULT_DIVERSE_LOSSES = ("dice_ce", "ce")
SUPERVISED_LOSSES: tuple[str, ...] = typing.get_args(TrainConfig.model_fields["loss"].annotation)


class TeacherPlanError(ValueError):
    """Options that do not make a teacher set, or a resume whose plan differs from the stored one."""


@dataclass
class MemberPlan:
    """One member: its run-config ``overrides`` (dotted keys) and, for subset teachers, its ``cases``.

    ``groups`` lists the ``group_by`` values (e.g. sites) of a grouped subset member.
    """

    name: str
    overrides: dict[str, Any]
    cases: list[str] | None = None
    groups: list[str] | None = None


@dataclass
class TeacherPlan:
    """What ``train_teacher_set`` trains; serialised as ``plan.json``::

        {"format": "medkd-teacher-plan-v1", "kind": "subset",
         "options": {"group_by": "site", "partition_seed": 0},   # kind-specific, see make_plan
         "base_config": {...resolved RunConfig...},
         "members": [{"name": "subset0", "overrides": {"train.seed": 0, "data.cases": [...], ...},
                      "cases": [...], "groups": ["site1"]}, ...]}

    A member's config is ``build_config(base_config, member.overrides)``.
    """

    kind: str
    base_config: dict[str, Any]
    members: list[MemberPlan]
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {"format": PLAN_FORMAT, "kind": self.kind, "options": self.options, "base_config": self.base_config,
                "members": [asdict(m) for m in self.members]}
        return json.loads(json.dumps(data))  # plain JSON data, as read back from plan.json

    @classmethod
    def from_dict(cls, data: Any, source: str = "<plan>") -> "TeacherPlan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise TeacherPlanError(f"{source} is not a teacher-set plan (missing format={PLAN_FORMAT!r})")
        try:
            members = [MemberPlan(**row) for row in data["members"]]
            return cls(kind=data["kind"], base_config=data["base_config"], members=members,
                       options=data.get("options", {}))
        except (KeyError, TypeError) as err:
            raise TeacherPlanError(f"{source}: malformed plan ({err})") from None

    def member_config(self, member: MemberPlan) -> RunConfig:
        return build_config(self.base_config, member.overrides, source=f"teacher plan, member {member.name}")


# ----------------------------------------------------------------------------- planning


def _names(values: list[str] | None, known: list[str] | tuple[str, ...], what: str) -> list[str] | None:
    if values is None:
        return None
    values = [v.strip() for v in values if v.strip()]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise TeacherPlanError(f"unknown {what} name(s) {', '.join(unknown) or '(none given)'}; "
                               f"available: {', '.join(known)}")
    if len(set(values)) != len(values):
        raise TeacherPlanError(f"{what} names given more than once: {', '.join(values)}")
    return values


def _single(values: list[str] | None, default: str, what: str, kind: str) -> str:
    if values and len(values) > 1:
        raise TeacherPlanError(f"--kind {kind} trains one {what} for all members, got {', '.join(values)} "
                               "(several are for --kind diverse)")
    return values[0] if values else default


def partition_cases(case_ids: list[str], k: int, seed: int, group_by: str | None = None,
                    metadata: dict[str, dict[str, str]] | None = None) -> list[tuple[list[str], list[str] | None]]:
    """Split ``case_ids`` into ``k`` disjoint parts covering them all: ``[(cases, group values), ...]``.

    Without ``group_by`` every case is its own group, so the parts are a seeded random partition into
    nearly equal sizes (differing by at most one). With ``group_by`` the cases are grouped by
    ``metadata[case][group_by]``; groups stay whole and are assigned largest first to the currently
    smallest part after a seeded shuffle (:func:`medkd.data.splits.assign_folds`, as for folds).

    Raises:
        TeacherPlanError: ``k < 2``, fewer cases (or groups) than ``k``, or cases without the key.
    """
    from medkd.data.splits import assign_folds

    if k < 2:
        raise TeacherPlanError(f"--kind subset needs at least 2 subsets, got {k}")
    if group_by is None:
        groups = {c: [c] for c in case_ids}
    else:
        metadata = metadata or {}
        missing = [c for c in case_ids if group_by not in metadata.get(c, {})]
        if missing:
            keys = sorted({key for c in case_ids for key in metadata.get(c, {})})
            raise TeacherPlanError(f"--group-by {group_by}: {len(missing)} training case(s) have no metadata key "
                                   f"{group_by!r} (e.g. {', '.join(missing[:5])}); keys in case_metadata.json: "
                                   f"{', '.join(keys) or 'none'}")
        groups = {}
        for case in case_ids:
            groups.setdefault(metadata[case][group_by], []).append(case)
    if len(groups) < k:
        what = f"groups of {group_by!r} ({', '.join(sorted(groups))})" if group_by else "training cases"
        raise TeacherPlanError(f"cannot make {k} disjoint subsets from {len(groups)} {what}; use --subsets "
                               f"{len(groups)} or fewer")
    parts = assign_folds(groups, k, seed)
    if group_by is None:
        return [(part, None) for part in parts]
    return [(part, sorted(g for g, ids in groups.items() if ids[0] in set(part))) for part in parts]


def plan_members(kind: str, base_config: RunConfig, *, members: int | None = None, models: list[str] | None = None,
                 losses: list[str] | None = None, subsets: int | None = None, group_by: str | None = None,
                 train_cases: list[str] | None = None,
                 case_metadata: dict[str, dict[str, str]] | None = None) -> list[MemberPlan]:
    """The members of a set of ``kind`` (deterministic and pure: no files are read).

    ``train_cases`` (the fold's training case ids) and ``case_metadata`` are needed for
    ``kind="subset"`` only (see :func:`fold_training_cases`). Options that do not apply to ``kind``
    are errors, so a typo never trains something else than asked.
    """
    from medkd.models import list_models

    if kind not in PLAN_KINDS:
        raise TeacherPlanError(f"unknown teacher-set kind {kind!r}; choose one of {', '.join(PLAN_KINDS)}")
    models = _names(models, list_models(), "model")
    losses = _names(losses, SUPERVISED_LOSSES, "loss")
    if members is not None and kind not in ("uniform", "multitask"):
        raise TeacherPlanError(f"--members applies to --kind uniform/multitask; for --kind {kind} the members "
                               "are " + ("the models x losses grid" if kind == "diverse" else "the --subsets"))
    if (subsets is not None or group_by is not None) and kind != "subset":
        raise TeacherPlanError("--subsets and --group-by apply to --kind subset only")
    seed, model, loss = base_config.train.seed, base_config.model.name, base_config.train.loss
    if kind == "diverse":
        grid = [(m, l) for m in models or DEFAULT_DIVERSE_MODELS for l in losses or DEFAULT_DIVERSE_LOSSES]
        return [MemberPlan(f"{m}_{l}", {"model.name": m, "train.loss": l, "train.seed": seed + i})
                for i, (m, l) in enumerate(grid)]
    model, loss = _single(models, model, "model", kind), _single(losses, loss, "loss", kind)
    common = {"model.name": model, "train.loss": loss}
    if kind == "subset":
        if train_cases is None:
            raise TeacherPlanError("--kind subset needs the fold's training cases (see fold_training_cases)")
        parts = partition_cases(sorted(train_cases), subsets or DEFAULT_SUBSETS, seed, group_by, case_metadata)
        return [MemberPlan(f"subset{i}", {**common, "train.seed": seed + i, "data.cases": cases,
                                          "data.data_fraction": 1.0}, cases=cases, groups=groups)
                for i, (cases, groups) in enumerate(parts)]
    count = DEFAULT_MEMBERS if members is None else members
    if count < 1:
        raise TeacherPlanError(f"--members must be at least 1, got {count}")
    infix = "_mt" if kind == "multitask" else ""
    return [MemberPlan(f"{model}{infix}_seed{seed + i}", {**common, "train.seed": seed + i}) for i in range(count)]


def fold_training_cases(config: RunConfig) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The training case ids of ``config`` (fold split, ``data.cases``, ``data_fraction``) and their metadata."""
    from medkd.data.dataset import load_dataset
    from medkd.engine.data_setup import split_case_ids

    if config.data.dataset is None:
        raise ValueError("data.dataset is not set: pass --dataset or set it in the config")
    dataset = load_dataset(config.data.dataset)
    train_ids, _ = split_case_ids(config.data, dataset, seed=config.train.seed)
    return train_ids, {c.case_id: dict(c.metadata) for c in dataset.training}


def make_plan(kind: str, base_config: RunConfig, *, members: int | None = None, models: list[str] | None = None,
              losses: list[str] | None = None, subsets: int | None = None, group_by: str | None = None,
              aux_weight: float | None = None, aux_tap: str | None = None) -> TeacherPlan:
    """A :class:`TeacherPlan` (subset plans read the dataset's split and case metadata)."""
    from medkd.engine.multitask import DEFAULT_AUX_WEIGHT, check_tap

    if (aux_weight is not None or aux_tap is not None) and kind != "multitask":
        raise TeacherPlanError("--aux-weight and --aux-tap apply to --kind multitask only")
    cases = metadata = None
    if kind == "subset":
        cases, metadata = fold_training_cases(base_config)
    planned = plan_members(kind, base_config, members=members, models=models, losses=losses, subsets=subsets,
                           group_by=group_by, train_cases=cases, case_metadata=metadata)
    options: dict[str, Any] = {}
    if kind == "subset":
        options = {"group_by": group_by, "partition_seed": base_config.train.seed}
    if kind == "multitask":
        weight = DEFAULT_AUX_WEIGHT if aux_weight is None else float(aux_weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise TeacherPlanError(f"--aux-weight must be a finite number >= 0, got {aux_weight}")
        options = {"aux_weight": weight, "aux_tap": aux_tap}
        if aux_tap is not None:
            check_tap(base_config, aux_tap)
    plan = TeacherPlan(kind, base_config.to_yaml_dict(), planned, options)
    for member in planned:  # every member config must validate before anything is trained
        plan.member_config(member)
    return plan


# ----------------------------------------------------------------------------- plan files


def read_plan(path: Path) -> TeacherPlan:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TeacherPlanError(f"cannot read teacher-set plan {path}: {err}") from None
    return TeacherPlan.from_dict(data, source=str(path))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _named_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) and "name" in r for r in value)


def plan_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences ``key: old -> new`` between two plan dicts (dotted keys; members by name)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new or key not in old:
                out.append(f"{where}: {_short(old.get(key, '<absent>'))} -> {_short(new.get(key, '<absent>'))}")
            else:
                out += plan_differences(old[key], new[key], where)
        return out
    if _named_rows(old) and _named_rows(new):  # members: compare by name
        names = {"old": [r["name"] for r in old], "new": [r["name"] for r in new]}
        out = [] if names["old"] == names["new"] else [
            f"{path} (names): {_short(names['old'])} -> {_short(names['new'])}"]
        by_name = {r["name"]: r for r in new}
        return out + [d for r in old if r["name"] in by_name
                      for d in plan_differences(r, by_name[r["name"]], f"{path}[{r['name']}]")]
    return [] if old == new else [f"{path}: {_short(old)} -> {_short(new)}"]
