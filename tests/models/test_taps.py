"""Tests for medkd.models.taps: forward-hook feature taps and automatic stage discovery."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from medkd.models import create
from medkd.models.inspection import format_tappable, inspect_model
from medkd.models.stages import discover_stages, stage_channels
from medkd.models.taps import FeatureTaps, TapNotFoundError
from medkd.models.tracing import list_tappable

MODELS = ["attentionunet", "basicunet", "dynunet", "nnunet", "segresnet", "unet"]
SIZE = {2: 64, 3: 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: one intra-op thread is faster and immune to oversubscription on busy CPUs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def _stages(name: str, dims: int, preset: str) -> dict[str, list[str]]:
    torch.manual_seed(0)
    return discover_stages(create(name, dims, 1, 4, preset=preset), dims, 1)


@functools.lru_cache(maxsize=None)
def _rows(name: str, dims: int, preset: str) -> dict[str, dict]:
    torch.manual_seed(0)
    model = create(name, dims, 1, 4, preset=preset)
    return {r["name"]: r for r in list_tappable(model, (1, 1) + (SIZE[dims],) * dims)}


def _all(stages: dict[str, list[str]]) -> list[str]:
    return stages["encoder"] + stages["bottleneck"] + stages["decoder"]


class Toy(nn.Module):
    """conv -> pair (tuple output) -> conv head; ``unused`` never runs."""

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            return x * 2, 7

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.pair = Toy.Pair()
        self.head = nn.Conv2d(3, 2, 1)
        self.unused = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.pair(self.stem(x))
        return self.head(y)


# ----------------------------------------------------------------------------- FeatureTaps


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("dims", "preset"), [(2, "teacher"), (3, "student")], ids=["2d-teacher", "3d-student"])
def test_taps_capture_stage_shapes(name, dims, preset):
    torch.manual_seed(0)
    model = create(name, dims, 1, 4, preset=preset).eval()
    size = SIZE[dims]
    names = _all(_stages(name, dims, preset))
    rows = _rows(name, dims, preset)
    x = torch.randn(1, 1, *(size,) * dims)
    with FeatureTaps(model, names) as taps, torch.no_grad():
        y = model(x)
        feats = taps.get()
    assert y.shape == (1, 4) + (size,) * dims
    assert set(taps.features) == set(names)
    for n, f in zip(names, feats):
        row = rows[n]
        assert f.shape == (1, *row["shape"]), n
        assert f.shape[1] == row["channels"]
        assert tuple(size // s for s in row["stride"]) == tuple(f.shape[2:]), n


def test_tuple_output_takes_first_tensor_and_root_tap():
    model = Toy()
    x = torch.randn(1, 1, 8, 8)
    with FeatureTaps(model, ["pair", "stem", ""]) as taps:
        out = model(x)
    pair, stem, root = taps.get()
    assert torch.equal(pair, stem * 2)
    assert root is out
    assert taps.get(["stem"])[0] is stem  # subset, in the requested order


def test_features_refresh_each_forward():
    model = Toy()
    taps = FeatureTaps(model, ["stem", "head"])
    model(torch.zeros(1, 1, 8, 8))
    first = taps.features
    first_stem = first["stem"]
    model(torch.ones(1, 1, 8, 8))
    assert taps.features is not first  # a fresh dict per forward of the root model
    assert first["stem"] is first_stem  # older captures are not overwritten
    assert not torch.equal(taps.features["stem"], first_stem)
    # a forward of a submodule alone does not reset the dict of the root
    second = taps.features
    model.head(torch.ones(1, 3, 8, 8))
    assert taps.features is second
    taps.remove()


def test_remove_detaches_all_hooks():
    model = Toy()
    before = (dict(model._forward_pre_hooks), dict(model.stem._forward_hooks))
    taps = FeatureTaps(model, ["stem", "pair"])
    model(torch.randn(1, 1, 8, 8))
    captured = dict(taps.features)
    taps.remove()
    assert not taps.active
    model(torch.randn(1, 1, 8, 8))
    assert taps.features == captured  # nothing captured after remove()
    assert all(taps.features[k] is v for k, v in captured.items())
    assert (dict(model._forward_pre_hooks), dict(model.stem._forward_hooks)) == before
    taps.remove()  # idempotent
    with FeatureTaps(model, ["stem"]) as ctx:
        model(torch.randn(1, 1, 8, 8))
        assert "stem" in ctx.features
    assert not model.stem._forward_hooks and not model._forward_pre_hooks


def test_unknown_name_lists_suggestions():
    model = create("unet", 2, 1, 4, preset="student")
    with pytest.raises(KeyError) as err:
        FeatureTaps(model, ["model.1.submodul.0"])
    msg = str(err.value)
    assert isinstance(err.value, TapNotFoundError)
    assert "model.1.submodule.0" in msg and "inspect-model" in msg
    with pytest.raises(KeyError, match="inspect-model"):
        stage_channels(model, ["nope"], 2, 1)


def test_bad_names_and_missing_taps():
    model = Toy()
    with pytest.raises(ValueError, match="more than once"):
        FeatureTaps(model, ["stem", "stem"])
    with pytest.raises(ValueError, match="at least one"):
        FeatureTaps(model, [])
    taps = FeatureTaps(model, ["stem", "unused"])
    with pytest.raises(RuntimeError, match="forward"):
        taps.get()  # no forward yet
    model(torch.randn(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match=r"\['unused'\]"):
        taps.get()
    assert taps.get(["stem"])[0].shape == (1, 3, 8, 8)
    with pytest.raises(KeyError, match="Not tapped"):
        taps.get(["head"])
    taps.remove()


def test_detach_true_gives_tensors_without_grad():
    model = create("basicunet", 2, 1, 4, preset="student")
    with FeatureTaps(model, ["down_2", "upcat_2"], detach=True) as taps:
        model(torch.randn(1, 1, 32, 32))
    for f in taps.get():
        assert not f.requires_grad and f.grad_fn is None


def test_gradients_flow_through_captured_features():
    torch.manual_seed(0)
    model = create("unet", 2, 1, 4, preset="student")
    name = _stages("unet", 2, "student")["bottleneck"][0]
    with FeatureTaps(model, [name]) as taps:
        model(torch.randn(1, 1, 32, 32))
    (feat,) = taps.get()
    assert feat.requires_grad
    feat.pow(2).mean().backward()
    first = model.model[0].conv.unit0.conv.weight  # the first encoder convolution
    assert first.grad is not None and first.grad.abs().sum() > 0
    head = model.model[2][0].conv.weight  # the last up-convolution comes after the tap
    assert head.grad is None


# ----------------------------------------------------------------------------- inspection


def test_list_tappable_rows_and_mode_restored():
    model = create("dynunet", 2, 1, 4, preset="student").train()
    model.bottleneck.eval()  # mixed modes are restored module by module
    rows = list_tappable(model, (1, 1, 32, 32))
    assert model.training and not model.bottleneck.training and model.input_block.training
    assert all(set(r) == {"name", "type", "shape", "channels", "stride"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["input_block"]["stride"] == (1, 1)
    assert by_name["bottleneck"]["stride"] == (16, 16)
    assert by_name["bottleneck"]["shape"] == (40, 2, 2) and by_name["bottleneck"]["channels"] == 40
    assert by_name["bottleneck"]["type"] == "UnetBasicBlock"
    assert "" not in by_name
    # completion order: a block comes after its children
    order = [r["name"] for r in rows]
    assert order.index("bottleneck.conv1") < order.index("bottleneck")
    with pytest.raises(ValueError, match="input_shape"):
        list_tappable(model, (32, 32))
    with pytest.raises(RuntimeError, match="failed"):
        list_tappable(model, (1, 3, 32, 32))  # wrong number of channels


def test_list_tappable_non_integer_stride():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Upsample(scale_factor=4.0))
    rows = list_tappable(model, (1, 1, 10, 10))
    assert rows[0]["stride"] == (round(10 / 4, 6),) * 2  # 10 -> 4: a float stride
    assert rows[1]["stride"] == (round(10 / 16, 6),) * 2


def test_format_tappable_and_inspect_model():
    rows, stages = inspect_model("unet", preset="student")
    assert rows and set(stages) == {"encoder", "bottleneck", "decoder"}
    assert stages == _stages("unet", 2, "student")
    table = format_tappable(rows, stages)
    assert isinstance(table, Table) and table.row_count == len(rows)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "bottleneck" in text and "encoder[0]" in text and "decoder[2]" in text
    assert format_tappable(rows).row_count == len(rows)


# ----------------------------------------------------------------------------- stage discovery


def _strides(rows: dict[str, dict], names: list[str]) -> list[int]:
    return [math.prod(rows[n]["stride"]) for n in names]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dims", [2, 3])
def test_discover_stages_structure(name, dims):
    preset = "teacher" if dims == 2 else "student"
    stages = _stages(name, dims, preset)
    enc, bott, dec = stages["encoder"], stages["bottleneck"], stages["decoder"]
    assert len(enc) >= 3 and len(bott) == 1 and len(dec) >= 3, stages
    assert len(set(_all(stages))) == len(_all(stages))  # distinct modules
    rows = _rows(name, dims, preset)
    enc_s, (bott_s,), dec_s = (_strides(rows, n) for n in (enc, bott, dec))
    assert all(a < b for a, b in zip(enc_s, enc_s[1:])), enc_s  # strictly decreasing resolution
    assert enc_s[-1] < bott_s
    assert bott_s > dec_s[0] and all(a > b for a, b in zip(dec_s, dec_s[1:])), dec_s  # increasing
    assert set(dec_s) <= set(enc_s)  # decoder levels mirror encoder levels


@pytest.mark.parametrize("name", MODELS)
def test_teacher_and_student_share_stage_names(name):
    assert _stages(name, 2, "teacher") == _stages(name, 2, "student")
    # 3D: a half-width model stands in for the (slower) teacher, same rule
    half = discover_stages(create(name, 3, 1, 4, shrink=2), 3, 1)
    assert half == _stages(name, 3, "student")


@pytest.mark.parametrize("name", MODELS)
def test_stage_channels_student_narrower(name):
    names = _all(_stages(name, 2, "teacher"))
    teacher = stage_channels(create(name, 2, 1, 4), names, 2, 1, input_size=32)
    student = stage_channels(create(name, 2, 1, 4, preset="student"), names, 2, 1, input_size=32)
    assert len(teacher) == len(student) == len(names)
    assert all(s < t for s, t in zip(student, teacher)), (student, teacher)


def test_discover_stages_ignores_deep_supervision_heads_and_modes():
    plain = _stages("dynunet", 2, "teacher")
    model = create("dynunet", 2, 1, 4, preset="student", deep_supervision=True).train()
    assert discover_stages(model, 2, 1) == plain
    assert model.training


def test_discover_stages_errors():
    flat = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="downsample"):
        discover_stages(flat, 2, 1)
    model = create("unet", 2, 1, 4, preset="student")
    with pytest.raises(ValueError, match="input_size"):
        discover_stages(model, 2, 1, input_size=(32, 32, 32))
    with pytest.raises(RuntimeError, match="failed"):
        discover_stages(model, 2, 1, input_size=30)
