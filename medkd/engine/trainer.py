"""The training loop, on Lightning Fabric: one loop for supervised training and distillation.

Devices, mixed precision and DDP come from Fabric (``accelerator``, ``devices``, ``num_nodes``,
``strategy``, ``precision``): a single CPU or GPU, several GPUs, or several nodes under torchrun or
SLURM run the same code. What is optimised is a *task* (:mod:`medkd.engine.tasks`): pass
``task_factory`` to plug in a distillation task (frozen teacher + distillation terms).

Budget: ``max_steps`` / ``max_epochs`` (x ``steps_per_epoch``) / ``max_time_min``, whichever ends
first. The learning rate follows the poly schedule ``lr = lr0 * (1 - progress)^0.9`` where
``progress`` is the larger of the step fraction and the elapsed-time fraction.

Run folder: ``config.yaml`` (resolved config), ``last.pt`` / ``best.pt`` (atomic), ``train_log.csv``,
``val_log.csv``, ``tensorboard/``, ``postprocessing.json`` (decided for ``best.pt`` on the validation
cases, see :mod:`medkd.engine.postprocess`), ``result.json``, ``.medkd.lock`` (the claim, see
:mod:`medkd.engine.run_dir`). ``resume=True`` continues from ``last.pt``: weights,
optimiser, step, elapsed time, best score and RNG state, and the data stream continues at the same
sample (see :mod:`medkd.data.loaders`), so an interrupted run ends with the same weights as an
uninterrupted one (step budgets; a time budget depends on the clock); log rows after ``last.pt``'s
step are dropped, as the resumed run writes them again.

The folder is claimed only once the config, data and model are known to work; a run that fails
before its first checkpoint removes what it wrote there. SIGTERM/SIGINT during training write
``last.pt`` and raise :class:`~medkd.engine.preemption.TrainingInterrupted`.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from lightning_fabric import Fabric
from torch import nn

from medkd.config import ConfigError, RunConfig, save_config
from medkd.data.loaders import PatchDataset, make_train_loader
from medkd.engine.budget import PhaseClock, TimeBudget, time_budget
from medkd.engine.data_setup import TrainingData, prepare_training_data
from medkd.engine.fabric_setup import make_optimizer, progress_bar, resolve_precision  # noqa: F401 (re-exported)
from medkd.engine.preemption import IgnoreStopSignals, StopSignals, TrainingInterrupted
from medkd.engine.ranks import agree_on_run_dir, weight_digests
from medkd.engine.run_dir import CSVLog, RunClaim, check_run_dir, claim_run_dir, trim_log
from medkd.engine.run_dir import RunDirError  # noqa: F401  (re-exported: callers catch it from here)
from medkd.engine.tasks import SupervisedTask
from medkd.engine.validation import decide_run_postprocessing, validate
from medkd.losses import build_supervised_loss
from medkd.models import create, create_from_spec
from medkd.storage import atomic_write_text, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

TaskFactory = Callable[[nn.Module, TrainingData, RunConfig], nn.Module]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    elapsed_s: float
    best_metric: float
    best_step: int
    last_val: list[float]
    global_rank: int = 0  # of the process that returns it (a DDP run returns one per rank)


def default_task(network: nn.Module, data: TrainingData, config: RunConfig) -> nn.Module:
    return SupervisedTask(network, build_supervised_loss(config.train.loss))


class Trainer:
    """Runs one training job described by ``config`` in ``run_dir``."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                 task_factory: TaskFactory = default_task, callbacks: Sequence[Any] = (),
                 extra_checkpoint: dict[str, Any] | None = None, clock: PhaseClock | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self._resume_checkpoint: dict | None = None  # last.pt of a resumed run, read once
        self.task_factory = task_factory
        self.callbacks = list(callbacks)
        self.extra_checkpoint = extra_checkpoint or {}
        self.clock = clock or PhaseClock(time.monotonic())  # wall time by phase, from the command's start if given
        tcfg = config.train
        tcfg.precision = resolve_precision(tcfg.precision, tcfg.accelerator)  # the saved config says what ran
        self.fabric = Fabric(accelerator=tcfg.accelerator, devices=tcfg.devices, num_nodes=tcfg.num_nodes,
                             strategy=tcfg.strategy, precision=tcfg.precision)

    # ---------------------------------------------------------------- setup

    def _setup(self) -> None:
        """Check and prepare everything (run folder free, data, model, task), then claim the run folder.

        Every check that can fail comes before the claim, so a bad config or dataset leaves the run
        folder as it was.
        """
        cfg, fabric = self.config, self.fabric
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        distilling = cfg.distill is not None  # only distillation learns from unlabelled images
        if fabric.is_global_zero:
            check_run_dir(self.run_dir, self.resume)
            with self.clock.phase("preprocess"):
                self.data = prepare_training_data(cfg.data, seed=cfg.train.seed, with_unlabeled=distilling,
                                                  progress=cfg.train.progress)
        fabric.barrier()
        if not fabric.is_global_zero:  # the cache is filled now: this only reads it
            self.data = prepare_training_data(cfg.data, seed=cfg.train.seed, check=False, with_unlabeled=distilling)
        fabric.seed_everything(cfg.train.seed, verbose=False)
        with self.clock.phase("task_setup"):  # a distillation task fills the teacher-output cache here
            task = self._task()
        params = [p for p in task.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg.train)
        self.state = {"step": 0, "elapsed_s": 0.0, "best_metric": -math.inf, "best_step": 0, "last_val": []}
        if self.resume:
            self._restore(task, optimizer)
        if fabric.is_global_zero:
            self._claim()
        self.task, self.optimizer = fabric.setup(task, optimizer)
        self.raw_task = task

    def _task(self) -> nn.Module:
        """The task (same initial weights on every rank), built by rank 0 first, so that the other ranks only
        read what it writes on the way (the teacher-output cache)."""
        task = self.task_factory(self._network(), self.data, self.config) if self.fabric.is_global_zero else None
        self.fabric.barrier()
        return task if task is not None else self.task_factory(self._network(), self.data, self.config)

    def _network(self) -> nn.Module:
        """The network to train: a resumed run's is rebuilt from its checkpoint's spec (what a preset resolved
        to then, even if the preset has changed since), a new run's from the config."""
        cfg = self.config
        if self.resume:
            return create_from_spec(self._last_checkpoint()["model_spec"])
        try:
            return create(cfg.model.name, cfg.data.spatial_dims, self.data.dataset.num_channels,
                          self.data.dataset.num_classes, preset=cfg.model.preset, shrink=cfg.model.shrink,
                          deep_supervision=cfg.model.deep_supervision, **cfg.model.kwargs)
        except TypeError as err:  # an unknown or mistyped model.kwargs entry
            raise ConfigError(f"model.kwargs {cfg.model.kwargs} do not fit model {cfg.model.name!r}: {err}") from None

    def _claim(self) -> None:
        """Claim the run folder (rank 0); a fresh run writes its config, a resumed one trims its logs."""
        self.claim = claim_run_dir(self.run_dir, self.resume)
        if self.resume:
            for name in ("train_log.csv", "val_log.csv"):
                dropped = trim_log(self.run_dir / name, self.state["step"])
                if dropped:
                    log.info("%s: dropped %d row(s) after step %d (repeated by the resume)", name, dropped,
                             self.state["step"])
        else:
            save_config(self.config, self.run_dir / "config.yaml")

    def _last_checkpoint(self) -> dict:
        if self._resume_checkpoint is None:
            self._resume_checkpoint = load_checkpoint(self.run_dir / "last.pt")
        return self._resume_checkpoint

    def _restore(self, task: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        ckpt = self._last_checkpoint()
        self._resume_checkpoint = None  # restored: free the copy
        task.network.load_state_dict(ckpt["state_dict"])
        task.extra_modules().load_state_dict(ckpt["extra_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        threads = ckpt.get("num_threads")  # CPU sums split by thread: another count, other last bits
        if threads and threads != torch.get_num_threads() and self.fabric.device.type == "cpu":
            log.warning("%s was trained with %d intra-op threads, this resume has %d: the weights will differ from "
                        "an uninterrupted run's in the last bits (set train.num_threads)", self.run_dir / "last.pt",
                        threads, torch.get_num_threads())
        for key in self.state:
            self.state[key] = ckpt[key]
        log.info("resumed %s at step %d", self.run_dir, self.state["step"])

    # ---------------------------------------------------------------- checkpoints and logs

    def _checkpoint(self, name: str) -> None:
        if not self.fabric.is_global_zero:
            return
        task = self.raw_task
        state = {
            "model_spec": task.network.medkd_spec.to_dict(),
            "state_dict": task.network.state_dict(),
            "extra_state": task.extra_modules().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "num_threads": torch.get_num_threads(),
            "preprocessing": {"plan": self.data.plan.to_dict(), "patch_size": list(self.config.data.patch_size)},
            "labels": dict(self.data.dataset.labels),
            "config": self.config.to_yaml_dict(),
            **self.state,
            **self.extra_checkpoint,
        }
        with self.clock.phase("checkpoints"):
            save_checkpoint(state, self.run_dir / name)
        if name == "last.pt":
            self.checkpointed = True

    def _validate(self, step: int, phase: str = "validation") -> None:
        cfg = self.config
        metric = float("nan")
        if self.fabric.is_global_zero and self.data.val:
            start = time.monotonic()
            dice = validate(self.raw_task.network, self._val_cases(), mode=cfg.data.mode, patch_size=cfg.data.patch_size,
                            num_classes=self.data.dataset.num_classes, device=self.fabric.device,
                            amp=self.fabric.device.type == "cuda", whole_slice=cfg.data.whole_slice_inference,
                            progress=cfg.train.progress)
            self.clock.add(phase, time.monotonic() - start)
            if self.budget is not None:
                self.budget.validated(time.monotonic() - start)
            metric = float(np.nanmean(dice)) if not np.all(np.isnan(dice)) else 0.0
            self.state["last_val"] = [float(d) for d in dice]
            names = self.data.dataset.class_names[1:]
            row = {"step": step, "mean_dice": metric, **{f"dice_{n}": float(d) for n, d in zip(names, dice)}}
            self.val_log.write(row)
            if self.tb:
                for key, value in row.items():
                    if key != "step":
                        self.tb.add_scalar(f"val/{key}", value, step)
        metric = float(self.fabric.broadcast(metric))
        if metric > self.state["best_metric"]:
            self.state["best_metric"], self.state["best_step"] = metric, step
            if not self.checkpointed:  # first: a run with a best.pt can always be resumed
                self._checkpoint("last.pt")
            self._checkpoint("best.pt")

    # ---------------------------------------------------------------- loop

    def _val_cases(self) -> list:
        limit = self.config.train.val_max_cases
        return self.data.val[:limit] if limit else self.data.val

    def _progress(self, elapsed: float, step: int, total_steps: int | None) -> float:
        fractions = [step / total_steps] if total_steps else []
        if self.budget is not None:
            fractions.append(self.budget.fraction(elapsed, step))
        return min(1.0, max(fractions))

    def _should_stop(self, elapsed: float, step: int, total_steps: int | None) -> bool:
        done = step > 0 and self._progress(elapsed, step, total_steps) >= 1.0  # a run trains at least one step
        if self.config.train.max_time_min and self.fabric.world_size > 1:
            done = bool(self.fabric.broadcast(done))
        return done

    def fit(self) -> TrainResult:
        """Set up, claim the run folder, train to the budget and finish (see the module doc).

        A failure before the first ``last.pt`` removes what this run wrote in its folder; SIGTERM or
        SIGINT while training writes ``last.pt`` and raises :class:`TrainingInterrupted`.
        """
        self.fabric.launch()
        self.run_dir = agree_on_run_dir(self.fabric, self.run_dir)
        self.claim: RunClaim | None = None
        self.checkpointed = self.resume  # whether run_dir holds a last.pt to resume from
        self.budget: TimeBudget | None = None
        self.stops = StopSignals()
        try:
            with self.stops:
                self._setup()
                return self._finish(self._loop())
        except TrainingInterrupted as err:
            if err.checkpoint is None and self.checkpointed and self.fabric.is_global_zero:
                raise TrainingInterrupted(err.signum, None, self.run_dir / "last.pt") from None
            raise
        except BaseException:
            if self.claim is not None and not self.checkpointed:
                removed = self.claim.discard()
                log.info("run failed before its first checkpoint: removed %s from %s", removed, self.run_dir)
            raise
        finally:
            if self.claim is not None:
                self.claim.release()

    def _loop(self) -> int:
        """Train from the current step until the budget ends; return the last step."""
        cfg, fabric = self.config, self.fabric
        tcfg = cfg.train
        self.train_log = CSVLog(self.run_dir / "train_log.csv")
        self.val_log = CSVLog(self.run_dir / "val_log.csv")
        self.tb = None
        if fabric.is_global_zero and tcfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.state["step"] or None)
        dataset = PatchDataset(self.data.train, spatial_dims=cfg.data.spatial_dims, patch_size=cfg.data.patch_size,
                               oversample=cfg.data.foreground_oversample, augment=cfg.data.augment,
                               seed=tcfg.seed, soft_targets=getattr(self.raw_task, "soft_targets", None),
                               unlabeled=self.data.unlabeled, unlabeled_ratio=cfg.data.unlabeled_ratio)
        loader = make_train_loader(dataset, cfg.data.batch_size, start_step=self.state["step"],
                                   rank=fabric.global_rank, world_size=fabric.world_size,
                                   num_workers=cfg.data.num_workers)
        loader.worker_init_fn = IgnoreStopSignals(loader.worker_init_fn)  # the main process stops them
        batches = iter(loader)
        total_steps = tcfg.step_budget()
        self.budget = time_budget(cfg, self.data.val, len(self._val_cases()), self.raw_task.network, fabric.device,
                                  self.data.dataset.num_channels, self.clock)  # elapsed: the command's + earlier
        step, started = self.state["step"], self.clock.started - self.state["elapsed_s"]
        bar = self._progress_bar(total_steps, step)
        self.task.train()
        self.stops.deferred = True
        loop_start, validated = time.monotonic(), self.clock.phases.get("validation", 0.0)
        try:
            while not self._should_stop(time.monotonic() - started, step, total_steps):
                lr = tcfg.lr * (1.0 - self._progress(time.monotonic() - started, step, total_steps)) ** tcfg.poly_exponent
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = next(batches)
                batch = {k: v.to(fabric.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if hasattr(self.raw_task, "set_step"):  # step-dependent loss weights (warm-up)
                    self.raw_task.set_step(step)
                terms = self.task(batch)
                self.optimizer.zero_grad(set_to_none=True)
                fabric.backward(terms["loss"])
                if tcfg.grad_clip:
                    fabric.clip_gradients(self.task, self.optimizer, max_norm=tcfg.grad_clip)
                self.optimizer.step()
                step += 1
                self.state["step"], self.state["elapsed_s"] = step, time.monotonic() - started
                self._after_step(step, lr, terms, bar)
                self._stop_if_signalled(step)
        finally:
            self.stops.deferred = False
            # workers ignore SIGTERM: stop them here, or an exit still holding this frame waits on them forever
            getattr(batches, "_shutdown_workers", lambda: None)()
            self.clock.add("train", time.monotonic() - loop_start - self.clock.phases.get("validation", 0.0) + validated)
            if bar is not None:
                bar.close()
            if self.tb:
                self.tb.flush()
        return step

    def _stop_if_signalled(self, step: int) -> None:
        """After a step: on a pending SIGTERM/SIGINT (on any rank), write ``last.pt`` and stop."""
        signum = self.stops.signum or 0
        if self.fabric.world_size > 1:  # every rank stops at the same step
            pending = self.fabric.all_reduce(torch.tensor(float(signum > 0), device=self.fabric.device),
                                             reduce_op="sum")
            signum = signum or (int(signal.SIGTERM) if float(pending) > 0 else 0)
        if not signum:
            return
        if step % self.config.train.checkpoint_every != 0:  # else _after_step has just written it
            self._checkpoint("last.pt")
        raise TrainingInterrupted(signum, step, self.run_dir / "last.pt")

    def _after_step(self, step: int, lr: float, terms: dict[str, torch.Tensor], bar) -> None:
        tcfg, fabric = self.config.train, self.fabric
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"loss became {terms['loss'].item()} at step {step}; last checkpoint kept")
        if step % tcfg.log_every == 0 and fabric.is_global_zero:
            row = {"step": step, "elapsed_s": round(self.state["elapsed_s"], 2), "lr": lr,
                   **{k: float(v.detach()) for k, v in terms.items()}}
            self.train_log.write(row)
            if self.tb:
                for key, value in row.items():
                    if key != "step":
                        self.tb.add_scalar(f"train/{key}", value, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}", refresh=False)
        if step % tcfg.val_every == 0:
            self._validate(step)
        if step % tcfg.checkpoint_every == 0:
            self._checkpoint("last.pt")
        for callback in self.callbacks:
            if hasattr(callback, "on_step_end"):
                callback.on_step_end(self, step, terms)

    def _progress_bar(self, total_steps: int | None, step: int):
        if self.config.train.progress and self.fabric.is_global_zero:
            return progress_bar(total_steps, step, f"train {self.run_dir.name}")

    def _finish(self, step: int) -> TrainResult:
        digests = weight_digests(self.fabric, [self.raw_task.network, self.raw_task.extra_modules()])
        if step % self.config.train.val_every != 0 or not self.state["last_val"]:
            self._validate(step, "final_validation")
        self._checkpoint("last.pt")
        if self.fabric.is_global_zero and not (self.run_dir / "best.pt").exists():
            self._checkpoint("best.pt")
        result = TrainResult(self.run_dir, step, self.state["elapsed_s"], self.state["best_metric"],
                             self.state["best_step"], self.state["last_val"], self.fabric.global_rank)
        if self.fabric.is_global_zero:
            summary = {**{k: v for k, v in result.__dict__.items() if k != "global_rank"},
                       "run_dir": str(self.run_dir), "class_names": self.data.dataset.class_names[1:],
                       "world_size": self.fabric.world_size, "ranks_in_sync": len(set(digests)) == 1, "rank_weight_sha256": digests}
            with self.clock.phase("postprocess"):
                decide_run_postprocessing(self.run_dir / "best.pt", self.data.val, device=self.fabric.device,
                                          progress=self.config.train.progress)
            summary.update(max_time_min=self.config.train.max_time_min, phases_s=self.clock.report())
            atomic_write_text(self.run_dir / "result.json", json.dumps(summary, indent=1))
        return result


def train(config: RunConfig | None, run_dir: str | Path, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Train (or, with ``config.distill``, distil) in ``run_dir``; a resumed run reads its config there
    unless ``config`` is given (its stored config placed on another device, :mod:`medkd.workflows.study_slots`)."""
    if resume:
        from medkd.config import load_config

        check_run_dir(Path(run_dir), resume=True)  # refuse early a run that could not be claimed
        config = config if config is not None else load_config(Path(run_dir) / "config.yaml")
    if config.distill is not None and "task_factory" not in kwargs:
        from medkd.engine.distill import distill_task_factory

        kwargs["task_factory"] = distill_task_factory(config)
    return Trainer(config, run_dir, resume=resume, **kwargs).fit()
