"""The run folder: claimed by one run at a time, freed by a run that fails early, cleaned on start and resume."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from medkd.config import build_config
from medkd.engine import trainer as trainer_module
from medkd.engine.run_dir import CLAIM_NAME, RunDirError, claim_run_dir, trim_log
from medkd.engine.trainer import Trainer, train
from medkd.storage import is_temp_file, load_checkpoint
from medkd.workflows.train import default_run_dir


def test_two_runs_started_together_into_one_folder_one_is_refused(phantoms_2d, tmp_path, tiny_config, monkeypatch):
    """Both pass the 'is the folder free' check before either writes: still only one may run there."""
    both_checked = threading.Barrier(2, timeout=60)
    real = trainer_module.prepare_training_data

    def prepare_together(*args, **kwargs):
        both_checked.wait()  # (by then the old code had also written config.yaml: both runs went ahead)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "prepare_training_data", prepare_together)
    outcomes = {}

    def run(seed: int) -> None:
        cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2, seed=seed))
        try:
            outcomes[seed] = train(cfg, tmp_path / "run").steps
        except RunDirError as err:
            outcomes[seed] = str(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished = [seed for seed, outcome in outcomes.items() if outcome == 2]
    refused = [outcome for outcome in outcomes.values() if outcome != 2]
    assert len(finished) == 1 and len(refused) == 1, outcomes
    assert "in use by" in refused[0] or "already holds a run" in refused[0]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["train"]["seed"] == finished[0]


def test_a_held_claim_refuses_another_and_names_the_holder(tmp_path):
    claim = claim_run_dir(tmp_path / "run", resume=False)
    with pytest.raises(RunDirError, match=r"in use by pid \d+"):
        claim_run_dir(tmp_path / "run", resume=False)
    claim.release()
    claim_run_dir(tmp_path / "run", resume=False).release()  # nothing was written: free again


def test_default_run_names_of_one_second_differ():
    names = {default_run_dir("unet", "student") for _ in range(20)}
    assert len(names) == 20


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(phantoms_2d, tmp_path, tiny_config):
    class FailAt:
        def on_step_end(self, trainer, step, terms):
            if step == 2:
                raise RuntimeError("boom")

    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=3, checkpoint_every=3))
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(cfg, tmp_path / "run", callbacks=[FailAt()]).fit()
    assert not (tmp_path / "run").exists()  # config.yaml, train_log.csv and the claim are gone
    assert train(cfg, tmp_path / "run").steps == 3  # the retry needs no other folder and no --resume


def test_leftovers_of_a_killed_run_are_replaced_and_resume_says_why_not(phantoms_2d, tmp_path, tiny_config, caplog):
    """kill -9 before the first checkpoint leaves config, log and an unheld claim: they block nothing."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "train_log.csv", CLAIM_NAME, ".tmp_last.pt.ab12cd_9"):
        (run / name).write_text("x")
    with pytest.raises(RunDirError, match="stopped before its first checkpoint"):
        train(None, run, resume=True)
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=1))
    assert train(cfg, run).steps == 1
    assert "stopped before its first checkpoint" in caplog.text and "config.yaml" in caplog.text
    assert not any(is_temp_file(p) for p in run.iterdir())
    (run / "notes.txt").write_text("mine")  # not written by a run: the folder is not reused
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, run)


def _interrupted_checkpoint_write(run) -> None:
    """A process killed between writing a checkpoint's temporary file and renaming it."""
    code = ("import os, torch, medkd.storage as s; s.os.replace = lambda *a: os._exit(9); "
            f"s.save_checkpoint({{'w': torch.zeros(1000)}}, {str(run / 'last.pt')!r})")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9


def test_temp_files_of_interrupted_writes_are_removed_on_resume_and_start(phantoms_2d, tmp_path, tiny_config):
    cfg = build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=2))
    train(cfg, tmp_path / "run")
    _interrupted_checkpoint_write(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp_last.pt.")]
    train(None, tmp_path / "run", resume=True)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp_")]
    (tmp_path / "fresh").mkdir()
    _interrupted_checkpoint_write(tmp_path / "fresh")
    train(cfg, tmp_path / "fresh")
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".tmp_")]


def test_trim_log_drops_rows_after_the_checkpoint_and_torn_rows(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")
    assert trim_log(log, 2) == 2
    assert log.read_text().split() == ["step,loss", "1,0.5", "2,0.4"]
