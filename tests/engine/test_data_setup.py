"""``data.cases``: train on named cases only, after the fold split."""

from __future__ import annotations

import pytest

from medkd.config import ConfigError, build_config
from medkd.data.dataset import load_dataset
from medkd.data.splits import get_split
from medkd.engine.data_setup import prepare_training_data


def _data_config(dataset, cache, **data):
    return build_config({"data": {"dataset": str(dataset), "patch_size": [64, 64], "num_workers": 0,
                                  "cache_dir": str(cache), "check": False, **data},
                         "train": {"max_steps": 1}}).data


def test_cases_select_training_cases_and_keep_validation(phantoms_2d, tmp_path):
    train_ids, val_ids = get_split(load_dataset(phantoms_2d))
    chosen = train_ids[1:4]
    data = prepare_training_data(_data_config(phantoms_2d, tmp_path, cases=list(reversed(chosen))))
    assert [c.case_id for c in data.train] == chosen
    assert [c.case_id for c in data.val] == val_ids
    half = prepare_training_data(_data_config(phantoms_2d, tmp_path, cases=chosen[:2], data_fraction=0.5))
    assert len(half.train) == 1 and half.train[0].case_id in chosen[:2]


def test_cases_errors_name_the_key_and_the_ids(phantoms_2d, tmp_path):
    _, val_ids = get_split(load_dataset(phantoms_2d))
    with pytest.raises(ConfigError, match=r"data\.cases.*nope_1.*validation split") as err:
        prepare_training_data(_data_config(phantoms_2d, tmp_path, cases=["nope_1", val_ids[0]]))
    assert val_ids[0] in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.cases.*more than once: a"):
        _data_config(phantoms_2d, tmp_path, cases=["a", "a"])
    with pytest.raises(ConfigError, match=r"data\.cases"):
        _data_config(phantoms_2d, tmp_path, cases=[])


def test_data_check_warnings_are_logged_errors_refuse(phantoms_2d, tmp_path, caplog):
    import json
    import logging
    import shutil

    import numpy as np

    from medkd.data.io import read_image, write_image
    from medkd.engine.data_setup import DataCheckError

    root = tmp_path / "ds"
    shutil.copytree(phantoms_2d, root)
    first = sorted((root / "imagesTr").iterdir())[0]
    image, geometry = read_image(first)
    write_image(np.zeros_like(image), geometry, first)
    with caplog.at_level(logging.WARNING, logger="medkd.engine.data_setup"):
        data = prepare_training_data(_data_config(root, tmp_path / "c", check=True))
    assert data.train and "constant-image" in caplog.text and first.name in caplog.text
    ids = [c.case_id for c in load_dataset(root).training]
    (root / "splits_final.json").write_text(json.dumps([{"train": ids[:3] + ["../x"], "val": ids[3:]}]))
    with pytest.raises(DataCheckError, match=r"(?s)1 problem.*bad-splits.*file paths") as err:
        prepare_training_data(_data_config(root, tmp_path / "c", check=True))
    assert "constant-image" not in str(err.value)  # warnings are logged, not listed as problems
