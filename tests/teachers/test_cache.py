"""Teacher-output cache: exact on un-augmented input, keyed, self-checking, augmented with the image."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medkd.config import AugmentConfig, build_config
from medkd.data.loaders import PatchDataset
from medkd.engine.data_setup import prepare_training_data
from medkd.engine.distill import Distiller, distill_task_factory
from medkd.engine.trainer import train
from medkd.recipes import load_recipe, recipe_from_dict
from medkd.storage import exclusive_lock
from medkd.teachers.cache import FILL_LOCK, TargetSpec, TeacherOutputCache, decode_top_k, encode_top_k
from medkd.teachers.combine import target_logits
from medkd.teachers.manifest import TeacherMember, TeacherSet, load_frozen, open_teachers


@pytest.fixture(scope="module")
def teachers(phantoms_2d, tiny_config, tiny_teachers, tmp_path_factory):
    """Two tiny 2D teachers (different seeds) trained 2 steps, and the preprocessed training data."""
    root = tmp_path_factory.mktemp("cache_teachers")
    paths = [run / "best.pt" for run in tiny_teachers(phantoms_2d, root, root / "prep", seeds=(0, 1), shrink=3)]
    data = prepare_training_data(build_config(tiny_config(phantoms_2d, root / "prep")).data)
    return paths, data, root


def _live_slice_logits(network, image: np.ndarray) -> torch.Tensor:
    """The teacher on whole slices (C, z, y, x) -> (K, z, y, x), computed independently of the cache."""
    with torch.no_grad():
        return network(torch.tensor(np.asarray(image)).permute(1, 0, 2, 3)).permute(1, 0, 2, 3)


def _cache(teacher_set, data, root, spec=TargetSpec(rule="mean_logits")):
    return TeacherOutputCache.for_teachers(teacher_set, data.plan, spec, data.dataset.num_classes, [64, 64], root)


def test_cache_equals_live_teacher_on_unaugmented_input(teachers):
    paths, data, root = teachers
    teacher_set = open_teachers(paths[0])
    network, _ = load_frozen(paths[0])
    cache = _cache(teacher_set, data, root / "c1")
    targets = cache.ensure(data.train, [network], mode="2d", in_channels=1)
    assert cache.rebuilt == [c.case_id for c in data.train]
    for case, target in zip(data.train[:3], targets):
        live = _live_slice_logits(network, case.load_image()).numpy()
        np.testing.assert_allclose(target.full(), live, rtol=1e-3, atol=2e-3)  # float16 storage


@pytest.fixture()
def image_as_target(teachers, tmp_path):
    """Cached 'targets' that are the case images themselves: any crop mismatch shows up as a difference."""
    from medkd.teachers.cache import CachedTarget

    _, data, _ = teachers
    targets = []
    for case in data.train:
        path = tmp_path / f"{case.case_id}_t.npy"
        np.save(path, np.asarray(case.load_image()).astype(np.float16))
        targets.append(CachedTarget({"logits": path}, num_classes=1))
    return data, targets


def test_patch_target_is_cropped_with_the_image(image_as_target):
    data, targets = image_as_target
    dataset = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 80], soft_targets=targets, seed=5,
                           oversample=0.5)
    plain = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 80], seed=5, oversample=0.5)
    for k in range(8):
        item = dataset[k]
        torch.testing.assert_close(item["image"], plain[k]["image"])  # the cache does not change sampling
        torch.testing.assert_close(item["teacher"], item["image"].half().float())


def test_spatial_augmentation_moves_target_with_image_and_label(image_as_target):
    data, targets = image_as_target
    flips_only = AugmentConfig(flip_prob=1.0, rotate_prob=0, scale_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0)
    augmented = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 48], soft_targets=targets, seed=2,
                             augment=flips_only)
    plain = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 48], soft_targets=targets, seed=2)
    for k in range(3):
        a, p = augmented[k], plain[k]
        for key in ("image", "label", "teacher"):
            torch.testing.assert_close(a[key], torch.flip(p[key], dims=(-2, -1)))
    rotate_scale = AugmentConfig(flip_prob=0, rotate_prob=1.0, scale_prob=1.0, intensity_prob=0, gamma_prob=0,
                                 noise_prob=0)
    moved = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 48], soft_targets=targets, seed=2,
                         augment=rotate_scale)
    for k in range(3):  # rotated and scaled by the same affine map (both bilinear)
        item = moved[k]
        torch.testing.assert_close(item["teacher"], item["image"], atol=5e-3, rtol=5e-3)
    # intensity augmentation changes the image only, never the soft target
    gamma_only = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_prob=1.0, gamma_prob=1.0, noise_prob=0)
    intensity = PatchDataset(data.train, spatial_dims=2, patch_size=[48, 48], soft_targets=targets, seed=2,
                             augment=gamma_only)
    a, p = intensity[0], plain[0]
    assert not torch.equal(a["image"], p["image"])
    torch.testing.assert_close(a["teacher"], p["teacher"])
    torch.testing.assert_close(a["teacher"], p["image"].half().float())


def test_cache_is_reused_then_rebuilt_when_the_teacher_changes(teachers):
    paths, data, root = teachers
    net0, _ = load_frozen(paths[0])
    first = _cache(open_teachers(paths[0]), data, root / "c2")
    first.ensure(data.train, [net0], mode="2d", in_channels=1)
    again = _cache(open_teachers(paths[0]), data, root / "c2")
    again.ensure(data.train, [net0], mode="2d", in_channels=1)
    assert again.rebuilt == [] and again.folder == first.folder
    net1, _ = load_frozen(paths[1])
    other = _cache(open_teachers(paths[1]), data, root / "c2")
    assert other.folder != first.folder
    targets = other.ensure(data.train, [net1], mode="2d", in_channels=1)
    assert len(other.rebuilt) == len(data.train)
    live = _live_slice_logits(net1, data.train[0].load_image()).numpy()
    np.testing.assert_allclose(targets[0].full(), live, rtol=1e-3, atol=2e-3)


def test_a_second_filler_waits_for_the_first_and_computes_only_what_is_missing(teachers, caplog):
    """Two slots of a study distilling from one teacher: the second waits for the first's entries."""
    paths, data, root = teachers
    net0, _ = load_frozen(paths[0])
    first, second = (_cache(open_teachers(paths[0]), data, root / "c_lock") for _ in range(2))
    done = []
    with caplog.at_level(logging.WARNING), exclusive_lock(first.folder / FILL_LOCK):  # the first filler
        waiter = threading.Thread(target=lambda: done.append(second.ensure(data.train, [net0], mode="2d",
                                                                           in_channels=1, progress=False)))
        waiter.start()
        deadline = time.monotonic() + 60
        while "another process is filling it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiter.is_alive() and not done, caplog.text  # blocked on the lock
        first._compute(data.train[:-1], [net0], mode="2d", device="cpu", member_outputs=None, progress=False)
    waiter.join(timeout=60)
    assert len(done) == 1 and second.rebuilt == [data.train[-1].case_id]  # only what the first left
    assert all(second.problem(case) is None for case in data.train)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "no_sidecar"])
