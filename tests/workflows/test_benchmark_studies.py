"""The ACDC benchmark study files (studies/acdc-2d-*.yaml) load, and ``--dry-run`` lists their runs.

Needs the ACDC data in ../shared/data/ACDC (skipped when it is not there). The studies themselves take
hours of CPU and are not run here; the distillation study's teacher (a run of
benchmarks/acdc_2d_teacher_ablation.py) is replaced by a stand-in file, since a dry run of cached
recipes never loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from medkd.workflows.experiment import plan_runs, run_study
from medkd.workflows.study import load_study

REPO = Path(__file__).resolve().parents[2]
ACDC = REPO.parent / "shared" / "data" / "ACDC"
pytestmark = [pytest.mark.acdc, pytest.mark.skipif(not (ACDC / "dataset.json").is_file(),
                                                   reason=f"ACDC dataset not found at {ACDC}")]

#: study file -> (runs, teacher runs, (student, method) pairs expected among them)
EXPECTED = {
    "acdc-2d-few-labels.yaml": (1 + 2 * 3 * 4, 1, {"labels-only", "balanced-kd", "pseudo-kd", "logit-kd"}),
    "acdc-2d-distill.yaml": (1 + 1 * 3 * 3, 1, {"labels-only", "balanced-kd", "logit-kd"}),
}


def _local_copy(name: str, tmp_path: Path) -> Path:
    """The study file with absolute paths (its dataset; a stand-in for a given teacher that is not there)."""
    source = REPO / "studies" / name
    tree = yaml.safe_load(source.read_text())
    tree["dataset"] = str((source.parent / tree["dataset"]).resolve())
    if "path" in tree["teacher"]:
        teacher = (source.parent / tree["teacher"]["path"]).resolve()
        if not teacher.exists():
            teacher = tmp_path / "teacher" / "best.pt"
            teacher.parent.mkdir()
            teacher.write_bytes(b"stand-in: a dry run of cached recipes does not load the teacher")
        tree["teacher"]["path"] = str(teacher)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_study_loads_and_dry_run_lists_its_runs(name, tmp_path):
    total, teachers, methods = EXPECTED[name]
    assert (REPO / "studies" / name).read_text().startswith("# Replaces benchmarks/")
    path = _local_copy(name, tmp_path)
    study = load_study(path)
    runs = plan_runs(study, tmp_path / "out", source=str(path))
    assert len(runs) == total and sum(r.role == "teacher" for r in runs) == teachers
    assert {r.method for r in runs if r.role == "student"} == methods
    students = [r for r in runs if r.role == "student"]
    assert all(r.tree["model"]["shrink"] == 4 and r.tree["data"]["patch_size"] == [128, 128]
               and r.tree["data"]["batch_size"] == 16 for r in students)
    teacher = next(r for r in runs if r.role == "teacher")
    if teacher.trained_here:  # few labels: the teacher's own batch, on the labelled patients only
        assert teacher.tree["data"]["batch_size"] == 8 and teacher.tree["data"]["labeled_fraction"] == 0.1
        assert teacher.tree["data"]["group_regex"] == r"^(patient\d+)" and teacher.tree["train"]["val_every"] == 250
    console = Console(width=200, record=True)
    run_study(path, tmp_path / "out", dry_run=True, console=console)
    text = console.export_text()
    assert f"{total} runs" in text and f"{total if study.teacher.path is None else total - 1} run(s) to train" in text
    assert not (tmp_path / "out").exists()
