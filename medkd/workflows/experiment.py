"""``medkd experiment STUDY.yaml``: every student x method x seed x budget x labelled setting, restartable.

The study file (:mod:`medkd.workflows.study`) is checked first, and every run config of the study is
built and validated before anything trains. Output folder ``OUT`` (default: beside the study file,
named after it)::

    OUT/study.yaml            the study as last run, resolved (absolute paths, defaults filled in)
    OUT/cache/                preprocessed cases and cached teacher outputs (unless data.cache_dir is set)
    OUT/runs/<run>/           one medkd run folder per training (config.yaml, best.pt, result.json, ...)
    OUT/eval/<run>/           predictions/ of the test cases, per_case.csv, summary.json, run.json
    OUT/results.csv, runs.csv, summary.csv   (see :mod:`medkd.workflows.study_results`)

Run names: ``teacher__<labels>`` (or ``teacher__given``) and ``<student>__<method>__<budget>__<labels>__seed<k>``
with ``method`` = ``labels-only`` or a recipe name, ``budget`` e.g. ``steps200`` / ``min2`` and ``labels``
``all`` / ``frac0.1`` / ``cases3``. Teachers train first (each labelled setting has its own teacher,
trained on those labels); labels-only students and distilled students keep the same labelled cases
(``data.labeled_seed``).

Restarting: a run with ``result.json`` is not trained again, one with ``last.pt`` resumes from it
(a run stopped by SIGTERM/SIGINT writes it), one with neither starts; an evaluated run
(``eval/<run>/run.json``) is not evaluated again. So the command can be stopped and started again at
any point and repeats no finished run. A run whose stored ``config.yaml`` differs from what the study
now asks is refused with the differences (edit the study back, or use another ``--out``).

Without ``devices`` runs go one after another in this process, each on the study's ``train.accelerator``
/ ``train.devices`` as a plain ``medkd train`` would. With ``devices`` (``"cuda:0,cuda:1"``,
``"cpu:0-1,cpu:2-3"``, :mod:`medkd.workflows.study_slots`) they are spread over those slots, one run per
slot at a time, each in its own process (:mod:`medkd.workflows.study_scheduler`); the same restart rules hold.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml
from rich.console import Console

from medkd.config import ConfigError, ModelConfig, build_config, load_yaml
from medkd.storage import atomic_write_text
from medkd.workflows.study import LABELS_ONLY, Budget, Study, load_study

if TYPE_CHECKING:
    from medkd.workflows.study_slots import Slot


@dataclass
class PlannedRun:
    """One training (or a given teacher) of a study and where its run and evaluation live."""

    run_id: str
    role: str  # "teacher" or "student"
    student: str  # the student's name; "teacher" for teachers
    method: str  # "teacher", "labels-only" or a recipe name
    seed: int
    budget: Budget | None  # None for a given teacher
    labels: str
    tree: dict[str, Any] | None  # the run config; None for a given teacher (not trained here)
    checkpoint: Path  # what is evaluated: the run's best.pt, or the given teacher
    run_dir: Path | None
    eval_dir: Path

    @property
    def trained_here(self) -> bool:
        """False for a given teacher, which the study only evaluates."""
        return self.tree is not None


def default_out(study_path: Path) -> Path:
    """``studies/phantoms.yaml`` -> ``studies/phantoms/``."""
    return study_path.with_suffix("")


def _given_teacher(path: Path) -> Path:
    """A run folder means its best.pt; a teacher-set folder or teachers.json and checkpoints stay as they are."""
    if path.is_dir() and (path / "best.pt").is_file() and not (path / "teachers.json").is_file():
        return path / "best.pt"
    return path


def _tree(study: Study, out: Path, model: ModelConfig, budget: Budget, seed: int,
          label_keys: dict[str, Any], teacher: bool = False) -> dict[str, Any]:
    """Run config of one training: shared data/train keys (a teacher's own over them), the dataset, labels,
    budget and seed."""
    own = study.teacher if teacher else None
    data = {"cache_dir": str(out / "cache"), **study.data, **(own.data if own else {}), "dataset": str(study.dataset),
            **label_keys}
    train = {**study.train, **(own.train if own else {}), **budget.train_keys(), "seed": seed}
    return {"data": data, "model": model.model_dump(mode="json"), "train": train}


def _distilled(tree: dict[str, Any], study: Study, teacher: Path, recipe: str) -> tuple[str, dict[str, Any]]:
    """(method name, run config) of distilling with ``recipe`` (as ``medkd distill`` resolves it)."""
    from medkd.recipes import load_recipe

    spec = load_recipe(recipe)
    tree = json.loads(json.dumps(tree))
    tree["distill"] = {"teacher": str(teacher), "recipe": spec.model_dump(mode="json")}
    if spec.data.data_fraction is not None:
        tree["data"]["data_fraction"] = spec.data.data_fraction
    if study.unlabeled:
        tree["data"]["unlabeled"] = [str(p) for p in study.unlabeled]
    return spec.name, tree


def _teachers(study: Study, out: Path) -> tuple[list[PlannedRun], dict[str, Path]]:
    """Teacher runs (one per labelled setting, or the given one) and each setting's teacher checkpoint."""
    spec = study.teacher
    if spec.path is not None:
        checkpoint = _given_teacher(spec.path)
        run = PlannedRun("teacher__given", "teacher", "teacher", "teacher", spec.seed, None, "given", None,
                         checkpoint, None, out / "eval" / "teacher__given")
        return [run], {tag: checkpoint for tag, _ in study.label_settings()}
    runs, checkpoints = [], {}
    for tag, keys in study.label_settings():
        run_id = f"teacher__{tag}"
        run_dir = out / "runs" / run_id
        tree = _tree(study, out, spec.model, spec.budget, spec.seed, keys, teacher=True)
        runs.append(PlannedRun(run_id, "teacher", "teacher", "teacher", spec.seed, spec.budget, tag, tree,
                               run_dir / "best.pt", run_dir, out / "eval" / run_id))
        checkpoints[tag] = run_dir / "best.pt"
    return runs, checkpoints


def plan_runs(study: Study, out: Path, source: str = "<study>") -> list[PlannedRun]:
    """Every run of the study in training order (teachers first); each run config is validated here.

    Raises :class:`ConfigError` naming ``source`` and the key when a run config is invalid.
    """
    runs, teachers = _teachers(study, out)
    for tag, keys in study.label_settings():
        for budget in study.budgets:
            for seed in study.seeds:
                for student in study.students:
                    base = _tree(study, out, student.model, budget, seed, keys)
                    methods = [(LABELS_ONLY, base)] + [_distilled(base, study, teachers[tag], r) for r in study.recipes]
                    for method, tree in methods:
                        run_id = f"{student.name}__{method}__{budget.tag}__{tag}__seed{seed}"
                        run_dir = out / "runs" / run_id
                        runs.append(PlannedRun(run_id, "student", student.name, method, seed, budget, tag, tree,
                                               run_dir / "best.pt", run_dir, out / "eval" / run_id))
    for run in runs:
        if run.tree is not None:
            build_config(run.tree, source=f"{source} (run {run.run_id})")
    return runs


def run_status(run: PlannedRun) -> str:
    """``done`` (evaluated), ``evaluate`` (trained), ``resume`` (has last.pt) or ``train``."""
    if (run.eval_dir / "run.json").is_file():
        return "done"
    if not run.trained_here or (run.run_dir / "result.json").is_file():
        return "evaluate"
    return "resume" if (run.run_dir / "last.pt").is_file() else "train"


def check_same_config(run: PlannedRun, slot: "Slot | None" = None) -> None:
    """Refuse to continue or reuse a run whose stored config differs from the one the study asks for.

    Where it ran (``train.accelerator``, ``devices``, ``num_threads``) is not compared: a run may resume
    in another slot. ``slot`` (any slot of the call) places the planned config to resolve its precision.
    """
    from medkd.engine.trainer import resolve_precision
    from medkd.workflows.study_slots import PLACEMENT_KEYS, placed
    from medkd.workflows.teacher_plan import plan_differences

    stored_path = run.run_dir / "config.yaml"
    if not stored_path.is_file() or run_status(run) not in ("done", "evaluate", "resume"):
        return
    planned = build_config(placed(run.tree, slot))
    planned.train.precision = resolve_precision(planned.train.precision, planned.train.accelerator)
    placement = tuple(f"train.{key}:" for key in PLACEMENT_KEYS)
    diffs = [d for d in plan_differences(load_yaml(stored_path), planned.to_yaml_dict()) if not d.startswith(placement)]
    if diffs:
        raise ConfigError(f"{stored_path} holds a run made with another config than the study now asks "
                          f"(stored -> study): {'; '.join(diffs[:8])}; restore the study file or use another --out")


def train_planned(run: PlannedRun, callbacks: Sequence[Any] = (), slot: "Slot | None" = None) -> None:
    """Train ``run`` (or resume it from last.pt), placed in ``slot`` if given; a finished run (result.json)
    is left alone. A resumed run keeps its stored config, placed in ``slot``."""
    from medkd.engine.trainer import train
    from medkd.workflows.study_slots import placed

    status = run_status(run)
    if status == "resume":
        stored = None if slot is None else build_config(placed(load_yaml(run.run_dir / "config.yaml"), slot))
        train(stored, run.run_dir, resume=True, callbacks=list(callbacks))
    elif status == "train":
        train(build_config(placed(run.tree, slot)), run.run_dir, callbacks=list(callbacks))


def _train_or_note(run: PlannedRun, callbacks: Sequence[Any], console: Console, study_path: Path) -> None:
    """:func:`train_planned`; when a stop signal ends the run, say how to continue the whole study."""
    from medkd.engine.preemption import TrainingInterrupted

    try:
        train_planned(run, callbacks)
    except TrainingInterrupted:
        console.print(f"study stopped in {run.run_id}; run `medkd experiment {study_path}` (same --out) again to "
                      "continue: finished runs are kept, this one resumes from its last.pt")
        raise


def _run_serially(runs: list[PlannedRun], study: Study, console: Console, study_path: Path,
                  callbacks: Callable[[PlannedRun], Sequence[Any]] | None,
                  after_run: Callable[[PlannedRun], None] | None) -> None:
    """Train (or resume) and evaluate every run not yet evaluated, one after another in this process."""
    from medkd.workflows.study_results import evaluate_run

    for index, run in enumerate(runs, 1):
        status = run_status(run)
        if status != "done":
            console.print(f"[bold][{index}/{len(runs)}][/] {run.run_id}: {status}")
        if status in ("train", "resume"):
            _train_or_note(run, callbacks(run) if callbacks else (), console, study_path)
        if status != "done":
            evaluate_run(run, study)
            if after_run is not None:
                after_run(run)


def run_study(study_path: str | Path, out: str | Path | None = None, *, dry_run: bool = False,
              devices: str | None = None, console: Console | None = None,
              callbacks: Callable[[PlannedRun], Sequence[Any]] | None = None,
              after_run: Callable[[PlannedRun], None] | None = None) -> Path:
    """Run (or, with ``dry_run``, list and cost) every run of the study in ``out``; return ``out``.

    ``devices`` (e.g. ``"cuda:0,cuda:1"``, ``"cpu:0,cpu:1"``) spreads the runs over those slots, one
    process per run; default: one after another in this process. ``callbacks(run)`` gives trainer
    callbacks for a run and ``after_run(run)`` is called when a run is trained and evaluated in this
    call (serial runs only; tests use them to stop a study part-way).
    """
    from medkd.workflows.study_results import write_outputs
    from medkd.workflows.study_slots import parse_devices

    console = console or Console()
    study_path = Path(study_path)
    slots = parse_devices(devices) if devices is not None else None
    study = load_study(study_path)
    # absolute: run configs store their cache and teacher paths, so a restart from another folder matches
    out = (Path(out) if out is not None else default_out(study_path)).resolve()
    runs = plan_runs(study, out, source=str(study_path))
    for run in runs:
        if run.trained_here:
            check_same_config(run, slots[0] if slots else None)
    if dry_run:
        from medkd.workflows.study_cost import print_plan

        print_plan(study, runs, console, slots=len(slots) if slots else 1)
        return out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    started = time.monotonic()
    if slots:
        from medkd.workflows.study_scheduler import run_on_slots

        run_on_slots(runs, study, slots, out, study_path, console)
    else:
        _run_serially(runs, study, console, study_path, callbacks, after_run)
    paths = write_outputs(out, runs, study)
    console.print(f"{len(runs)} runs in {out} ({time.monotonic() - started:.0f} s); wrote "
                  + ", ".join(p.name for p in paths))
    return out
