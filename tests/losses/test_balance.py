"""Automatic term balancing: moving averages against a float64 reference, no gradient through the factor."""

from __future__ import annotations

import pytest
import torch

from medkd.config import ConfigError
from medkd.engine.distill import Distiller
from medkd.losses.balance import TermBalancer
from medkd.models import create
from medkd.recipes import load_recipe, recipe_from_dict


def test_scale_follows_the_moving_averages_of_a_float64_reference():
    balancer = TermBalancer(["kl"], momentum=0.9).train()
    sup_values, kl_values = [2.0, 1.5, 1.0, 0.8], [0.02, 0.05, 0.04, 0.01]
    a = b = None
    for sup, kl in zip(sup_values, kl_values):
        balancer.observe_supervised(torch.tensor(sup))
        scale = balancer.scale("kl", torch.tensor(kl))
        a = sup if a is None else 0.9 * a + 0.1 * sup
        b = kl if b is None else 0.9 * b + 0.1 * kl
        assert float(scale) == pytest.approx(a / b, rel=1e-6)
    balancer.eval()  # evaluation never moves the averages
    assert float(balancer.scale("kl", torch.tensor(100.0))) == pytest.approx(a / b, rel=1e-6)


def test_state_is_keyed_by_name_whatever_order_the_terms_come_in():
    """A resumed run rebuilds its recipe from the stored config, whose terms may come in another order."""
    first = TermBalancer(["ms_sard", "ms_ca"]).train()
    first.observe_supervised(torch.tensor(1.0))
    first.scale("ms_sard", torch.tensor(4.0))
    first.scale("ms_ca", torch.tensor(0.5))
    resumed = TermBalancer(["ms_ca", "ms_sard"])
    resumed.load_state_dict(first.state_dict())
    assert float(resumed.scale("ms_sard", torch.tensor(4.0))) == pytest.approx(0.25)
    assert float(resumed.scale("ms_ca", torch.tensor(0.5))) == pytest.approx(2.0)


def test_the_factor_carries_no_gradient():
    balancer = TermBalancer(["f"]).train()
    balancer.observe_supervised(torch.tensor(1.0))
    x = torch.tensor([3.0], requires_grad=True)
    raw = (x ** 2).sum()
    scaled = balancer.scale("f", raw) * raw
    (grad,) = torch.autograd.grad(scaled, x)
    assert torch.allclose(grad, (1.0 / 9.0) * 2 * x.detach())  # factor a/b = 1/9 times d(x^2)/dx


def test_balanced_term_matches_weight_times_supervised_and_is_checkpointed():
    spec = load_recipe("logit-kd").model_dump(mode="json")
    spec["terms"]["kl"].update(balance=True, weight=0.5)
    torch.manual_seed(0)
    distiller = Distiller(create("unet", 2, 1, 3, preset="student"), create("unet", 2, 1, 3, preset="teacher", shrink=3),
                          recipe_from_dict(spec), spatial_dims=2, in_channels=1, num_classes=3).train()
    label = torch.zeros((2, 1, 32, 32), dtype=torch.long)
    label[..., 4:12, 4:12] = 1
    terms = distiller({"image": torch.randn(2, 1, 32, 32), "label": label})
    assert float(terms["kl"]) == pytest.approx(0.5 * float(terms["seg"]), rel=1e-5)  # first step: exact
    state = distiller.extra_modules().state_dict()
    assert {"_balance.supervised", "_balance.terms", "_balance.seen"} <= set(state)
    with pytest.raises(ConfigError, match="may not start with '_'"):
        recipe_from_dict({**spec, "terms": {"_x": spec["terms"]["kl"]}})
