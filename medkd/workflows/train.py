"""Train a run (``medkd train``, and the training half of ``medkd distill``) from plain Python.

A run config is resolved from an optional YAML file plus dotted-key overrides
(:func:`config_overrides` builds them from the command line's options: precedence ``--set`` >
flags > defaults given by the command, e.g. a teacher's data settings; :func:`run_overrides` puts a
plan's defaults under all of them and the YAML file, see :mod:`medkd.workflows.plan`); :func:`train_run` runs it in
its run folder, :func:`resume_run` continues a run from its folder's ``last.pt`` and ``config.yaml``.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import yaml

from medkd.config import RunConfig, load_config
from medkd.engine.budget import PhaseClock
from medkd.engine.teacher_watch import TeacherDiceWatch, teacher_validation_dice
from medkd.engine.trainer import TrainResult, train

log = logging.getLogger(__name__)


def parse_set(items: Iterable[str] | None) -> dict[str, Any]:
    """``["train.val_every=100", ...]`` (dotted key, YAML value) as ``{"train.val_every": 100, ...}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (dotted key, YAML value), got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(f"--set {item!r}: the value of {key.strip()} is not valid YAML ({problem}); quote "
                             "it for a string, e.g. --set \"key='text'\"") from None
    return out


def default_run_dir(model: str, preset: str) -> Path:
    """``runs/<time>-<6 random hex digits>_<model>_<preset>``, the run folder when none is given.

    The random part keeps apart jobs started in the same second (claiming the folder, see
    :mod:`medkd.engine.run_dir`, would refuse the second rather than let it overwrite the first).
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{secrets.token_hex(3)}_{model}_{preset}"


def config_overrides(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dotted-key config overrides from the shared training options (only those given).

    ``options`` holds the command line's training options by name (``dataset``, ``model``,
    ``patch_size`` as ``"128,128"``, ``set_`` as a list of ``KEY=VALUE``...; see ``medkd train --help``);
    precedence: ``set_`` > the other options > ``defaults``.
    """
    o = options
    dataset, model, preset, shrink, mode = o["dataset"], o["model"], o["preset"], o["shrink"], o["mode"]
    patch_size, devices = o["patch_size"], o["devices"]
    overrides = {
        "data.dataset": str(dataset) if dataset else None, "model.name": model, "model.preset": preset,
        "model.shrink": shrink, "data.mode": mode, "data.batch_size": o["batch_size"], "data.fold": o["fold"],
        "data.patch_size": [int(v) for v in patch_size.split(",")] if patch_size else None,
        "data.num_workers": o["num_workers"], "data.data_fraction": o["data_fraction"], "train.loss": o["loss"],
        "data.labeled_cases": o["labeled_cases"], "data.labeled_fraction": o["labeled_fraction"],
        "data.unlabeled": [str(p) for p in o["unlabeled"]] if o["unlabeled"] else None,
        "train.optimizer": o["optimizer"], "train.lr": o["lr"], "train.max_steps": o["max_steps"],
        "train.max_epochs": o["max_epochs"], "train.max_time_min": o["max_time_min"], "train.val_every": o["val_every"],
        "train.seed": o["seed"], "train.accelerator": o["accelerator"],
        "train.devices": int(devices) if devices and devices.isdigit() else devices, "train.num_nodes": o["num_nodes"],
        "train.strategy": o["strategy"], "train.precision": o["precision"],
    }
    return {**(defaults or {}), **{k: v for k, v in overrides.items() if v is not None}, **parse_set(o["set_"])}


def run_overrides(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                  note: Callable[[str], Any] = print) -> dict[str, Any]:
    """:func:`config_overrides` over the defaults of a plan (``options["plan"]`` and ``["configuration"]``,
    else planned from the dataset; see :func:`medkd.workflows.plan.planned_overrides`); none when resuming."""
    from medkd.config import load_yaml
    from medkd.workflows.plan import planned_overrides

    overrides = config_overrides(options, defaults)
    if options.get("resume"):
        return overrides
    file_tree = load_yaml(options["config"]) if options.get("config") else {}
    return planned_overrides(overrides, file_tree, plan=options.get("plan"), configuration=options.get("configuration"),
                             note=note)


