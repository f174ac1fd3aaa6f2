"""The preprocessing cache checks its files before reuse and rebuilds a damaged entry, naming the case."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from medkd import storage
from medkd.data import cache_integrity
from medkd.data.dataset import DatasetError, load_dataset
from medkd.data.io import read_image, write_image
from medkd.data.preprocess import make_plan
from medkd.data.store import PreprocessedStore


def _new_run() -> None:
    """What a new process starts with: no file's CRC verified yet."""
    cache_integrity._VERIFIED.clear()


@pytest.fixture
def store(phantoms_3d, tmp_path):
    dataset = load_dataset(phantoms_3d)
    cases = dataset.training[:3]
    store = PreprocessedStore(dataset, make_plan(dataset, cases, mode="3d"), tmp_path / "cache")
    store.ensure(cases, num_workers=1)
    _new_run()
    return store, cases


def _rebuilt(store, cases, caplog) -> tuple[list, str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medkd.data.preprocess"):
        entries = store.ensure(cases, num_workers=1)
    return entries, caplog.text


def test_partly_overwritten_image_is_rebuilt_with_a_warning(store, caplog):
    store, cases = store
    path = store.folder / f"{cases[0].case_id}_img.npy"
    original = np.load(path)
    data = bytearray(path.read_bytes())
    data[-4000:] = bytes(4000)  # same size, last 1000 voxels zeroed: used silently before
    path.write_bytes(bytes(data))
    entries, text = _rebuilt(store, cases, caplog)
    assert store.rebuilt == [cases[0].case_id] and store.last_reused == 2
    assert cases[0].case_id in text and "CRC-32" in text and "rebuilding" in text
    np.testing.assert_array_equal(entries[0].load_image(), original)


def test_truncated_image_is_rebuilt_not_an_mmap_error(store, caplog):
    store, cases = store
    path = store.folder / f"{cases[1].case_id}_img.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # was: "mmap length is greater than file size"
    entries, text = _rebuilt(store, cases, caplog)
    assert store.rebuilt == [cases[1].case_id] and "truncated" in text and cases[1].case_id in text
    assert entries[1].load_image().shape == entries[0].load_image().shape[:1] + entries[1].load_image().shape[1:]


def test_out_of_range_label_written_into_the_cache_is_caught(store, caplog):
    store, cases = store
    path = store.folder / f"{cases[2].case_id}_seg.npy"
    label = np.load(path)
    label[0, 5, 20, 20] = 9  # was: "target contains label 9" during training, naming no case
    np.save(path, label)
    entries, text = _rebuilt(store, cases, caplog)
    assert store.rebuilt == [cases[2].case_id] and f"{cases[2].case_id}_seg.npy" in text
    assert entries[2].load_label().max() < 9


def test_shape_and_dtype_are_checked_every_time_the_crc_once_per_run(store, caplog, monkeypatch):
    store, cases = store
    calls = []
    real = storage.crc32_of_file
    monkeypatch.setattr(storage, "crc32_of_file", lambda path, *a: calls.append(path) or real(path, *a))
    store.ensure(cases, num_workers=1)
    assert len(calls) == 3 * 3  # image, label, locations of each case: first use in this run
    store.ensure(cases, num_workers=1)
    assert len(calls) == 9  # already verified in this run: size, dtype and shape only
    # same byte count, other shape, modification time restored: only the header check can see it
    path = store.folder / f"{cases[0].case_id}_img.npy"
    stat = path.stat()
    image = np.load(path)
    np.save(path, np.ascontiguousarray(image.reshape(1, image.shape[2], image.shape[1], image.shape[3])))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _, text = _rebuilt(store, cases, caplog)
    assert store.rebuilt == [cases[0].case_id] and "expected <f4" in text


def test_entry_without_checksums_from_an_older_medkd_is_rebuilt(store, caplog):
    store, cases = store
    sidecar = store.folder / f"{cases[0].case_id}.json"
    props = json.loads(sidecar.read_text())
    del props["files"]
    sidecar.write_text(json.dumps(props))
    _, text = _rebuilt(store, cases, caplog)
    assert store.rebuilt == [cases[0].case_id] and "no checksums" in text
    assert "files" in json.loads(sidecar.read_text())


def test_nan_image_or_undeclared_label_never_enters_the_cache(nnunet_factory, tmp_path):
    root = nnunet_factory(num_train=2, num_test=0, channels=1)
    dataset = load_dataset(root)
    image_path = dataset.training[0].image_files[0]
    image, geometry = read_image(image_path)
    image[1, 2, 3] = np.nan
    write_image(image, geometry, image_path)
    store = PreprocessedStore(dataset, make_plan(dataset, dataset.training, mode="3d"), tmp_path / "c")
    with pytest.raises(DatasetError, match=f"case case_000 .*{image_path.name}.*NaN/Inf"):
        store.ensure(dataset.training[:1], num_workers=1)
    label_path = dataset.training[1].label_file
    label, geometry = read_image(label_path)
    label[0, 0, 0] = 9
    write_image(label, geometry, label_path)
    with pytest.raises(DatasetError, match=f"case case_001 .*{label_path.name}.*values \\[9\\]"):
        store.ensure(dataset.training[1:], num_workers=1)
    assert not list(store.folder.glob("case_*"))  # nothing of either case is cached
