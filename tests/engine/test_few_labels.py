"""Few labels, many images: labelled subsets, unlabelled images in distillation, term warm-up."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.config import ConfigError, build_config
from medkd.data.dataset import load_dataset
from medkd.data.loaders import PatchDataset
from medkd.data.splits import labeled_subset
from medkd.data.validate import check_image_folder
from medkd.engine.data_setup import DataCheckError, prepare_training_data
from medkd.engine.distill import Distiller
from medkd.engine.tasks import SupervisedTask
from medkd.engine.trainer import train
from medkd.losses import build_supervised_loss
from medkd.models import create
from medkd.recipes import load_recipe, recipe_from_dict
from medkd.storage import load_checkpoint

PATIENTS = [f"p{p:02d}_f{f}" for p in range(10) for f in (1, 2)]


def test_labeled_subset_keeps_groups_whole_and_is_deterministic():
    chosen = labeled_subset(PATIENTS, fraction=0.1, group_regex=r"^(p\d+)", seed=0)
    assert len(chosen) == 2 and chosen[0][:3] == chosen[1][:3]  # one whole patient = 10% of 20 cases
    assert chosen == labeled_subset(list(reversed(PATIENTS)), fraction=0.1, group_regex=r"^(p\d+)", seed=0)
    assert chosen != labeled_subset(PATIENTS, fraction=0.1, group_regex=r"^(p\d+)", seed=1)
    three = labeled_subset(PATIENTS, count=3, group_regex=r"^(p\d+)")
    assert len(three) == 4  # groups stay whole: the second patient brings both frames
    assert len(labeled_subset(PATIENTS, count=3)) == 3
    with pytest.raises(ValueError, match="exactly one"):
        labeled_subset(PATIENTS, count=3, fraction=0.5)
    with pytest.raises(ValueError, match="only 20"):
        labeled_subset(PATIENTS, count=21)


def test_labeled_cases_and_fraction_exclude_each_other(phantoms_2d, tmp_path, tiny_config):
    tree = tiny_config(phantoms_2d, tmp_path)
    tree["data"].update(labeled_cases=2, labeled_fraction=0.5)
    with pytest.raises(ConfigError, match="labeled_cases or data.labeled_fraction"):
        build_config(tree)


def test_few_label_data_hides_labels_of_the_other_training_cases(phantoms_2d, tmp_path, tiny_config):
    tree = tiny_config(phantoms_2d, tmp_path)
    tree["data"].update(labeled_cases=3, unlabeled=[str(phantoms_2d / "imagesTs")])
    cfg = build_config(tree).data
    supervised = prepare_training_data(cfg)
    assert len(supervised.train) == 3 and supervised.unlabeled == []
    data = prepare_training_data(cfg, with_unlabeled=True)
    assert [c.case_id for c in data.train] == [c.case_id for c in supervised.train]
    hidden = [c for c in data.unlabeled if not c.case_id.startswith("u")]
    from_folder = [c for c in data.unlabeled if c.case_id.startswith("u")]
    assert len(hidden) == 8 - 3 and len(from_folder) == 2  # 10 cases, 5 folds: 8 training cases
    assert all(c.label_path is None and c.locations_path is None for c in data.unlabeled)
    assert not {c.case_id for c in hidden} & {c.case_id for c in data.train}
    tree["data"]["labeled_cases"] = 9
    with pytest.raises(ConfigError, match="data.labeled_cases: 9 labelled cases"):
        prepare_training_data(build_config(tree).data)


def test_unlabeled_folder_is_checked_like_a_dataset(phantoms_2d, tmp_path, tiny_config):
    info = load_dataset(phantoms_2d)
    folder = tmp_path / "unlabelled"
    shutil.copytree(phantoms_2d / "imagesTs", folder)
    assert check_image_folder(folder, info) == []
    stray = folder / f"scan{info.file_ending}"
    stray.write_bytes(b"not an image")
    problems = check_image_folder(folder, info)
    assert any(p.file == stray and "CASE_XXXX" in p.message for p in problems)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [p.kind for p in check_image_folder(empty, info)] == ["empty-dataset"]
    assert [p.kind for p in check_image_folder(tmp_path / "missing", info)] == ["missing-file"]
    tree = tiny_config(phantoms_2d, tmp_path / "cache")
    tree["data"]["unlabeled"] = [str(folder)]
    with pytest.raises(DataCheckError, match="scan"):
        prepare_training_data(build_config(tree).data, with_unlabeled=True)


def test_sampler_mixes_unlabelled_samples_without_labels(phantoms_2d, tmp_path, tiny_config):
    tree = tiny_config(phantoms_2d, tmp_path)
    tree["data"]["labeled_cases"] = 2
    data = prepare_training_data(build_config(tree).data, with_unlabeled=True)
    dataset = PatchDataset(data.train, spatial_dims=2, patch_size=[32, 32], unlabeled=data.unlabeled,
                           unlabeled_ratio=0.75, seed=0)
    items = [dataset[k] for k in range(200)]
    unlabelled = [item for item in items if not item["labeled"]]
    assert 0.65 < len(unlabelled) / len(items) < 0.85
    assert all(item["case"] >= 2 and item["label"].sum() == 0 for item in unlabelled)
    assert all(item["case"] < 2 for item in items if item["labeled"])
    plain = PatchDataset(data.train, spatial_dims=2, patch_size=[32, 32], seed=0)
    assert all(plain[k]["labeled"] for k in range(20))


def _distiller(recipe: str = "logit-kd", **term_changes) -> Distiller:
    torch.manual_seed(0)
    spec = load_recipe(recipe).model_dump(mode="json")
    for term in spec["terms"].values():
        term.update(term_changes)
    teacher = create("unet", 2, 1, 3, preset="teacher", shrink=3)
    student = create("unet", 2, 1, 3, preset="student")
    return Distiller(student, teacher, recipe_from_dict(spec), spatial_dims=2, in_channels=1, num_classes=3)


def _batch(labeled: list[bool]) -> dict[str, torch.Tensor]:
    label = torch.zeros((len(labeled), 1, 32, 32), dtype=torch.long)
    label[:, :, 8:20, 8:20] = 1
    return {"image": torch.randn(len(labeled), 1, 32, 32), "label": label, "labeled": torch.tensor(labeled)}


def test_supervised_term_sees_only_labelled_samples():
    distiller = _distiller()
    batch = _batch([True, False, True, False])
    garbage = batch["label"].clone()
    garbage[1], garbage[3] = 2, 1  # labels of unlabelled samples must not matter
    terms = distiller({**batch, "label": garbage})
    logits = distiller.network(batch["image"])
    expected = distiller.supervised(logits[[0, 2]], batch["label"][[0, 2]])
    assert torch.allclose(terms["seg"], expected, atol=1e-6)
    none = distiller(_batch([False, False]))
    assert none["seg"] == 0 and none["kl"] > 0  # distillation still learns from the images
    none["loss"].backward()


def test_region_label_uses_the_teachers_argmax_where_labels_are_missing():
    label = torch.zeros((2, 1, 4, 4), dtype=torch.long)
    members = torch.zeros((1, 2, 3, 4, 4))
    members[0, :, 2] = 5.0  # the teacher says class 2 everywhere
    region = Distiller._region_label(label, torch.tensor([True, False]), members)
    assert region[0].eq(0).all() and region[1].eq(2).all()


def test_warmup_ramps_a_term_weight_linearly():
    distiller = _distiller(warmup_steps=10)
    weights = []
    for step in (0, 4, 9, 50):
        distiller.set_step(step)
        weights.append(distiller.term_weight("kl"))
    assert weights == pytest.approx([0.05, 0.25, 0.5, 0.5])  # logit-kd: kl weight 0.5


class _StepRecorder(SupervisedTask):
    def set_step(self, step: int) -> None:
        self.seen = [*getattr(self, "seen", []), step]


def test_trainer_tells_the_task_its_step(phantoms_2d, tmp_path, tiny_config):
    tasks = []

    def factory(network, data, cfg):
        tasks.append(_StepRecorder(network, build_supervised_loss("dice_ce")))
        return tasks[-1]

    train(build_config(tiny_config(phantoms_2d, tmp_path / "cache", max_steps=4)), tmp_path / "run",
          task_factory=factory)
    assert tasks[0].seen == [0, 1, 2, 3]


@pytest.mark.slow
def test_few_label_distillation_from_the_cli(phantoms_2d, tmp_path, tiny_config):
    from medkd.cli import app

    common = ["--max-steps", "4", "--num-workers", "0", "--set", "train.progress=false",
              "--set", "train.tensorboard=false", "--set", "train.log_every=1", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--dataset", str(phantoms_2d), "--model", "unet", "--preset", "teacher",
                                 "--shrink", "3", "--patch-size", "64,64", "--batch-size", "4",
                                 "--labeled-cases", "3", *common, "--run-dir", str(tmp_path / "teacher")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "teacher" / "best.pt"), "--recipe", "logit-kd",
                                 "--unlabeled", str(phantoms_2d / "imagesTs"), *common,
                                 "--run-dir", str(tmp_path / "student")])
    assert result.exit_code == 0, result.output
    data = load_checkpoint(tmp_path / "student" / "last.pt")["config"]["data"]
    assert data["labeled_cases"] == 3  # the teacher's labelled subset, inherited
    assert data["unlabeled"] == [str(phantoms_2d / "imagesTs")]
    cached = sorted((tmp_path / "cache" / "teacher_outputs").glob("*/*_t.json"))
    assert len(cached) == 8 + 2  # every training case (labelled or not) and every unlabelled image
    with open(tmp_path / "student" / "train_log.csv") as handle:
        assert all(np.isfinite(float(r["kl"])) for r in csv.DictReader(handle))


def test_3d_unlabelled_patches_follow_the_cached_teacher(phantoms_3d, tmp_path, tiny_config):
    from medkd.teachers.cache import CachedTarget

    tree = tiny_config(phantoms_3d, tmp_path)
    tree["data"].update(mode="3d", patch_size=[8, 16, 16], labeled_cases=1)
    data = prepare_training_data(build_config(tree).data, with_unlabeled=True)
    targets = []
    for case in [*data.train, *data.unlabeled]:  # stand-in teacher: class 1 in one small corner block only
        shape = np.asarray(case.load_image()).shape[1:]
        logits = np.zeros((2, *shape), dtype=np.float16)
        logits[1, :4, :6, :6] = 10.0
        np.save(tmp_path / f"{case.case_id}_t.npy", logits)
        targets.append(CachedTarget({"logits": tmp_path / f"{case.case_id}_t.npy"}, num_classes=2))

    def hits(oversample: float) -> float:
        dataset = PatchDataset(data.train, spatial_dims=3, patch_size=[8, 16, 16], unlabeled=data.unlabeled,
                               unlabeled_ratio=0.9, oversample=oversample, soft_targets=targets, seed=0)
        items = [item for item in (dataset[k] for k in range(40)) if not item["labeled"]]
        assert items and all(item["label"].shape == (1, 8, 16, 16) and item["label"].sum() == 0 for item in items)
        return float(np.mean([float(item["teacher"][1].max() > 0) for item in items]))

    # unlabelled patches centre on where the teacher sees a class: all of them contain the small block
    assert hits(1.0) == 1.0 and hits(0.0) < 0.5
