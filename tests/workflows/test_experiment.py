"""A tiny study on phantoms runs end to end, is killed part-way (between runs and inside one) and resumes
without repeating finished work; its CSVs hold every run, case and class."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from rich.console import Console

from medkd.workflows.experiment import run_study
from medkd.workflows.study_plots import pareto_front
from medkd.workflows.study_report import write_report
from tests.study_files import tiny_study_file

RECIPES = ("logit-kd", "balanced-kd")


def _study_file(tmp_path, dataset) -> str:
    return str(tiny_study_file(tmp_path, dataset, recipes=RECIPES, seeds=[0, 1], steps=4, checkpoint_every=3))


class Recorder:
    """Trainer callback: the steps each run trains in this call; raises KeyboardInterrupt after ``stop_at``."""

    def __init__(self, seen: dict, run_id: str, stop_at: int | None = None):
        self.seen, self.run_id, self.stop_at = seen, run_id, stop_at

    def on_step_end(self, trainer, step, terms):
        self.seen.setdefault(self.run_id, []).append(step)
        if step == self.stop_at:
            raise KeyboardInterrupt  # a killed run: last.pt was written at step 3 (checkpoint_every)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_study_runs_is_killed_and_resumes_without_repeating_work(phantoms_2d, tmp_path, monkeypatch):
    study, out = _study_file(tmp_path, phantoms_2d), tmp_path / "out"
    console = Console(width=200, record=True)
    run_study(study, out, dry_run=True, console=console)
    assert "7 run(s) to train" in console.export_text() and not out.exists()

    # first attempt: killed inside the 4th run (teacher, labels-only, logit-kd of seed 0 are finished)
    seen: dict[str, list[int]] = {}
    order: list[str] = []

    def killing(run):
        order.append(run.run_id)
        return [Recorder(seen, run.run_id, stop_at=3 if len(order) == 4 else None)]

    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, console=console, callbacks=killing)
    finished = order[:3]
    killed = order[3]
    assert killed == "tiny__balanced-kd__steps4__cases4__seed0"
    stamps = {r: (out / "runs" / r / "result.json").stat().st_mtime_ns for r in finished}
    assert (out / "runs" / killed / "last.pt").is_file() and not (out / "runs" / killed / "result.json").exists()

    # restart: finished runs are neither trained nor evaluated again; the killed one resumes after step 3
    seen.clear()
    evaluated = []
    run_study(study, out, console=console, callbacks=lambda run: [Recorder(seen, run.run_id)],
              after_run=lambda run: evaluated.append(run.run_id))
    assert not set(finished) & set(seen) and not set(finished) & set(evaluated)
    assert seen[killed] == [4] and all(steps == [1, 2, 3, 4] for r, steps in seen.items() if r != killed)
    assert len(evaluated) == 4
    assert stamps == {r: (out / "runs" / r / "result.json").stat().st_mtime_ns for r in finished}

    runs = _rows(out / "runs.csv")
    assert len(runs) == 7 and {r["method"] for r in runs} == {"teacher", "labels-only", *RECIPES}
    assert all(int(r["steps"]) == 4 and float(r["latency_ms"]) > 0 and int(r["macs"]) > 0 for r in runs)
    results = _rows(out / "results.csv")
    assert len(results) == 7 * 2 * 4  # runs x test cases x classes
    assert {"dice", "hd95", "asd"} <= set(results[0])
    summary = {r["method"]: r for r in _rows(out / "summary.csv")}
    assert set(summary) == {"teacher", "labels-only", *RECIPES}
    for recipe in RECIPES:
        row = summary[recipe]
        assert row["seeds"] == "2" and row["n_cases"] == "2" and row["p_holm"] and row["view"] == "equal steps"
        assert float(row["delta_ci_low"]) <= float(row["delta"]) <= float(row["delta_ci_high"])
    killed_config = yaml.safe_load((out / "runs" / killed / "config.yaml").read_text())
    assert killed_config["data"]["labeled_cases"] == 4 and killed_config["distill"]["recipe"]["name"] == "balanced-kd"

    # a third call repeats nothing and the dry run says so
    seen.clear()
    run_study(study, out, console=console, callbacks=lambda run: [Recorder(seen, run.run_id)])
    assert seen == {}
    console = Console(width=200, record=True)
    run_study(study, out, dry_run=True, console=console)
    assert "0 run(s) to train" in console.export_text()
    assert json.loads((out / "eval" / killed / "run.json").read_text())["steps"] == 4

    # the report holds every figure (embedded) and every summary row, and needs no network
    written = write_report(out)
    html = (out / "report.html").read_text()
    figures = ("dice_boxes", "dice_vs_latency", "curves_0", "overlays")
    assert html.count('src="data:image/png;base64,') == len(figures)
    assert "http://" not in html and "https://" not in html
    assert all(f'alt="{name}"' in html for name in figures) and html.count("<tr>") == 1 + len(summary)
    markdown = (out / "report.md").read_text()
    assert all(f"(report/{name}.png)" in markdown and (out / "report" / f"{name}.png").stat().st_size > 1000
               for name in figures)
    assert "| balanced-kd |" in markdown and out / "report.html" in written

    # the committable copy: small files only, and the README block holds report.md's table
    from medkd.workflows.study_readme import readme_block, save_results

    saved = save_results(out, tmp_path / "saved")
    assert {p.name for p in saved} >= {"summary.csv", "runs.csv", "study.yaml", "report.md", "provenance.json"}
    assert all(p.stat().st_size <= 200_000 and p.suffix != ".pt" for p in saved)
    block = readme_block(tmp_path / "saved", "medkd report saved --readme README.md --block tiny")
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert [line for line in block.splitlines() if line.startswith("|")] == table
    assert block.startswith("*Generated by `medkd report saved") and "seeds 0, 1; budgets: 4 steps" in block
    assert "dataset: /" in (tmp_path / "saved" / "study.yaml").read_text()  # no study file beside out/: resolved copy
    (tmp_path / "out.yaml").write_text(open(study).read())  # as `medkd experiment out.yaml` names its folder
    save_results(out, tmp_path / "again")  # the study file as written (relative paths), not the resolved copy
    assert (tmp_path / "again" / "study.yaml").read_text() == (tmp_path / "out.yaml").read_text()
    import medkd.workflows.study_readme as study_readme

    monkeypatch.setattr(study_readme, "MAX_FIGURE_BYTES", 1)  # every figure too large: left out, no dangling link
    save_results(out, tmp_path / "small")
    small = (tmp_path / "small" / "report.md").read_text()
    assert "![" not in small and "report/overlays.png" in small and "left out of the saved results" in small
    assert not (tmp_path / "small" / "report").exists()


@pytest.mark.slow
def test_study_with_a_given_teacher_and_a_time_budget(phantoms_2d, tmp_path):
    """An existing run as the teacher (its folder), a wall-clock budget: the equal-time view."""
    from medkd.config import build_config
    from medkd.engine.trainer import train

    tree = yaml.safe_load(open(_study_file(tmp_path, phantoms_2d)))
    teacher = {"data": {**tree["data"], "dataset": str(phantoms_2d), "cache_dir": str(tmp_path / "cache")},
               "model": {"name": "unet", "preset": "student", "shrink": 3}, "train": {**tree["train"], "max_steps": 3}}
    train(build_config(teacher), tmp_path / "teacher")
    tree.update(teacher={"path": "teacher"}, recipes=["logit-kd"], seeds=[0], budgets=[{"minutes": 0.01}])
    (tmp_path / "given.yaml").write_text(yaml.safe_dump(tree))
    out = run_study(tmp_path / "given.yaml", console=Console(width=200, record=True))
    assert out == tmp_path / "given"
    summary = {r["method"]: r for r in _rows(out / "summary.csv")}
    assert summary["teacher"]["labels"] == "given" and summary["logit-kd"]["view"] == "equal time"
    assert float(summary["logit-kd"]["steps"]) >= 1 and summary["logit-kd"]["gap_closed"] != ""
    distill = yaml.safe_load((out / "runs" / "tiny__logit-kd__min0.01__cases4__seed0" / "config.yaml").read_text())
    assert distill["distill"]["teacher"] == str(tmp_path / "teacher" / "best.pt")
    assert distill["train"]["max_time_min"] == 0.01 and distill["train"]["max_steps"] is None


def test_pareto_front_by_hand():
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (0.5, 0.4), (2.0, 0.65)]  # (latency, dice)
    assert pareto_front(points) == [3, 0, 1]  # 3.0/0.6 is slower and worse than 2.0/0.7; 2.0/0.65 is beaten
