"""shine.analysis.methods: the one registry of method labels, colours, markers and families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shine.analysis import methods
from shine.harness.tasks.step_timing import timed_training_step

ROOT = Path(__file__).resolve().parents[1]
BILEVEL = ("hoag", "hoag_limited", "shine", "shine_refine", "shine_opa", "jacobian_free")
BILEVEL += ("grid_search", "random_search")
DEQ = ("original", "original_limited", "jacobian_free", "jacobian_free_refine", "shine")
DEQ += ("shine_refine", "shine_fallback", "shine_adjoint_broyden", "shine_opa")


@pytest.mark.parametrize("name", sorted(set(BILEVEL + DEQ)))
def test_every_method_of_the_paper_has_a_label_colour_and_family(name):
    entry = methods.METHODS[name]
    assert entry.label and entry.color and entry.family in methods.METHODS


def test_every_method_config_is_in_the_registry():
    # `none` is the default of experiments that take no method
    configs = {p.stem for p in (ROOT / "configs" / "method").glob("*.yaml")} - {"none"}
    assert configs, "no configs/method/*.yaml"
    assert configs <= set(methods.METHODS), sorted(configs - set(methods.METHODS))


def test_each_half_keeps_its_labels():
    assert methods.label("shine", methods.BILEVEL) == "SHINE (ours)"
    assert methods.label("shine", methods.DEQ) == "SHINE"
    assert methods.label("shine_refine", methods.BILEVEL) == "SHINE refine (ours)"
    assert methods.label("shine_opa", methods.BILEVEL) == "SHINE-OPA (ours)"
    assert methods.label("shine_opa", methods.DEQ) == "SHINE (adj. Broyden/OPA)"
    assert methods.label("jacobian_free", methods.BILEVEL) == "Jacobian-Free"
    assert methods.label("jacobian_free", methods.DEQ) == "Jacobian-Free"
    assert methods.label("hoag") == "HOAG"


def test_variants_belong_to_their_family():
    assert methods.family_of("shine_refine") == "shine"
    assert methods.family_of("original_limited") == "original"
    assert methods.family_of("jacobian_free_refine") == "jacobian_free"
    assert methods.family_of("hoag_limited") == "hoag"
    assert methods.family_of("shine_fallback") == "shine_fallback"
    assert set(methods.DEQ_FAMILIES) <= set(methods.METHODS)
    for family in methods.DEQ_FAMILIES:
        assert methods.family_of(family) == family


def test_an_unknown_method_gets_its_name_and_a_neutral_colour():
    entry = methods.method("my_new_method_refine")
    assert entry.label == "my_new_method_refine"
    assert entry.color == methods.NEUTRAL_COLOR
    assert entry.marker == methods.NEUTRAL_MARKER
    assert entry.family == "my_new_method"
    assert methods.label("nope", methods.BILEVEL) == "nope"
    assert methods.color("nope") == methods.NEUTRAL_COLOR


def test_the_registry_is_read_only():
    with pytest.raises(TypeError):
        methods.METHODS["x"] = methods.method("x")  # type: ignore[index]


class _Toy(nn.Module):
    """A classifier with the interface the timing protocol needs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.last_backward_time = 0.25

    def forward(self, x, targets=None, generator=None):
        return self.lin(x)


def test_timed_training_step_times_forward_and_each_backward():
    torch.manual_seed(0)
    model = _Toy()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    started = []
    cpu = torch.device("cpu")
    step = timed_training_step(model, x, y, None, cpu, 3, lambda: started.append(1))
    assert started == [1]
    assert step.forward_s >= 0 and len(step.backward_s) == 3 and min(step.backward_s) >= 0
    assert step.implicit_s == [0.25] * 3
    assert not step.loss.requires_grad
    assert model.lin.weight.grad is not None  # the last backward's gradients are kept
    with pytest.raises(ValueError, match="backward_repeats"):
        timed_training_step(model, x, y, None, cpu, 0)
