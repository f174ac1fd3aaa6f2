"""``medkd experiment --devices``: runs spread over slots (each run its own process) give the serial order's
tables, both slots are used, teachers finish before their students, and a study killed mid-way resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from medkd.config import ConfigError
from medkd.workflows.experiment import run_study
from medkd.workflows.study_slots import Slot, parse_devices
from tests.study_files import tiny_study_file

REPO = Path(__file__).resolve().parents[2]
#: columns that measure the machine, not the method (time, latency), and so differ between two calls
TIMING = {"train_s", "step_s", "step_time_rel", "latency_ms"}
#: student steps: enough that a student cannot finish between its first last.pt and the signal (12 could, in CI)
STEPS = 100


def _study_file(tmp_path: Path, dataset: Path) -> Path:
    return tiny_study_file(tmp_path, dataset, recipes=["logit-kd"], seeds=[0], steps=STEPS, checkpoint_every=2)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _experiment(study: Path, out: Path, devices: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medkd", "experiment", str(study), "--out", str(out),
                             "--devices", devices], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_devices_spec_is_checked_before_anything_runs(phantoms_2d, tmp_path):
    core = min(os.sched_getaffinity(0))
    assert parse_devices(f"cpu:{core},cpu:{core}") == [Slot(f"cpu:{core}", "cpu", cores=(core,))] * 2
    assert Slot("cpu:0-1", "cpu", cores=(0, 1)).train_keys() == {"accelerator": "cpu", "devices": 1, "num_threads": 2}
    assert Slot("cuda:1", "cuda", gpu=1).train_keys() == {"accelerator": "cuda", "devices": [1]}
    cases = {f"cpu:{os.cpu_count() + 7}": "not available", "cuda:99": "no such GPU", "gpu:0": "is not cuda:<i>",
             "cpu:0,": "comma-separated", "cpu:3-1": "before the first", "cpu:0,cuda:0": "mixes cpu and cuda"}
    study = _study_file(tmp_path, phantoms_2d)
    for spec, needle in cases.items():
        with pytest.raises(ConfigError, match=needle) as err:
            run_study(study, tmp_path / "out", devices=spec)
        assert "--devices" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_runs_spread_over_two_slots_match_the_serial_order_and_resume_after_a_kill(phantoms_2d, tmp_path):
    core = min(os.sched_getaffinity(0))
    devices = f"cpu:{core},cpu:{core}" if len(os.sched_getaffinity(0)) < 2 else "cpu:{},cpu:{}".format(
        *sorted(os.sched_getaffinity(0))[:2])
    study = _study_file(tmp_path, phantoms_2d)
    serial = run_study(study, tmp_path / "serial", console=Console(width=200, record=True))

    # first call: SIGTERM while both slots train (teacher and labels-only student), one with a last.pt
    out = tmp_path / "slots"
    first = _experiment(study, out, devices)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        rows = _rows(out / "schedule.csv") if (out / "schedule.csv").is_file() else []
        busy = [r["run"] for r in rows if r["outcome"] == "running"]
        # a student's last.pt: the teacher (4 steps) may finish before the signal lands, a student has STEPS
        if len(busy) == 2 and any((out / "runs" / run / "last.pt").is_file() for run in busy if run.startswith("tiny")):
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 143 and "study stopped by SIGTERM" in output, output
    assert [r for r in _rows(out / "schedule.csv") if r["outcome"] == "stopped"], output
    assert not (out / "summary.csv").exists()

    # second call resumes: stopped runs continue (from last.pt where they had one), finished ones are left alone
    second = _experiment(study, out, devices)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    schedule = _rows(out / "schedule.csv")
    done = [r for r in schedule if r["outcome"] == "done"]
    assert sorted(r["run"] for r in done) == sorted(r["run"] for r in _rows(serial / "runs.csv"))  # each once
    assert {r["slot_no"] for r in schedule} == {"1", "2"} and {r["slot"] for r in schedule} == set(devices.split(","))
    assert len({r["pid"] for r in schedule}) == len(schedule)  # one process per hand-out
    teacher_end = next(r["ended"] for r in done if r["run"] == "teacher__cases4")
    assert all(r["started"] >= teacher_end for r in schedule if "logit-kd" in r["run"])  # students wait
    assert any(r["status"] == "resume" for r in done), schedule
    overlapping = [(a, b) for a in schedule for b in schedule if a["slot_no"] < b["slot_no"]
                   and a["started"] <= b["ended"] and b["started"] <= a["ended"]]
    assert overlapping, schedule  # the two slots trained at the same time
    waited = f"tiny__logit-kd__steps{STEPS}__cases4__seed0" not in {r["run"] for r in schedule[:2]}
    assert waited  # for its teacher
    for row in done:  # each run's log names its slot and process
        assert f"in slot {row['slot']} (pid {row['pid']})" in (out / "logs" / f"{row['run']}.log").read_text()

    # the tables equal the serial order's, apart from the columns that time the machine
    for name in ("results.csv", "summary.csv"):
        assert _without_timing(_rows(out / name)) == _without_timing(_rows(serial / name)), name
    assert _without_timing(_rows(out / "runs.csv")) == _without_timing(_rows(serial / "runs.csv"))
    config = yaml.safe_load((out / "runs" / f"tiny__logit-kd__steps{STEPS}__cases4__seed0" / "config.yaml").read_text())
    assert config["train"]["accelerator"] == "cpu" and config["train"]["num_threads"] == 1


@pytest.mark.slow
def test_a_run_failing_in_its_slot_stops_the_study_naming_the_run_and_its_log(phantoms_2d, tmp_path):
    from medkd.workflows.study_scheduler import SlotRunFailed

    tree = yaml.safe_load(_study_file(tmp_path, phantoms_2d).read_text())
    (tmp_path / "teacher.pt").write_bytes(b"not a checkpoint")
    tree.update(teacher={"path": str(tmp_path / "teacher.pt")})
    study = tmp_path / "broken.yaml"
    study.write_text(yaml.safe_dump(tree))
    core = min(os.sched_getaffinity(0))
    with pytest.raises(SlotRunFailed, match="teacher__given failed in slot") as err:
        run_study(study, tmp_path / "out", devices=f"cpu:{core}", console=Console(width=200, record=True))
    log = tmp_path / "out" / "logs" / "teacher__given.log"
    assert str(log) in str(err.value) and "Traceback" in log.read_text() and "teacher.pt" in log.read_text()
    schedule = _rows(tmp_path / "out" / "schedule.csv")
    assert [(r["run"], r["outcome"]) for r in schedule] == [("teacher__given", "failed")]
