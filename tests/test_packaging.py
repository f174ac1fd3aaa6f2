"""Packaging: `pip install medkd` (or `medkd[deploy]`) is the torch-free bundle predictor; `medkd[train]` the rest."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from medkd.cli_errors import TRAIN_MODULES

REPO = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_base_install_pulls_no_torch_and_the_train_extra_holds_the_training_stack():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base, extras = _names(project["dependencies"]), project["optional-dependencies"]
    train = _names(extras["train"])
    assert not base & {"torch", "monai", "lightning-fabric", "onnx", "matplotlib"}, base
    assert _names(extras["deploy"]) <= base  # the deploy extra adds nothing that pulls torch
    assert {"torch", "monai", "lightning-fabric"} <= train
    # the modules whose absence the CLI reports as "pip install 'medkd[train]'" are those of the extra
    assert {name.replace("-", "_") for name in train} == TRAIN_MODULES
    assert "'.[train,test]'" in (REPO / "Makefile").read_text()  # make test / make demo install the extra
