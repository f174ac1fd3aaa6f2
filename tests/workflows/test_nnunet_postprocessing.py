"""nnU-Net's post-processing decision (postprocessing.pkl / .json) imported as a teacher set's own decision."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.engine.ensemble import load_predictor
from medkd.engine.postprocess import Postprocessing
from medkd.workflows.nnunet_import import import_nnunet
from medkd.workflows.nnunet_postprocessing import NNUNET_STEP, NnunetPostprocessingError, read_nnunet_steps
from tests.nnunet_results import LABELS, make_results

runner = CliRunner()
MODULE = "nnunetv2.postprocessing.remove_connected_components"
FOREGROUND = sorted(v for v in LABELS.values() if v != 0)


@pytest.fixture
def nnunet_step(monkeypatch):
    """nnU-Net's step function, pickled by reference as nnU-Net pickles it (a stand-in module without nnunetv2)."""
    try:
        from nnunetv2.postprocessing.remove_connected_components import \
            remove_all_but_largest_component_from_segmentation as step
        return step
    except ImportError:
        module = types.ModuleType(MODULE)

        def remove_all_but_largest_component_from_segmentation(segmentation, labels_or_regions, background_label=0):
            raise AssertionError("medkd must never call a function from the pickle")

        remove_all_but_largest_component_from_segmentation.__module__ = MODULE
        remove_all_but_largest_component_from_segmentation.__qualname__ = NNUNET_STEP  # pickled by module + name
        module.remove_all_but_largest_component_from_segmentation = remove_all_but_largest_component_from_segmentation
        for name in ("nnunetv2", "nnunetv2.postprocessing"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, MODULE, module)
        return remove_all_but_largest_component_from_segmentation


def write_pkl(path, fns, kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((fns, kwargs)))
    return path


def test_pickle_and_json_give_the_same_steps(tmp_path, nnunet_step):
    kwargs = [{"labels_or_regions": FOREGROUND}, {"labels_or_regions": 2}, {"labels_or_regions": np.int64(4)}]
    pkl = write_pkl(tmp_path / "postprocessing.pkl", [nnunet_step] * 3, kwargs)
    as_json = tmp_path / "postprocessing.json"  # what nnU-Net writes beside it
    as_json.write_text(json.dumps({"postprocessing_fns": [nnunet_step.__name__] * 3,
                                   "postprocessing_kwargs": [{"labels_or_regions": FOREGROUND},
                                                             {"labels_or_regions": 2}, {"labels_or_regions": 4}]}))
    assert read_nnunet_steps(pkl) == read_nnunet_steps(as_json) == [FOREGROUND, 2, 4]


def test_a_pickle_naming_other_code_is_refused_without_running_it(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(pickle.dumps(([Exploit()], [{}])))
    with pytest.raises(NnunetPostprocessingError, match=r"postprocessing.pkl: refers to (posix|os|nt)\.system"):
        read_nnunet_steps(path)
    assert not (tmp_path / "pwned").exists()


def test_import_applies_nnunet_decision_found_beside_the_folds(tmp_path, nnunet_step):
    results = make_results(tmp_path / "results", "2d", folds=(0, 1))
    write_pkl(results / "crossval_results_folds_0_1" / "postprocessing.pkl", [nnunet_step] * 2,
              [{"labels_or_regions": FOREGROUND}, {"labels_or_regions": 3}])
    result = runner.invoke(app, ["import-nnunet", str(results), "--configuration", "2d", "--folds", "0,1",
                                 "-o", str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert "all foreground as one, largest component of neighbour" in " ".join(result.output.split())
    record = json.loads((tmp_path / "set" / "postprocessing.json").read_text())
    assert record["members"] == [["fold_0", "best.pt", 1], ["fold_1", "best.pt", 1]]
    predictor = load_predictor(tmp_path / "set")
    assert predictor.postprocessing == Postprocessing(foreground=tuple(FOREGROUND), classes=(3,))
    assert load_predictor(tmp_path / "set", postprocess=False).postprocessing is None
    none = import_nnunet(results, "2d", [0, 1], tmp_path / "bare", find_postprocessing=False)
    assert not (tmp_path / "bare" / "postprocessing.json").exists() and len(none) == 2


@pytest.mark.parametrize("kwargs,match", [
    ([{"labels_or_regions": (1, 2)}], "region-based"),
    ([{"labels_or_regions": 9}], "label 9, not a foreground label"),
    ([{"labels_or_regions": 2}, {"labels_or_regions": FOREGROUND}], "only as the first step"),
])
def test_bad_decisions_are_refused_naming_the_file_and_nothing_is_written(tmp_path, nnunet_step, kwargs, match):
    results = make_results(tmp_path / "results", "2d", folds=(0,))
    pkl = write_pkl(tmp_path / "pp" / "postprocessing.pkl", [nnunet_step] * len(kwargs), kwargs)
    result = runner.invoke(app, ["import-nnunet", str(results), "--configuration", "2d", "--folds", "0",
                                 "-o", str(tmp_path / "set"), "--postprocessing", str(pkl)])
    output = "".join(result.output.split("\n"))
    assert result.exit_code != 0 and match in output and "postprocessing.pkl" in output
    assert not (tmp_path / "set").exists() and not list(tmp_path.glob(".tmp_*"))


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, dtype=np.uint8)
    for _ in range(12):
        corner = [int(rng.integers(0, s - 3)) for s in shape]
        size = [int(rng.integers(1, 4)) for _ in shape]
        seg[tuple(slice(c, c + z) for c, z in zip(corner, size))] = rng.integers(1, len(LABELS))
    return seg


@pytest.mark.parametrize("shape", [(24, 24), (8, 16, 16)])
def test_medkd_applies_it_as_nnunetv2_does(tmp_path, shape):
    nnunet = pytest.importorskip("nnunetv2.postprocessing.remove_connected_components",
                                 reason="nnunetv2 is not installed (optional; the parity check needs it)")
    step = nnunet.remove_all_but_largest_component_from_segmentation
    kwargs = [{"labels_or_regions": FOREGROUND}, {"labels_or_regions": 1}, {"labels_or_regions": 4}]
    pkl = write_pkl(tmp_path / "postprocessing.pkl", [step] * 3, kwargs)
    fns, loaded = pickle.loads(pkl.read_bytes())
    ours = Postprocessing(foreground=tuple(FOREGROUND), classes=(1, 4))
    for seed in range(5):
        seg = _blobs(shape, seed)
        assert np.array_equal(ours.apply(seg), nnunet.apply_postprocessing(seg, fns, loaded))


def test_medkd_postprocess_on_an_imported_set_points_to_the_import(tmp_path):
    results = make_results(tmp_path / "results", "2d", folds=(0,))
    import_nnunet(results, "2d", [0], tmp_path / "set")
    result = runner.invoke(app, ["postprocess", "--run-dir", str(tmp_path / "set")])
    assert result.exit_code == 1 and "import-nnunet --postprocessing" in " ".join(result.output.split())
