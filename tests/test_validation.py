"""Configurable library objects refuse a wrong type or an out-of-range value when built, naming
the field and what it accepts (shine.validation.check_fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from shine.backward import IFT, BroydenAdjoint, Fallback, JacobianFree, Refine, Shine
from shine.bilevel import HOAG, GridSearch, Scheduled, ToleranceSchedule
from shine.solvers import LBFGS, AdjointBroyden, Anderson, Broyden, FixedPoint
from shine.solvers.linear import ConjugateGradient
from shine.validation import check_fields

BAD = [
    # (constructor, exception, message)
    (lambda: Broyden(max_iter="abc"), TypeError, "Broyden.max_iter must be int, got 'abc'"),
    (lambda: Broyden(max_iter=True), TypeError, "Broyden.max_iter must be int"),
    (lambda: Broyden(tol=-1.0), ValueError, "Broyden.tol must be >= 0.0, got -1.0"),
    (lambda: Broyden(memory=0), ValueError, "Broyden.memory must be >= 1"),
    (lambda: Broyden(memory_policy="lifo"), ValueError, "one of 'fifo', 'restart', 'freeze'"),
    (lambda: Broyden(line_search="yes"), TypeError, "Broyden.line_search must be bool"),
    (lambda: AdjointBroyden(opa_every=0), ValueError, "AdjointBroyden.opa_every must be >= 1"),
    (lambda: AdjointBroyden(opa_orientation="paper"), ValueError, "'transpose', 'as_is'"),
    (lambda: FixedPoint(step="big"), TypeError, "FixedPoint.step must be float"),
    (lambda: Anderson(rel_tol=math.nan), ValueError, "rel_tol"),
    (lambda: ConjugateGradient(tol=-1e-3), ValueError, "ConjugateGradient.tol must be >= 0.0"),
    (lambda: LBFGS(tol=math.nan), ValueError, "LBFGS.tol must be >= 0.0, got nan"),
    (lambda: LBFGS(scale_gamma="true"), TypeError, "LBFGS.scale_gamma must be bool"),
    (lambda: IFT(max_iter=2.5), TypeError, "IFT.max_iter must be int, got 2.5"),
    (lambda: Refine(n_steps="5"), TypeError, "Refine.n_steps must be int"),
    (lambda: BroydenAdjoint(memory="all"), TypeError, "BroydenAdjoint.memory must be int or None"),
    (lambda: Fallback(ratio=-1.0), ValueError, "Fallback.ratio must be >= 0.0, got -1.0"),
    (lambda: Fallback(ratio=math.nan), ValueError, "Fallback.ratio must be >= 0.0, got nan"),
    (
        lambda: JacobianFree(scale="minus one"),
        TypeError,
        "scale must be float or None",
    ),
    (lambda: HOAG(backward=Shine(), max_iter="29"), TypeError, "HOAG.max_iter must be int"),
    (lambda: HOAG(backward=Shine(), step_c=0.0), ValueError, "HOAG.step_c must be > 0"),
    (lambda: HOAG(backward=Shine(), inner_memory="forget"), ValueError, "'restart', 'keep'"),
    (lambda: ToleranceSchedule(initial=-1.0), ValueError, "ToleranceSchedule.initial must be > 0"),
    (lambda: Scheduled(IFT(), min_steps=-1), ValueError, "Scheduled.min_steps must be >= 0"),
    (lambda: GridSearch(n_points="10"), TypeError, "GridSearch.n_points must be int"),
]


@pytest.mark.parametrize(("build", "error", "message"), BAD)
def test_a_bad_field_is_refused_when_built_naming_it(build, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        build()


def test_valid_values_of_every_kind_are_accepted():
    # an int where a float is annotated, a tensor tolerance, None where optional, inf ratios
    Broyden(tol=torch.full((3,), 1e-6), h0=-1)
    Fallback(ratio=math.inf)
    BroydenAdjoint(memory=None, initial_matrix="forward")
    LBFGS(tol=0, rel_tol=0, opa_every=None)
    HOAG(backward=Scheduled(IFT(solver=BroydenAdjoint())), lambda0=-3)


def test_check_fields_reads_the_annotations():
    @dataclass(frozen=True)
    class Knob:
        n: int = 1
        x: float = 0.5
        kind: Literal["a", "b"] = "a"
        label: str | None = None

        def __post_init__(self) -> None:
            check_fields(self, minimum={"n": 1}, positive=("x",))

    Knob(n=3, x=2, kind="b", label="ok")
    with pytest.raises(ValueError, match="Knob.n must be >= 1, got 0"):
        Knob(n=0)
    with pytest.raises(ValueError, match="Knob.x must be > 0"):
        Knob(x=-0.5)
    with pytest.raises(ValueError, match="Knob.kind must be one of 'a', 'b', got 'c'"):
        Knob(kind="c")
    with pytest.raises(TypeError, match=r"Knob.label must be str or None, got 3 \(int\)"):
        Knob(label=3)
