"""A teacher set predicts as one model: combination rules, uncertainty, member checks, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medkd.data.dataset import load_dataset
from medkd.data.io import read_image, uncertainty_file
from medkd.data.preprocess import make_plan
from medkd.engine.ensemble import EnsemblePredictor, MemberStatistics, load_predictor
from medkd.engine.inference import Predictor, group_channel_files, predict_folder, read_case
from medkd.models import create
from medkd.storage import save_checkpoint
from medkd.teachers.combine import mean_logits, mean_probabilities, voxel_uncertainty
from medkd.teachers.manifest import TeacherMember, TeacherSet


def _checkpoint(dataset_root, path, *, seed, mode="2d", patch=(32, 32), labels=None):
    """An untrained student UNet saved as a medkd checkpoint; ``seed`` sets its weights."""
    dataset = load_dataset(dataset_root)
    plan = make_plan(dataset, dataset.training[:2], mode=mode)
    torch.manual_seed(seed)
    model = create("unet", 2 if mode == "2d" else 3, dataset.num_channels, dataset.num_classes, preset="student")
    save_checkpoint({"model_spec": model.medkd_spec.to_dict(), "state_dict": model.state_dict(),
                     "preprocessing": {"plan": plan.to_dict(), "patch_size": list(patch)},
                     "labels": labels or dict(dataset.labels)}, path)
    return path


def _teacher_set(folder, checkpoints, labels):
    members = [TeacherMember(name=f"t{i}", checkpoint=c) for i, c in enumerate(checkpoints)]
    TeacherSet(kind="uniform", members=members, labels=dict(labels), source=folder / "teachers.json").save(folder)
    return folder


@pytest.fixture(scope="module")
def two_2d(phantoms_2d, tmp_path_factory):
    """Two differently seeded 2D checkpoints (different patch sizes too) and a case to predict."""
    folder = tmp_path_factory.mktemp("ens2d")
    a = _checkpoint(phantoms_2d, folder / "a.pt", seed=0)
    b = _checkpoint(phantoms_2d, folder / "b.pt", seed=1, patch=(48, 48))
    files = next(iter(group_channel_files(phantoms_2d / "imagesTs", 1).values()))
    return a, b, read_case(files), load_dataset(phantoms_2d).labels


@pytest.mark.parametrize("tta", [False, True])
def test_mean_prob_is_the_mean_of_the_members(two_2d, tmp_path, tta):
    a, b, (image, geometry), labels = two_2d
    members = [Predictor(c, tta=tta).predict_arrays(image, geometry) for c in (a, b)]
    ensemble = EnsemblePredictor(_teacher_set(tmp_path, [a, b], labels), tta=tta)
    probs, spread = ensemble.predict_with_uncertainty(image, geometry)
    np.testing.assert_allclose(probs, (members[0] + members[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_arrays(image, geometry), probs, atol=0)
    stack = torch.from_numpy(np.stack(members))[:, None]  # (M, B=1, K, y, x)
    np.testing.assert_allclose(spread, voxel_uncertainty(stack)[0, 0].numpy(), atol=1e-6)
    assert spread.shape == image.shape[1:] and spread.dtype == np.float32 and spread.max() > 1e-3


def test_mean_logits_matches_a_float64_reference(two_2d, tmp_path):
    a, b, (image, geometry), labels = two_2d
    members = np.stack([Predictor(c).predict_arrays(image, geometry) for c in (a, b)]).astype(np.float64)
    reference = torch.softmax(torch.from_numpy(np.log(members).mean(0)), dim=0).numpy()
    ensemble = EnsemblePredictor(_teacher_set(tmp_path, [a, b], labels), combine="mean_logits")
    probs, spread = ensemble.predict_with_uncertainty(image, geometry)
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    assert not np.allclose(probs, members.mean(0), atol=1e-3)  # a different rule than mean_prob
    mean_prob_spread = EnsemblePredictor(_teacher_set(tmp_path, [a, b], labels)).predict_with_uncertainty(
        image, geometry)[1]
    np.testing.assert_allclose(spread, mean_prob_spread, atol=1e-6)  # uncertainty does not depend on the rule


def test_member_statistics_agree_with_the_stacked_combination_functions():
    logits = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3  # (M, K, y, x)
    for rule, reference in (("mean_prob", mean_probabilities), ("mean_logits", mean_logits)):
        stats = MemberStatistics(rule, spread=True)
        for member in torch.softmax(logits, dim=1):
            stats.add(member)
        expected = reference(logits[:, None].float())[0]  # combine.py takes (M, B, K, *spatial)
        torch.testing.assert_close(stats.combined(), expected, atol=1e-6, rtol=0)
        spread = voxel_uncertainty(torch.softmax(logits, 1)[:, None].float())[0, 0]
        torch.testing.assert_close(stats.voxel_uncertainty(), spread, atol=1e-6, rtol=0)
    untracked = MemberStatistics("mean_logits")
    untracked.add(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="not tracked"):
        untracked.voxel_uncertainty()
    with pytest.raises(ValueError, match="unknown combination rule 'median'"):
        MemberStatistics("median")


def test_uncertainty_is_zero_for_identical_members(two_2d, tmp_path):
    a, _, (image, geometry), labels = two_2d
    single = Predictor(a).predict_arrays(image, geometry)
    probs, spread = EnsemblePredictor(_teacher_set(tmp_path, [a, a], labels)).predict_with_uncertainty(image, geometry)
    assert np.array_equal(probs, single) and not spread.any()


def test_a_set_of_one_is_the_single_checkpoint(two_2d, tmp_path):
    a, _, (image, geometry), labels = two_2d
    single = Predictor(a).predict_arrays(image, geometry)
    set_of_one = EnsemblePredictor(_teacher_set(tmp_path, [a], labels))
    assert np.array_equal(set_of_one.predict_arrays(image, geometry), single)
    assert np.array_equal(EnsemblePredictor(a).predict_arrays(image, geometry), single)  # open_teachers on a .pt
    assert type(load_predictor(a)) is Predictor
    assert isinstance(load_predictor(tmp_path), EnsemblePredictor)
    assert isinstance(load_predictor(tmp_path / "teachers.json"), EnsemblePredictor)


def test_a_set_applies_its_own_postprocessing_while_it_names_its_members(two_2d, tmp_path, caplog):
    from medkd.engine.inference import segmentation
    from medkd.engine.postprocess import Postprocessing, write_postprocessing

    a, b, (image, geometry), labels = two_2d
    folder = _teacher_set(tmp_path, [a, b], labels)
    assert EnsemblePredictor(folder).postprocessing is None  # nothing decided yet: plain argmax
    classes = {name: {"label": value, "applied": True, "dice_without": 0.5, "dice_with": 0.6}
               for name, value in labels.items() if value}
    record = {"members": EnsemblePredictor(folder).member_keys, "classes": classes,
              "foreground_as_one": {"applied": True, "dice_without": 0.5, "dice_with": 0.6}}
    write_postprocessing(folder / "postprocessing.json", record)
    predictor = EnsemblePredictor(folder)
    probs = predictor.predict_arrays(image, geometry)
    expected = Postprocessing.from_record(record).apply(segmentation(probs))
    assert np.array_equal(predictor.segment(probs), expected)
    assert load_predictor(folder, postprocess=False).postprocessing is None
    write_postprocessing(folder / "postprocessing.json", {**record, "members": [["t0", "other.pt", 7]]})
    assert EnsemblePredictor(folder).postprocessing is None and "decided for other members" in caplog.text
    assert EnsemblePredictor(a).postprocessing is None  # a single checkpoint is not a set


def test_member_with_other_labels_is_named(two_2d, phantoms_2d, tmp_path):
    a, _, _, labels = two_2d
    renamed = {("tumour" if name == "lesion" else name): v for name, v in labels.items()}
    odd = _checkpoint(phantoms_2d, tmp_path / "odd.pt", seed=2, labels=renamed)
    with pytest.raises(ValueError, match="member 't1'") as info:
        EnsemblePredictor(_teacher_set(tmp_path, [a, odd], labels))
    assert str(odd) in str(info.value) and "tumour" in str(info.value)


def test_load_predictor_errors(tmp_path):
    with pytest.raises(ValueError, match="model not found"):
        load_predictor(tmp_path / "nothing.pt")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ValueError, match="teachers.json"):
        load_predictor(tmp_path / "empty")
    with pytest.raises(ValueError, match="mean_prob, mean_logits"):
        load_predictor(tmp_path, combine="vote")


def test_2d_and_3d_members_combine_on_the_original_grid(phantoms_3d, tmp_path):
    """Members with different plans (2D and 3D) each map back to the image grid before averaging."""
    m2 = _checkpoint(phantoms_3d, tmp_path / "m2.pt", seed=0, mode="2d", patch=(32, 32))
    m3 = _checkpoint(phantoms_3d, tmp_path / "m3.pt", seed=1, mode="3d", patch=(16, 32, 32))
    image, geometry = read_case([sorted((phantoms_3d / "imagesTs").iterdir())[0]])
    members = [Predictor(c).predict_arrays(image, geometry) for c in (m2, m3)]
    ensemble = EnsemblePredictor(_teacher_set(tmp_path, [m2, m3], load_dataset(phantoms_3d).labels))
    np.testing.assert_allclose(ensemble.predict_arrays(image, geometry), (members[0] + members[1]) / 2, atol=1e-6)


def test_uncertainty_file_keeps_the_input_geometry(phantoms_3d, tmp_path, rotated_copies):
    images = rotated_copies(phantoms_3d / "imagesTs", tmp_path / "images")
    ckpts = [_checkpoint(phantoms_3d, tmp_path / f"{s}.pt", seed=s) for s in (0, 1)]
    ensemble = EnsemblePredictor(_teacher_set(tmp_path / "set", ckpts, load_dataset(phantoms_3d).labels))
    written = predict_folder(ensemble, images, tmp_path / "out", uncertainty=True, save_probs=True)
    assert len(written) == 2
    for out in written:
        source = images / out.name.replace(".nii.gz", "_0000.nii.gz")
        img, src_geo = read_image(source)
        seg, seg_geo = read_image(out)
        spread, spread_geo = read_image(uncertainty_file(out))
        assert uncertainty_file(out).name == out.name.replace(".nii.gz", "_uncertainty.nii.gz")
        assert spread_geo == src_geo == seg_geo
        assert spread.shape == seg.shape == img.shape and spread.dtype == np.float32
        probs, expected = ensemble.predict_with_uncertainty(img[None].astype(np.float32), src_geo)
        np.testing.assert_array_equal(spread, expected)
        np.testing.assert_array_equal(seg, probs.argmax(0))
        saved = np.load(out.with_name(out.name.replace(".nii.gz", ".npz")))["probabilities"]
        np.testing.assert_allclose(saved.astype(np.float32), probs, atol=1e-3)  # the combined probabilities
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict_folder(ensemble, images, tmp_path / "out", uncertainty=True)


def test_uncertainty_needs_two_members(two_2d, phantoms_2d, tmp_path):
    a, _, _, labels = two_2d
    for predictor in (Predictor(a), EnsemblePredictor(_teacher_set(tmp_path, [a], labels))):
        with pytest.raises(ValueError, match="at least 2 members"):
            predict_folder(predictor, phantoms_2d / "imagesTs", tmp_path / "out", uncertainty=True)
    assert not (tmp_path / "out").exists()