def resolve_config(config: str | Path | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config of a YAML file (or none: defaults) with dotted-key ``overrides`` applied."""
    return load_config(config, dict(overrides or {}))


def train_run(config: RunConfig, run_dir: str | Path | None = None, note: Callable[[str], Any] = log.info,
              clock: PhaseClock | None = None) -> TrainResult | None:
    """Train (or, with ``config.distill``, distil) in ``run_dir`` (default :func:`default_run_dir`).

    A distillation run tells ``note`` its teacher's validation Dice and warns once if the student passes it.
    ``clock``: the command's (``train.max_time_min`` counts from its start; default: from the run's start).
    Returns the trainer's result (None on non-zero ranks of a distributed run).
    """
    run_dir = run_dir or default_run_dir(config.model.name, config.model.preset)
    watch = _teacher_watch(config, note)
    return _watched(train(config, run_dir, callbacks=[watch] if watch else [], clock=clock), watch)


def resume_run(run_dir: str | Path, note: Callable[[str], Any] = log.info,
               clock: PhaseClock | None = None) -> TrainResult | None:
    """Continue the run in ``run_dir`` from its ``last.pt``, with the config stored there (None on non-zero ranks)."""
    watch = _teacher_watch(load_config(Path(run_dir) / "config.yaml"), note) if (Path(run_dir) / "config.yaml").is_file() \
        else None
    return _watched(train(None, run_dir, resume=True, callbacks=[watch] if watch else [], clock=clock), watch)


def _teacher_watch(config: RunConfig, note: Callable[[str], Any]) -> TeacherDiceWatch | None:
    """For a distillation run: tell the teacher's validation Dice, and watch for the student passing it."""
    if config.distill is None:
        return None
    dice, what = teacher_validation_dice(config.distill.teacher)
    note(f"teacher {config.distill.teacher}: {what}{'' if dice is None else f' {dice:.4f}'}")
    return TeacherDiceWatch(dice)


def _watched(result: TrainResult, watch: TeacherDiceWatch | None) -> TrainResult | None:
    if watch is not None and result.global_rank == 0:
        watch.finish(result.run_dir, result.best_metric, result.steps)
    return _rank_zero(result)


def _rank_zero(result: TrainResult) -> TrainResult | None:
    """``result`` in the process of rank 0; None in the other ranks of a distributed run (they report nothing)."""
    return result if result.global_rank == 0 else None


def run_from_options(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                     note: Callable[[str], Any] = print) -> TrainResult | None:
    """Run what the train/distill command line asks: ``options`` are its collected options (``config``,
    ``run_dir``, ``resume``, flags, ``set_``). Resolves the config from --config, flags and --set over
    ``defaults`` and trains in a new run, or with ``resume`` continues ``run_dir`` (``note`` tells which
    given options that ignores). ``None`` on non-zero ranks of a distributed run."""
    config, run_dir = options["config"], options["run_dir"]
    clock = PhaseClock()  # from the process's start: --max-time-min bounds the whole command
    with clock.phase("plan"):
        overrides = run_overrides(options, defaults, note)
    if not options["resume"]:
        return train_run(resolve_config(config, overrides), run_dir, note, clock)
    if run_dir is None:
        raise ValueError("--resume needs --run-dir (the folder of the run to continue)")
    ignored = [k for k, v in overrides.items() if v is not None] + [f"--{k}" for k in ("plan", "configuration")
                                                                     if options.get(k)]
    if ignored or config:
        note(f"note: resuming uses {Path(run_dir) / 'config.yaml'}; ignoring {', '.join(ignored) or '--config'}")
    return resume_run(run_dir, note, clock)
