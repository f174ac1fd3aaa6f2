from __future__ import annotations

import pytest

from medkd.config import ConfigError, build_config, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = build_config({"train": {"max_steps": 10}}, {"data.patch_size": [64, 64], "model.preset": "student"})
    assert cfg.data.patch_size == [64, 64] and cfg.model.preset == "student" and cfg.train.step_budget() == 10
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("tree,key", [
    ({"train": {"max_steps": 1, "max_step": 2}}, "train.max_step"),
    ({"data": {"mode": "4d"}}, "data.mode"),
    ({"data": {"mode": "3d", "patch_size": [64, 64]}}, "data"),
    ({"train": {"lr": -1, "max_steps": 1}}, "train.lr"),
    ({"train": {"max_steps": None, "max_epochs": None, "max_time_min": None}}, "train"),
])
def test_bad_config_names_the_key(tree, key):
    with pytest.raises(ConfigError) as err:
        build_config(tree, source="run.yaml")
    assert "run.yaml" in str(err.value) and key in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_step_budget_takes_the_smaller():
    cfg = build_config({"train": {"max_steps": 1000, "max_epochs": 2, "steps_per_epoch": 100}})
    assert cfg.train.step_budget() == 200
