"""The distill config: teacher's data settings < student and recipe < caller's overrides."""

from __future__ import annotations

import yaml

from medkd.models import create
from medkd.storage import save_checkpoint
from medkd.workflows.distill import distill_config, distill_defaults


def _teacher(path, data):
    network = create("unet", 2, 1, 2, preset="student")
    save_checkpoint({"model_spec": network.medkd_spec.to_dict(), "state_dict": network.state_dict(),
                     "labels": {"background": 0, "a": 1}, "config": {"data": data}}, path)
    return path


def test_teacher_data_settings_are_defaults_the_caller_overrides(tmp_path, phantoms_2d):
    teacher = _teacher(tmp_path / "best.pt", {"dataset": str(phantoms_2d), "mode": "2d", "patch_size": [48, 48],
                                             "batch_size": 3, "data_fraction": 0.5})
    cfg = distill_config(teacher, "unet", "logit-kd", {"train.max_steps": 7, "data.batch_size": 5})
    assert cfg.data.patch_size == [48, 48] and cfg.data.batch_size == 5 and cfg.train.max_steps == 7
    assert cfg.data.data_fraction == 1.0  # the default, never the teacher's
    assert (cfg.model.name, cfg.model.preset) == ("unet", "student")
    assert cfg.distill.teacher == teacher and cfg.distill.recipe["name"] == "logit-kd"
    assert distill_config(teacher, overrides={"model.preset": "teacher"}).model.preset == "teacher"


def test_a_config_file_takes_the_place_of_the_teacher_data(tmp_path, phantoms_2d):
    teacher = _teacher(tmp_path / "best.pt", {"dataset": str(phantoms_2d), "mode": "2d", "patch_size": [48, 48]})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": str(phantoms_2d), "mode": "2d", "patch_size": [32, 32]}}))
    assert "data.patch_size" not in distill_defaults(teacher, teacher_data=False)
    assert distill_config(teacher, config=config).data.patch_size == [32, 32]
