"""Teacher sets: plans (pure) and training with per-member resume."""

from __future__ import annotations

import json

import pytest
import yaml

import medkd.workflows.train_teachers as tt
from medkd.config import build_config
from medkd.engine.ensemble import EnsemblePredictor
from medkd.engine.trainer import RunDirError
from medkd.engine.validation import decide_set_postprocessing
from medkd.teachers.manifest import load_manifest, open_teachers
from medkd.workflows.teacher_plan import (
    TeacherPlan,
    TeacherPlanError,
    fold_training_cases,
    make_plan,
    partition_cases,
    plan_differences,
    plan_members,
)
from medkd.workflows.train_teachers import train_teacher_set

IDS = [f"case_{i:03d}" for i in range(11)]


def _base(seed: int = 3, **train):
    return build_config({"train": {"max_steps": 2, "seed": seed, **train}})


def test_uniform_members_differ_by_seed_only():
    plan = plan_members("uniform", _base(), members=3, models=["segresnet"])
    assert [m.name for m in plan] == ["segresnet_seed3", "segresnet_seed4", "segresnet_seed5"]
    assert [m.overrides["train.seed"] for m in plan] == [3, 4, 5]
    assert {m.overrides["model.name"] for m in plan} == {"segresnet"}
    assert plan == plan_members("uniform", _base(), members=3, models=["segresnet"])  # deterministic
    assert [m.name for m in plan_members("multitask", _base(), members=2)] == ["unet_mt_seed3", "unet_mt_seed4"]


def test_diverse_is_the_models_by_losses_grid():
    plan = plan_members("diverse", _base())
    assert len(plan) == 6 and len({(m.overrides["model.name"], m.overrides["train.loss"]) for m in plan}) == 6
    assert [m.name for m in plan_members("diverse", _base(), models=["unet", "dynunet"], losses=["dice"])] == \
        ["unet_dice", "dynunet_dice"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"kind": "bagging"}, "unknown teacher-set kind 'bagging'"),
    ({"kind": "diverse", "models": ["unet", "transformer9"]}, "unknown model name.*transformer9"),
    ({"kind": "diverse", "losses": ["hinge"]}, "unknown loss name.*hinge.*dice_ce"),
    ({"kind": "diverse", "members": 4}, "--members applies to"),
    ({"kind": "uniform", "models": ["unet", "segresnet"]}, "one model for all members"),
    ({"kind": "uniform", "subsets": 2}, "--subsets and --group-by apply to --kind subset"),
    ({"kind": "subset", "train_cases": IDS, "subsets": 1}, "at least 2 subsets"),
    ({"kind": "subset", "train_cases": IDS[:2], "subsets": 3}, "3 disjoint subsets from 2 training cases"),
])
def test_bad_options_are_explained(kwargs, needle):
    kind = kwargs.pop("kind")
    with pytest.raises(TeacherPlanError, match=needle):
        plan_members(kind, _base(), **kwargs)


def test_random_subsets_are_disjoint_balanced_and_cover_the_cases():
    plan = plan_members("subset", _base(), subsets=3, train_cases=IDS)
    parts = [m.cases for m in plan]
    assert sorted(c for p in parts for c in p) == IDS
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert all(m.overrides["data.cases"] == m.cases and m.overrides["data.data_fraction"] == 1.0 for m in plan)
    assert parts != [m.cases for m in plan_members("subset", _base(seed=4), subsets=3, train_cases=IDS)]


def test_group_by_site_keeps_each_site_in_one_subset(phantoms_2d):
    cases, metadata = fold_training_cases(build_config({"data": {"dataset": str(phantoms_2d)}}))
    plan = plan_members("subset", _base(), subsets=2, group_by="site", train_cases=cases, case_metadata=metadata)
    assert sorted(c for m in plan for c in m.cases) == cases
    for member in plan:
        assert sorted({metadata[c]["site"] for c in member.cases}) == member.groups
    assert not set(plan[0].groups) & set(plan[1].groups)
    with pytest.raises(TeacherPlanError, match="4 disjoint subsets from 3 groups of 'site'"):
        partition_cases(cases, 4, 0, "site", metadata)
    with pytest.raises(TeacherPlanError, match="no metadata key 'scanner'.*keys in case_metadata.json: site"):
        partition_cases(cases, 2, 0, "scanner", metadata)