def test_corrupted_or_partial_entry_is_detected_and_rebuilt(teachers, damage, caplog):
    paths, data, root = teachers
    network, _ = load_frozen(paths[0])
    cache = _cache(open_teachers(paths[0]), data, root / f"c3_{damage}")
    good = cache.ensure(data.train, [network], mode="2d", in_channels=1)[1].full()
    victim = data.train[1]
    path = cache.folder / f"{victim.case_id}_t.npy"
    raw = bytearray(path.read_bytes())
    if damage == "flip_bytes":
        raw[-10] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        (cache.folder / f"{victim.case_id}_t.json").unlink()
    assert cache.problem(victim) is not None
    with caplog.at_level(logging.WARNING):
        targets = cache.ensure(data.train, [network], mode="2d", in_channels=1)
    assert cache.rebuilt == [victim.case_id]
    assert victim.case_id in caplog.text
    np.testing.assert_array_equal(targets[1].full(), good)


def test_ensemble_target_matches_the_rule_on_live_members(teachers):
    paths, data, root = teachers
    nets = [load_frozen(p)[0] for p in paths]
    teacher_set = TeacherSet("uniform", [TeacherMember(f"m{i}", p) for i, p in enumerate(paths)],
                             dict(data.dataset.labels), root / "teachers.json")
    spec = TargetSpec(rule="mean_prob", temperature=4.0)
    targets = _cache(teacher_set, data, root / "c4", spec).ensure(data.train[:2], nets, mode="2d", in_channels=1)
    image = data.train[0].load_image()
    stack = torch.stack([_live_slice_logits(n, image).permute(1, 0, 2, 3) for n in nets])  # (M, z, K, y, x)
    want = target_logits("mean_prob", stack.double(), 4.0).permute(1, 0, 2, 3)
    got = torch.tensor(targets[0].full()).double()
    torch.testing.assert_close(F.softmax(got / 4, 0), F.softmax(want / 4, 0), atol=2e-3, rtol=0)


def test_top_k_keeps_top_probabilities_and_rest_mass():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7) * 3
    t = 2.0
    enc = encode_top_k(logits, 2, t)
    decoded = torch.tensor(decode_top_k(enc["values"], enc["indices"], enc["rest"], 6))
    p, q = F.softmax(logits / t, 0), F.softmax(decoded / t, 0)
    top = p.topk(2, 0)
    torch.testing.assert_close(q.gather(0, top.indices), top.values, atol=2e-3, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.ones(5, 7))
    rest_p = 1 - top.values.sum(0)
    rest_q = 1 - q.gather(0, top.indices).sum(0)
    torch.testing.assert_close(rest_q, rest_p, atol=2e-3, rtol=0)


