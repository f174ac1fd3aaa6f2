"""Environment faults (full disk, read-only folder) and malformed input end in one line, not a traceback."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from medkd import storage
from medkd.cli import app
from medkd.cli_errors import describe

runner = CliRunner()


def _one_error_line(result) -> str:
    """The command failed with exit code 1 and said why in one line (no traceback); that line."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    return lines[-1]


@pytest.mark.parametrize("item,key", [("train.lr=[1", "train.lr"), ("data.patch_size={", "data.patch_size")])
def test_malformed_set_value_names_the_key(phantoms_2d, tmp_path, item, key):
    result = runner.invoke(app, ["train", "--dataset", str(phantoms_2d), "--run-dir", str(tmp_path / "run"),
                                 "--set", item])
    line = _one_error_line(result)
    assert key in line and "YAML" in line
    assert not (tmp_path / "run").exists()


def test_a_full_disk_names_the_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """torch.save on a full device used to fail with 'inline_container.cc' naming neither file nor cause."""
    def temp_on_a_full_device(path):
        tmp = path.with_name(f".tmp_{path.name}.full0001")
        tmp.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
        return tmp

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(storage, "_temp_path_beside", temp_on_a_full_device)
    with pytest.raises(OSError) as raised:
        storage.save_checkpoint({"w": torch.zeros(100_000)}, tmp_path / "last.pt")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "last.pt")
    assert describe(raised.value) == f"{tmp_path / 'last.pt'}: No space left on device (free some space or write elsewhere)"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="No space left"):
        storage.atomic_write_text(tmp_path / "config.yaml", "x: 1\n")
    assert list(tmp_path.iterdir()) == []


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))  # the checkpoint (~390 KB) cannot be written
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead


@pytest.mark.slow
def test_a_failed_checkpoint_write_ends_train_with_one_line_and_nothing_left(phantoms_2d, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medkd", "train", "--dataset", str(phantoms_2d), "--preset", "student",
           "--patch-size", "64,64", "--batch-size", "2", "--max-steps", "2", "--num-workers", "0",
           "--run-dir", str(run), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false",
           "--set", "train.tensorboard=false", "--set", "train.num_threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {run / 'last.pt'}: File too large"
    assert not run.exists()  # failed before its first checkpoint: a retry finds the folder free


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write in: chmod 555, or for root (who ignores modes) a read-only mount."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_commands_writing_into_a_read_only_folder_say_so_in_one_line(phantoms_2d, read_only_dir, tmp_path):
    cause = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    commands = {
        "train": ["train", "--dataset", str(phantoms_2d), "--max-steps", "1", "--run-dir", str(read_only_dir / "run"),
                  "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        "make-phantoms": ["make-phantoms", str(read_only_dir / "ds"), "--num-train", "2", "--num-test", "1"],
        "evaluate": ["evaluate", str(phantoms_2d / "labelsTs"), "--dataset", str(phantoms_2d),
                     "--output", str(read_only_dir / "eval")],
    }
    for name, args in commands.items():
        line = _one_error_line(runner.invoke(app, args))
        assert str(read_only_dir) in line and cause in line, (name, line)
    assert list(read_only_dir.iterdir()) == []