def test_plan_round_trips_and_differences_name_the_key():
    plan = make_plan("uniform", _base(), members=2)
    assert TeacherPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    other = make_plan("uniform", _base(max_steps=5), members=2)
    assert plan_differences(plan.to_dict(), other.to_dict()) == ["base_config.train.max_steps: 2 -> 5"]
    diverse = make_plan("diverse", _base(), models=["unet"])
    changed = make_plan("diverse", _base(), models=["unet"], losses=["dice_ce", "dice"])
    assert plan_differences(diverse.to_dict(), changed.to_dict()) == [
        'members (names): ["unet_dice_ce", "unet_ce"] -> ["unet_dice_ce", "unet_dice"]']


# ----------------------------------------------------------------------------- training


@pytest.fixture
def recorded_train(monkeypatch, interrupt_at):
    """Wraps the trainer: records (member, resume) and kills the second member after step 3 once."""
    calls, killed, real = [], [], tt.train

    def fake(config, run_dir, resume=False, **kwargs):
        calls.append((run_dir.name, resume))
        if run_dir.name.endswith("seed4") and not killed:
            killed.append(run_dir.name)
            kwargs["callbacks"] = [interrupt_at(3)]
        return real(config, run_dir, resume=resume, **kwargs)

    monkeypatch.setattr(tt, "train", fake)
    return calls


def test_killed_set_resumes_the_remaining_members_only(phantoms_2d, tmp_path, tiny_config, recorded_train):
    base = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=4, checkpoint_every=2))
    out = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        train_teacher_set(out, make_plan("uniform", base, members=3))
    assert recorded_train == [("unet_seed3", False), ("unet_seed4", False)]
    assert [m.name for m in load_manifest(out).members] == ["unet_seed3"]
    first = out / "members" / "unet_seed3" / "result.json"
    stamp = first.stat().st_mtime_ns

    with pytest.raises(RunDirError, match=str(out)):
        train_teacher_set(out, make_plan("uniform", base, members=3))
    with pytest.raises(TeacherPlanError, match=r"members \(names\).*unet_seed6"):
        train_teacher_set(out, make_plan("uniform", base, members=4), resume=True)

    recorded_train.clear()
    teachers = train_teacher_set(out, make_plan("uniform", base, members=3), resume=True)
    assert recorded_train == [("unet_seed4", True), ("unet_seed5", False)]
    assert first.stat().st_mtime_ns == stamp
    assert [m.name for m in teachers.members] == ["unet_seed3", "unet_seed4", "unet_seed5"]
    assert [m.seed for m in teachers.members] == [3, 4, 5] and teachers.kind == "uniform"
    assert all(isinstance(d, float) for d in teachers.val_dice)
    rows = json.loads((out / "teachers.json").read_text())["members"]
    assert rows[1]["checkpoint"] == "members/unet_seed4/best.pt"
    assert json.loads((out / "members" / "unet_seed4" / "result.json").read_text())["steps"] == 4
    assert len(open_teachers(out).load_networks()) == 3


def test_multitask_set_records_its_task(phantoms_2d, tmp_path, tiny_config):
    from medkd.storage import load_checkpoint

    base = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2))
    teachers = train_teacher_set(tmp_path / "set", make_plan("multitask", base, members=1, aux_weight=0.25))
    member = teachers.members[0]
    assert member.info["task"] == "multitask" and member.info["aux_weight"] == 0.25
    state = load_checkpoint(member.checkpoint)
    assert state["teacher_task"]["aux_weight"] == 0.25 and any("recon_head" in k for k in state["extra_state"])
    assert len(teachers.load_networks()) == 1


