"""Multi-process training, proven: ``medkd train`` and ``medkd distill`` on 2 CPU processes (gloo) through
Fabric's own launcher (``--devices 2 --strategy ddp``).

Checked: the run completes; only rank 0 writes (the run folder holds exactly one run's files, each log
row once, and no other folder appears, even with a default run name); the ranks end with bit-identical
weights (``result.json`` holds a SHA-256 of each rank's parameters); a 2-process run stopped by its
budget and resumed equals an uninterrupted one bit for bit; and it matches a 1-process run with the
same global batch within the tolerance explained in :func:`test_ddp_train_resume_and_single_process`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medkd.config import build_config, load_config
from medkd.engine.trainer import train
from medkd.models import create_from_spec
from medkd.storage import load_checkpoint

pytestmark = pytest.mark.slow

RUN_FILES = {".medkd.lock", "config.yaml", "last.pt", "best.pt", "train_log.csv", "val_log.csv", "result.json",
             "postprocessing.json"}
COMMON = ["--accelerator", "cpu", "--num-workers", "0", "--set", "train.progress=false",
          "--set", "train.tensorboard=false", "--set", "train.num_threads=1", "--set", "train.log_every=1",
          "--set", "train.val_every=1000", "--set", "train.checkpoint_every=1"]


def medkd(args: list[str], cwd: Path, torchrun: bool = False) -> str:
    """Run the ``medkd`` command and return its output (checked). Fabric starts the second process itself,
    or, with ``torchrun``, joins the two that ``torchrun --nproc-per-node 2`` starts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", "localhost:0"] if torchrun else []
    proc = subprocess.run([sys.executable, *launch, "-m", "medkd", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def logged_steps(run: Path) -> list[int]:
    with open(run / "train_log.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def assert_rank_zero_run(run: Path, steps: int) -> dict:
    """One run's files, each log row once, ranks in sync; returns ``result.json``."""
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert logged_steps(run) == list(range(1, steps + 1))
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == steps
    digests = result["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1] and result["ranks_in_sync"] is True
    return result


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def outputs(checkpoint: Path) -> torch.Tensor:
    """The logits of ``checkpoint``'s network on a fixed random input."""
    state = load_checkpoint(checkpoint)
    network = create_from_spec(state["model_spec"])
    network.load_state_dict(state["state_dict"])
    with torch.no_grad():
        return network.eval()(torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_ddp_train_resume_and_single_process(phantoms_2d, tmp_path):
    """2 processes: Fabric's launcher under a default run name, and torchrun then a resume, bit-identical.

    Tolerance of 2 processes x batch 2 against 1 process x batch 4: both see exactly the same samples
    at every step (step ``s`` of rank ``r`` takes samples ``(2s + r) * 2 ...``, the single process
    ``4s ...``, see :mod:`medkd.data.loaders`), and every loss term is a mean of per-image terms, so the
    averaged DDP gradient is the full-batch gradient in exact arithmetic. In floats the sums run in
    another order (per rank, then gloo's all-reduce), so the last bits differ: every weight tensor
    (2+ dims) and the network's output agree to a relative L2 of ~1e-6 after 4 steps (measured 1.3e-6
    and 7e-7); the test allows 1e-5. Biases are left out: those feeding an instance norm have a zero
    gradient in exact arithmetic, so AdamW (``g / sqrt(v)``) turns their rounding noise into steps of
    about ``lr`` (relative L2 up to 2e-2), which the norm then cancels; the output check covers them.
    Sampling other data or skipping the gradient average moves the weights by ~1e-2.
    """
    data = ["--dataset", str(phantoms_2d), "--preset", "student", "--patch-size", "64,64",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.poly_exponent=0"]
    ddp = [*data, *COMMON, "--devices", "2", "--strategy", "ddp", "--batch-size", "2"]
    # uninterrupted, under a default run name: rank 1 must neither make nor name a folder of its own
    (tmp_path / "work").mkdir()
    out = medkd(["train", *ddp, "--max-steps", "4"], cwd=tmp_path / "work")
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 1 and out.count("done:") == 1 and str(runs[0].name) in out
    assert_rank_zero_run(runs[0], 4)
    # torchrun starts both ranks, stopped by its budget after 2 steps (a constant lr makes that a plain
    # cut), then resumed to 4 steps by Fabric's launcher: bit-identical to the uninterrupted run
    cut = tmp_path / "cut"
    medkd(["train", *ddp, "--max-steps", "2", "--run-dir", str(cut)], cwd=tmp_path, torchrun=True)
    (cut / "config.yaml").write_text((cut / "config.yaml").read_text().replace("max_steps: 2", "max_steps: 4"))
    medkd(["train", "--run-dir", str(cut), "--resume"], cwd=tmp_path)
    assert_rank_zero_run(cut, 4)
    full, resumed = load_checkpoint(runs[0] / "last.pt"), load_checkpoint(cut / "last.pt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # one process, the same global batch, everything else as the DDP run
    cfg = load_config(runs[0] / "config.yaml")
    cfg.train.devices, cfg.train.strategy, cfg.data.batch_size = 1, "auto", 4
    single = load_checkpoint(train(cfg, tmp_path / "single").run_dir / "last.pt")
    for key, value in full["state_dict"].items():
        if value.ndim >= 2:
            assert relative_l2(value, single["state_dict"][key]) < 1e-5, key
    assert relative_l2(outputs(runs[0] / "last.pt"), outputs(tmp_path / "single" / "last.pt")) < 1e-5


def test_ddp_distill_live_teacher_with_adapters(phantoms_2d, tmp_path, tiny_config):
    """``medkd distill`` with reco-kd (live teacher, feature adapters optimised beside the student) on 2 ranks."""
    tree = tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2)
    tree["model"] = {"name": "unet", "preset": "teacher", "shrink": 2}  # wider than the student: adapters
    train(build_config(tree), tmp_path / "teacher")
    run = tmp_path / "student"
    medkd(["distill", "--teacher", str(tmp_path / "teacher" / "best.pt"), "--recipe", "reco-kd", "--max-steps", "3",
           *COMMON, "--devices", "2", "--strategy", "ddp", "--run-dir", str(run)], cwd=tmp_path)
    assert_rank_zero_run(run, 3)
    assert {p.name for p in tmp_path.iterdir()} == {"cache", "teacher", "student"}
    assert load_checkpoint(run / "last.pt")["extra_state"]  # adapters: in the weight digest, in sync
