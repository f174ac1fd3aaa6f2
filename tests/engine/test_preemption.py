"""SIGTERM / SIGINT while training: a checkpoint, a clean exit code, and a resume without repeated log rows."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import build_config
from medkd.engine.preemption import TrainingInterrupted
from medkd.engine.trainer import Trainer, train
from medkd.storage import load_checkpoint


def _steps(path):
    with open(path, newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


class SignalAt:
    """Sends ``signum`` to this process right after step ``step`` (as a cluster's scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, terms):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(phantoms_2d, tmp_path, tiny_config,
                                                                              signum):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=6, checkpoint_every=100, val_every=2))
    train(cfg, tmp_path / "full")
    handler = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(cfg, tmp_path / "cut", callbacks=[SignalAt(3, signum)]).fit()
    assert stopped.value.exit_code == 128 + signum and stopped.value.step == 3
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3  # no periodic checkpoint before 100
    assert signal.getsignal(signum) == handler  # the previous handler is back
    train(None, tmp_path / "cut", resume=True)
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][key]), key
    for name in ("train_log.csv", "val_log.csv"):
        assert _steps(tmp_path / "cut" / name) == _steps(tmp_path / "full" / name), name


def test_a_stop_shuts_the_loader_workers_down_at_once(phantoms_2d, tmp_path, tiny_config):
    """Loader workers ignore SIGTERM (the main process stops them), so the trainer must stop them itself: an
    uncaught TrainingInterrupted keeps the loader alive in its traceback, and at interpreter exit
    multiprocessing would then wait forever on workers that ignore its terminate()."""
    import multiprocessing

    tree = tiny_config(phantoms_2d, tmp_path / "cache", max_steps=50, checkpoint_every=100)
    tree["data"]["num_workers"] = 1
    before = set(multiprocessing.active_children())
    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(build_config(tree), tmp_path / "cut", callbacks=[SignalAt(3)]).fit()
    assert stopped.value.__traceback__ is not None  # the loop's frame, and with it the loader, is still referenced
    assert set(multiprocessing.active_children()) - before == set()


def test_resume_after_kill_drops_the_log_rows_it_repeats(phantoms_2d, tmp_path, tiny_config, interrupt_at):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=6, checkpoint_every=2, val_every=1))
    with pytest.raises(KeyboardInterrupt):  # a hard stop after step 3: last.pt is at step 2
        Trainer(cfg, tmp_path / "cut", callbacks=[interrupt_at(3)]).fit()
    assert _steps(tmp_path / "cut" / "val_log.csv") == [1, 2, 3]
    train(None, tmp_path / "cut", resume=True)
    assert _steps(tmp_path / "cut" / "train_log.csv") == [1, 2, 3, 4, 5, 6]
    assert _steps(tmp_path / "cut" / "val_log.csv") == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_to_a_cli_run_with_loader_workers_then_resume(phantoms_2d, tmp_path):
    """``medkd train`` in its own process group (loader workers too) gets SIGTERM as on a SLURM pre-emption."""
    run, steps = tmp_path / "run", 400
    cmd = [sys.executable, "-m", "medkd", "train", "--dataset", str(phantoms_2d), "--preset", "student",
           "--patch-size", "64,64", "--batch-size", "2", "--max-steps", str(steps), "--num-workers", "1",
           "--run-dir", str(run), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false",
           "--set", "train.tensorboard=false", "--set", "train.log_every=1", "--set", "train.val_every=1000",
           "--set", "train.checkpoint_every=1000", "--set", "train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "train_log.csv").is_file() and len(_steps(run / "train_log.csv")) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err.strip().splitlines()[-1]
    step = load_checkpoint(run / "last.pt")["step"]
    assert 3 <= step < steps and _steps(run / "train_log.csv") == list(range(1, step + 1))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(f"max_steps: {steps}",
                                                                                f"max_steps: {step + 2}"))
    result = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert _steps(run / "train_log.csv") == list(range(1, step + 3))


def test_a_signal_while_loading_a_checkpoint_after_the_loop_stops_the_run_and_resume_finishes_it(
        phantoms_2d, tmp_path, tiny_config, monkeypatch):
    """After the loop the signal raises at once, wherever the process is; inside ``load_checkpoint`` (which
    turns any ``Exception`` into a CheckpointError) it must still read as a stop, not as a failed run."""
    import medkd.engine.trainer as trainer_module

    real_decide, real_load = trainer_module.decide_run_postprocessing, torch.load

    def load_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside load_checkpoint's try
        return real_load(*args, **kwargs)

    def decide_while_signalled(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "load", load_with_a_signal)
            return real_decide(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "decide_run_postprocessing", decide_while_signalled)
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=4, checkpoint_every=2, val_every=2))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, tmp_path / "run")
    assert stopped.value.exit_code == 143 and stopped.value.checkpoint == tmp_path / "run" / "last.pt"
    assert not (tmp_path / "run" / "result.json").exists()
    monkeypatch.setattr(trainer_module, "decide_run_postprocessing", real_decide)
    assert train(None, tmp_path / "run", resume=True).steps == 4
    assert (tmp_path / "run" / "result.json").is_file()