def test_member_killed_before_its_first_checkpoint_starts_again(phantoms_2d, tmp_path, tiny_config, recorded_train):
    base = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=4, checkpoint_every=4, seed=4))
    with pytest.raises(KeyboardInterrupt):
        train_teacher_set(tmp_path / "set", make_plan("uniform", base, members=1))
    run = tmp_path / "set" / "members" / "unet_seed4"
    assert not (run / "last.pt").exists() and not (run / "config.yaml").exists()  # it removed what it wrote
    assert not (tmp_path / "set" / "teachers.json").exists()
    teachers = train_teacher_set(tmp_path / "set", resume=True)  # no plan: continue the stored one
    assert recorded_train == [("unet_seed4", False), ("unet_seed4", False)]
    assert [m.name for m in teachers.members] == ["unet_seed4"]


# ----------------------------------------------------------------------------- command line


def _cli(phantoms, tmp_path, *args):
    from typer.testing import CliRunner

    from medkd.cli import app

    common = ["--dataset", str(phantoms), "--preset", "student", "--patch-size", "64,64", "--batch-size", "4",
              "--max-steps", "2", "--num-workers", "0", "--set", f"data.cache_dir={tmp_path / 'cache'}",
              "--set", "train.progress=false", "--set", "train.tensorboard=false"]
    return CliRunner().invoke(app, ["train-teachers", *common, *args])


def test_cli_trains_a_grouped_subset_set_and_resumes(phantoms_2d, tmp_path, capsys):
    from typer.testing import CliRunner

    from medkd.cli import app

    out = tmp_path / "set"
    first = _cli(phantoms_2d, tmp_path, "--kind", "subset", "--subsets", "2", "--group-by", "site", "--out", str(out))
    assert first.exit_code == 0, first.output
    teachers = load_manifest(out)
    assert teachers.kind == "subset" and [m.name for m in teachers.members] == ["subset0", "subset1"]
    assert not set(teachers.members[0].cases) & set(teachers.members[1].cases)
    assert "best val Dice" in first.output and "teachers.json" in first.output
    member = yaml.safe_load((out / "members" / "subset0" / "config.yaml").read_text())
    assert member["plan"]["configuration"] == "2d" and member["data"]["patch_size"] == [64, 64]  # planned; flag wins
    decision = json.loads((out / "postprocessing.json").read_text())  # the ensemble's own, on its predictions
    assert [m[0] for m in decision["members"]] == ["subset0", "subset1"] and decision["num_cases"] >= 1
    assert EnsemblePredictor(out).member_keys == decision["members"]
    capsys.readouterr()
    assert decide_set_postprocessing(out, progress=True)["members"] == decision["members"]
    assert "post-processing of the set: predict" in capsys.readouterr().err  # a bar names the long step
    again = _cli(phantoms_2d, tmp_path, "--kind", "subset", "--subsets", "2", "--group-by", "site", "--out", str(out))
    assert again.exit_code == 1 and "already exists" in again.output and str(out) in again.output
    resumed = CliRunner().invoke(app, ["train-teachers", "--resume", "--out", str(out)])
    assert resumed.exit_code == 0 and "2 subset teacher(s)" in resumed.output
    differs = _cli(phantoms_2d, tmp_path, "--kind", "subset", "--subsets", "3", "--group-by", "site",
                   "--out", str(out), "--resume")
    assert differs.exit_code == 1 and "members (names)" in differs.output


@pytest.mark.parametrize("args,needle", [
    (["--kind", "bagging"], "unknown teacher-set kind 'bagging'"),
    (["--kind", "diverse", "--models", "unet,foo"], "unknown model name(s) foo"),
    (["--kind", "diverse", "--losses", "dice_ce,hinge"], "unknown loss name(s) hinge"),
    (["--kind", "subset", "--group-by", "scanner"], "no metadata key 'scanner'"),
    (["--kind", "multitask", "--aux-tap", "model.9"], "--aux-tap model.9"),
    (["--kind", "uniform", "--aux-weight", "0.3"], "apply to --kind multitask only"),
])
def test_cli_errors_are_one_message(phantoms_2d, tmp_path, args, needle):
    result = _cli(phantoms_2d, tmp_path, *args, "--out", str(tmp_path / "set"))
    assert result.exit_code == 1 and needle in result.output, result.output
    assert not (tmp_path / "set").exists()
