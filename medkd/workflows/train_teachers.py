"""Train a teacher set (``medkd train-teachers``) from one base run config.

What the members are is the plan's business (:mod:`medkd.workflows.teacher_plan`: the ``uniform``,
``diverse``, ``subset`` and ``multitask`` kinds); this module trains each member as an ordinary medkd
run and lists the finished ones in a manifest.

Output folder ``OUT``::

    OUT/plan.json            the plan (written first, atomically; see TeacherPlan.to_dict)
    OUT/members/<name>/      one medkd run folder per member (config.yaml, best.pt, result.json, ...)
    OUT/teachers.json        manifest of the finished members (rewritten after each member)

Every member resumes on its own: finished members (``result.json``) are skipped, an interrupted one
(``last.pt`` without ``result.json``) continues from its checkpoint, missing ones start.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medkd.engine.ensemble import set_postprocessing_path
from medkd.engine.trainer import RunDirError, train
from medkd.engine.validation import decide_set_postprocessing
from medkd.storage import atomic_write_text, load_checkpoint
from medkd.teachers.manifest import MANIFEST_NAME, TeacherMember, TeacherSet, load_manifest
from medkd.workflows.teacher_plan import (MemberPlan, TeacherPlan, TeacherPlanError, make_plan, plan_differences,
                                          read_plan)
from medkd.workflows.train import default_run_dir, resolve_config

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"


def _open_plan(out: Path, plan: TeacherPlan | None, resume: bool) -> TeacherPlan:
    """Write ``plan.json`` in a new ``out``; on resume, check (or, without ``plan``, read) the stored one."""
    path = out / PLAN_NAME
    if not resume:
        if plan is None:
            raise ValueError("train_teacher_set needs a plan (or resume=True to continue the stored one)")
        if out.exists() and any(out.iterdir()):
            raise RunDirError(f"teacher-set folder {out} already exists and is not empty; pass --resume to "
                              "continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(plan.to_dict(), indent=1) + "\n")
        return plan
    if not path.is_file():
        raise RunDirError(f"cannot resume the teacher set in {out}: {path} does not exist")
    stored = read_plan(path)
    if plan is not None:
        diffs = plan_differences(stored.to_dict(), plan.to_dict())
        if diffs:
            listing = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
            raise TeacherPlanError(f"cannot resume {out}: the new plan differs from {path} (stored -> new):\n  "
                                   f"{listing}\nresume with the same options, or choose another --out")
    return stored


# ----------------------------------------------------------------------------- training


def member_dir(out: Path, member: MemberPlan) -> Path:
    return Path(out) / "members" / member.name


def is_main_process() -> bool:
    """False in the non-zero ranks of a distributed launch (torchrun, SLURM, Fabric's DDP launcher).

    Those ranks train alongside rank 0 but leave every file (plan, folders, manifest) to it.
    """
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _train_member(plan: TeacherPlan, member: MemberPlan, run_dir: Path, main: bool = True) -> None:
    """Train, resume or skip one member (the decision follows its run folder)."""
    if (run_dir / "result.json").is_file():
        log.info("teacher %s: finished earlier, skipped", member.name)
        return
    kwargs: dict[str, Any] = {}
    if plan.kind == "multitask":
        from medkd.engine.multitask import multitask_task_factory

        weight, tap = plan.options["aux_weight"], plan.options["aux_tap"]
        kwargs = {"task_factory": multitask_task_factory(aux_weight=weight, tap=tap),
                  "extra_checkpoint": {"teacher_task": {"kind": "multitask", "aux_weight": weight, "aux_tap": tap}}}
    if (run_dir / "last.pt").is_file():
        log.info("teacher %s: resuming from %s", member.name, run_dir / "last.pt")
        train(None, run_dir, resume=True, **kwargs)
        return
    # a member stopped before its first checkpoint: the trainer replaces its leftovers (or refuses if in use)
    log.info("teacher %s: training in %s", member.name, run_dir)
    train(plan.member_config(member), run_dir, **kwargs)


def _finished_member(plan: TeacherPlan, member: MemberPlan, run_dir: Path) -> TeacherMember:
    result = json.loads((run_dir / "result.json").read_text())
    best = result.get("best_metric")
    config = plan.member_config(member)
    info: dict[str, Any] = {"run_dir": f"members/{member.name}", "preset": config.model.preset,
                            "steps": result.get("steps"), "best_step": result.get("best_step")}
    if member.groups is not None:
        info["groups"] = member.groups
    if plan.kind == "multitask":
        info.update(task="multitask", **plan.options)
    return TeacherMember(name=member.name, checkpoint=run_dir / "best.pt",
                         val_dice=float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None,
                         model=config.model.name, loss=config.train.loss, seed=config.train.seed,
                         cases=member.cases, info=info)


def write_manifest(out: Path, plan: TeacherPlan) -> Path | None:
    """(Re)write ``OUT/teachers.json`` listing the finished members in plan order; None if none finished."""
    finished = [(m, member_dir(out, m)) for m in plan.members if (member_dir(out, m) / "result.json").is_file()]
    if not finished:
        return None
    labels = dict(load_checkpoint(finished[0][1] / "best.pt")["labels"])
    members = [_finished_member(plan, m, d) for m, d in finished]
    return TeacherSet(kind=plan.kind, members=members, labels=labels, source=out / MANIFEST_NAME).save(out)


def train_teacher_set(out: str | Path, plan: TeacherPlan | None = None, *,
                      resume: bool = False) -> TeacherSet | None:
    """Train every member of ``plan`` into ``out`` and return the finished set (see the module doc).

    In a distributed run (several devices) every rank calls this; only rank 0 writes files and
    returns the set, the other ranks return None.

    Args:
        out: the set's folder; must be new or empty unless ``resume``.
        plan: from :func:`make_plan`; with ``resume`` it must equal the stored ``plan.json`` (the error
            lists what differs), or be None to continue the stored plan.
        resume: continue an interrupted set: finished members are skipped, interrupted ones resume
            from ``last.pt``, the others start.

    Raises:
        RunDirError: ``out`` holds something and ``resume`` is False, or there is no plan to resume.
        TeacherPlanError: the new plan differs from the stored one.
    """
    out, main = Path(out), is_main_process()
    plan = _open_plan(out, plan, resume) if main else plan or read_plan(out / PLAN_NAME)
    for index, member in enumerate(plan.members):
        log.info("teacher %d/%d: %s", index + 1, len(plan.members), member.name)
        _train_member(plan, member, member_dir(out, member), main)
        if main:
            write_manifest(out, plan)
    if not main:
        return None
    teachers = load_manifest(out)
    # the ensemble's own post-processing, as nnU-Net decides it for an ensemble (once; stale ones are ignored
    # with a warning when predicting, and `medkd postprocess --run-dir SET` decides again)
    if len(teachers.members) > 1 and not set_postprocessing_path(teachers).is_file():
        decide_set_postprocessing(teachers)
    return teachers


def run_teacher_set(out: str | Path | None, kind: str | None = None, config: str | Path | None = None,
                    overrides: Mapping[str, Any] | None = None, *, resume: bool = False,
                    **plan_options: Any) -> TeacherSet | None:
    """Plan a teacher set from a base config and train it into ``out`` (``medkd train-teachers``).

    ``config`` (YAML) and dotted-key ``overrides`` give the base config shared by every member;
    ``plan_options`` go to :func:`make_plan` (``kind`` default ``uniform``). With ``resume`` and nothing
    else given, the stored plan is used; otherwise the new plan must match it. ``out`` defaults to
    ``runs/<time>-<random>_teachers_<kind>`` (required with ``resume``).
    """
    plan = None
    if not resume or overrides or config or kind or any(v is not None for v in plan_options.values()):
        plan = make_plan(kind or "uniform", resolve_config(config, overrides), **plan_options)
    if resume and out is None:
        raise ValueError("--resume needs --out (the teacher-set folder to continue)")
    return train_teacher_set(out or default_run_dir("teachers", plan.kind), plan, resume=resume)
