from __future__ import annotations

import csv

import pytest
import torch

from medkd.config import build_config
from medkd.engine.trainer import RunDirError, Trainer, train
from medkd.storage import load_checkpoint


def _losses(run_dir):
    with open(run_dir / "train_log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_loss_decreases_on_tiny_set(phantoms_2d, tmp_path, tiny_config):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=40, lr=0.01))
    result = train(cfg, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert result.steps == 40
    for name in ["best.pt", "last.pt", "config.yaml", "result.json", "train_log.csv", "val_log.csv"]:
        assert (tmp_path / "run" / name).is_file(), name
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 40 and ckpt["model_spec"]["preset"] == "student"


def test_resume_after_interruption_gives_same_weights(phantoms_2d, tmp_path, tiny_config, interrupt_at):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache"))
    train(cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "cut", callbacks=[interrupt_at(4)]).fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3  # killed after step 4, saved at 3
    train(None, tmp_path / "cut", resume=True)
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["step"] == full["step"] == 6
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # the row of step 4 (after the checkpoint) is written once: dropped on resume, then written again
    assert _losses(tmp_path / "full") == pytest.approx(_losses(tmp_path / "cut"))


def test_resume_rebuilds_the_network_of_the_checkpoint_not_the_current_preset(phantoms_2d, tmp_path, tiny_config,
                                                                               interrupt_at, monkeypatch):
    from medkd.models import registry

    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache"))
    monkeypatch.setitem(registry.PRESET_KWARGS, "student", {("unet", 2): {"act": "prelu"}})  # an older default
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "cut", callbacks=[interrupt_at(4)]).fit()
    monkeypatch.setitem(registry.PRESET_KWARGS, "student", {("unet", 2): {"act": "relu"}})  # the preset changed since
    train(None, tmp_path / "cut", resume=True)
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["step"] == 6 and resumed["model_spec"]["kwargs"]["act"] == "prelu"


def test_never_overwrites_a_run(phantoms_2d, tmp_path, tiny_config):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=1))
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(RunDirError, match="cannot resume"):
        train(None, tmp_path / "nothing", resume=True)


def test_checkpoints_load_weights_only_and_rebuild(phantoms_2d, tmp_path, tiny_config):
    from medkd.models import create_from_spec

    train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2)), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    model = create_from_spec(ckpt["model_spec"])
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["labels"]["background"] == 0


@pytest.mark.parametrize("model,deep_supervision", [("unet", False), ("dynunet", True)])
def test_3d_patch_training(phantoms_3d, tmp_path, tiny_config, model, deep_supervision):
    tree = tiny_config(phantoms_3d, tmp_path / "cache", max_steps=2)
    tree["data"].update({"mode": "3d", "patch_size": [16, 32, 32], "batch_size": 2})
    tree["model"].update({"name": model, "deep_supervision": deep_supervision})
    result = train(build_config(tree), tmp_path / "run")
    assert result.steps == 2 and len(result.last_val) == 4
    assert load_checkpoint(tmp_path / "run" / "best.pt")["preprocessing"]["plan"]["mode"] == "3d"


def test_resume_with_another_thread_count_says_the_weights_will_differ(phantoms_2d, tmp_path, tiny_config, caplog):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=1)), tmp_path / "run")
        assert load_checkpoint(tmp_path / "run" / "last.pt")["num_threads"] == 2
        torch.set_num_threads(1)
        with caplog.at_level("WARNING", logger="medkd.engine.trainer"):
            train(None, tmp_path / "run", resume=True)
    finally:
        torch.set_num_threads(before)
    assert "trained with 2 intra-op threads, this resume has 1" in caplog.text
