"""Every shipped recipe resumes exactly: killed after step k and resumed, a distillation run ends with the
student weights and the ``extra_state`` (adapters, heads, balancer) of an uninterrupted run, bit for bit.

The uninterrupted run meets a cold cache (it preprocesses the cases and, for cached recipes, computes the
teacher outputs); the resumed run finds both caches filled, as a real resume does. The killed run is a
copy of the uninterrupted run's folder taken right after its step-k checkpoint: all that a run killed
after step k leaves for ``--resume`` (its ``config.yaml`` and ``last.pt``), one training run cheaper than
killing a second run. Not a smaller ``max_steps``: the poly learning-rate schedule depends on the step
budget, so a run stopped by ``max_steps=k`` is not the first k steps of an ``n``-step run.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from medkd.config import build_config
from medkd.engine.trainer import train
from medkd.recipes import list_recipes, load_recipe
from medkd.storage import load_checkpoint
from medkd.teachers.manifest import TeacherMember, TeacherSet

SET_RECIPES = ("adaptive-multi-teacher", "ensemble-kd")  # learn from a teacher set (val_dice / mean of members)
THREADS = 2  # every run starts with this many intra-op threads, as separate processes on one machine would


@pytest.fixture(scope="module")
def teachers(phantoms_2d, tiny_teachers, tmp_path_factory):
    """Two tiny teachers (wider than the student, so feature terms get adapters) and their set."""
    root = tmp_path_factory.mktemp("resume_teachers")
    runs = tiny_teachers(phantoms_2d, root, root / "cache", seeds=(1, 2), shrink=2, batch_size=2)
    members = [TeacherMember(run.name, run / "last.pt", val_dice=0.5 + 0.1 * seed)
               for seed, run in zip((1, 2), runs)]
    labels = dict(load_checkpoint(members[0].checkpoint)["labels"])
    TeacherSet("uniform", members, labels, root / "set" / "teachers.json").save(root / "set")
    return root


@pytest.fixture
def pinned_threads():
    """Restores the process's intra-op thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def distill_config(phantoms_2d, tiny_config, teachers, recipe: dict, cache):
    tree = tiny_config(phantoms_2d, cache, max_steps=4, checkpoint_every=2, lr=0.01)
    tree["data"]["batch_size"] = 2
    teacher = teachers / "set" if recipe["name"] in SET_RECIPES else teachers / "t1" / "last.pt"
    tree["distill"] = {"teacher": str(teacher), "recipe": recipe}
    return build_config(tree)


def assert_same_state(full: dict, cut: dict) -> None:
    """Student weights and every ``extra_state`` entry bit-identical (else: which, and how far apart)."""
    assert cut["step"] == full["step"]
    for part in ("state_dict", "extra_state"):
        assert set(full[part]) == set(cut[part]), part
        for key, value in full[part].items():
            if not torch.equal(value, cut[part][key]):
                diff = (value.double() - cut[part][key].double()).norm() / value.double().norm().clamp_min(1e-12)
                pytest.fail(f"{part}.{key} differs after resume: relative L2 {float(diff):.2e}")


class SnapshotAt:
    """Trainer callback: copies the run folder after step ``step`` (after that step's checkpoint)."""

    def __init__(self, step: int, dest):
        self.step, self.dest = step, dest

    def on_step_end(self, trainer, step, terms):
        if step == self.step:
            shutil.copytree(trainer.run_dir, self.dest)


def kill_and_resume_matches(cfg, run_root) -> None:
    """Uninterrupted 4 steps vs the folder as it stood at step 2 (its last.pt) resumed: the same state."""
    torch.set_num_threads(THREADS)
    train(cfg, run_root / "full", callbacks=[SnapshotAt(2, run_root / "cut")])
    assert load_checkpoint(run_root / "cut" / "last.pt")["step"] == 2
    torch.set_num_threads(THREADS)
    train(None, run_root / "cut", resume=True)
    assert_same_state(load_checkpoint(run_root / "full" / "last.pt"), load_checkpoint(run_root / "cut" / "last.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_resumes_bit_identically(recipe, phantoms_2d, tiny_config, teachers, tmp_path,
                                                      pinned_threads):
    spec = load_recipe(recipe).model_dump(mode="json")
    kill_and_resume_matches(distill_config(phantoms_2d, tiny_config, teachers, spec, tmp_path / "cache"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 5], ids=["global-rng", "own-generator"])
def test_contrastive_voxel_sampling_resumes_bit_identically(seed, phantoms_2d, tiny_config, teachers, tmp_path,
                                                            pinned_threads):
    """mtms-contrastive with fewer samples per class than voxels, so the sampling really draws."""
    spec = load_recipe("mtms-contrastive").model_dump(mode="json")
    spec["terms"]["contrastive"]["taps"] = "encoder"
    spec["terms"]["contrastive"]["options"].update(samples_per_class=3, seed=seed)
    kill_and_resume_matches(distill_config(phantoms_2d, tiny_config, teachers, spec, tmp_path / "cache"), tmp_path)