def test_distill_with_cache_never_runs_the_teacher(teachers, phantoms_2d, tiny_config, monkeypatch):
    paths, data, root = teachers
    tree = tiny_config(phantoms_2d, root / "prep", max_steps=3)
    tree["distill"] = {"teacher": str(paths[0]), "recipe": load_recipe("logit-kd").model_dump(mode="json")}
    config = build_config(tree)
    distiller = distill_task_factory(config)(_student(data), data, config)
    assert distiller.soft_targets is not None
    monkeypatch.setattr(distiller.teacher, "forward", _fail)
    result = train(config, root / "distill_cached", task_factory=lambda *a: distiller)
    assert result.steps == 3


def test_recipe_with_features_or_mean_loss_runs_live():
    assert not load_recipe("reco-kd").uses_cache
    assert load_recipe("logit-kd").uses_cache
    live = recipe_from_dict({"name": "r", "paper": "p", "terms": {"kl": {"loss": "kl", "weight": 1}},
                             "teachers": {"combine": "mean_loss"}})
    assert not live.uses_cache


def test_mean_loss_averages_the_term_over_members():
    torch.manual_seed(0)
    from medkd.models import create

    teachers = [create("unet", 2, 1, 3, preset="student") for _ in range(2)]
    recipe = recipe_from_dict({"name": "r", "paper": "p", "supervised": {"weight": 0.0},
                               "terms": {"kl": {"loss": "kl", "weight": 1, "options": {"temperature": 2.0}}},
                               "teachers": {"combine": "mean_loss", "cache": False}})
    student = create("unet", 2, 1, 3, preset="student")
    distiller = Distiller(student, teachers, recipe, spatial_dims=2, in_channels=1, num_classes=3)
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.zeros(2, 1, 32, 32, dtype=torch.long)}
    got = distiller(batch)["kl"]
    from medkd.losses.logits import KLDivergenceLoss

    with torch.no_grad():
        s = student(batch["image"])
        want = sum(KLDivergenceLoss(2.0)(s, t(batch["image"])) for t in teachers) / 2
    torch.testing.assert_close(got, want)


def _student(data):
    from medkd.models import create

    return create("unet", 2, data.dataset.num_channels, data.dataset.num_classes, preset="student")


def _fail(*args, **kwargs):
    raise AssertionError("the teacher ran although its outputs are cached")


def test_3d_cache_uses_the_sliding_window_and_keeps_the_grid(phantoms_3d, tiny_config, tmp_path):
    from monai.inferers import sliding_window_inference

    from medkd.models import create

    tree = tiny_config(phantoms_3d, tmp_path / "prep")
    tree["data"].update(mode="3d", patch_size=[16, 32, 32])
    data = prepare_training_data(build_config(tree).data)
    torch.manual_seed(0)
    network = create("unet", 3, 1, data.dataset.num_classes, preset="student").eval()
    checkpoint = tmp_path / "t.pt"
    checkpoint.write_bytes(b"stand-in bytes: only the fingerprint reads the file")
    teacher_set = TeacherSet("single", [TeacherMember("t", checkpoint)], dict(data.dataset.labels), checkpoint)
    cache = TeacherOutputCache.for_teachers(teacher_set, data.plan, TargetSpec("mean_logits"),
                                            data.dataset.num_classes, [16, 32, 32], tmp_path)
    targets = cache.ensure(data.train[:2], [network], mode="3d", in_channels=1)
    image = np.asarray(data.train[0].load_image())
    with torch.no_grad():
        live = sliding_window_inference(torch.tensor(image)[None], [16, 32, 32], 2, network, overlap=0.5,
                                        mode="gaussian")[0]
    assert targets[0].full().shape == (data.dataset.num_classes, *image.shape[1:])
    np.testing.assert_allclose(targets[0].full(), live.numpy(), rtol=1e-3, atol=2e-3)
    patch = PatchDataset(data.train[:2], spatial_dims=3, patch_size=[16, 32, 32], soft_targets=targets)[0]
    assert patch["teacher"].shape == (data.dataset.num_classes, 16, 32, 32)


def test_2d_cache_uses_the_sliding_window_of_predict(teachers):
    """Slices larger than the patch: the cached target is what `medkd predict` computes (Gaussian windows)."""
    from medkd.engine.inference import predict_probabilities

    paths, data, root = teachers
    network, _ = load_frozen(paths[0])
    cache = TeacherOutputCache.for_teachers(open_teachers(paths[0]), data.plan, TargetSpec(rule="mean_logits"),
                                            data.dataset.num_classes, [32, 32], root / "c_window")
    target = cache.ensure(data.train[:1], [network], mode="2d", in_channels=1)[0]
    image = data.train[0].load_image()
    assert image.shape[-1] > 32  # several windows per slice
    predicted = predict_probabilities(network, image, mode="2d", patch_size=[32, 32])
    np.testing.assert_allclose(torch.softmax(torch.tensor(target.full()), dim=0).numpy(), predicted.numpy(),
                               atol=2e-3)
