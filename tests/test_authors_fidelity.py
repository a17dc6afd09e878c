"""Faithful mode against the authors' own code, run on the same data.

The fixtures ``fixtures/authors_hoag/{synthetic_news_small,breast_cancer}.json`` hold the
log-regularisation trajectories of the authors' ``hoag_lbfgs`` (their HOAG fork, see each
fixture's ``code`` and ``environment`` entries and ``fixtures/authors_hoag/README.md``) on
``synthetic_news_small`` (split seeds 0-4) and ``breast_cancer_split`` (seeds 0-9, where HOAG
rejects steps), for every scheme of their Figures 1, E.1 and 2 left. ``method.mode=faithful``
with the authors' split (``dataset.outer_half=second``) must follow them step for step, and each
behaviour of the faithful preset, switched off alone, must visibly leave them: a test that a
faithful mode without the quirk would fail.

Trajectories are chaotic (the outer step rule amplifies rounding differences between NumPy /
SciPy and PyTorch products), so each scheme is compared over the steps where the two codes
agree to better than 1e-4 on every seed (measured), with a 1e-3 bound.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from train import compose_task

FIXTURES = Path(__file__).parent / "fixtures" / "authors_hoag"
SEEDS = range(5)
KEEP = ["method.inner_memory=keep"]  # the authors' pure-Python L-BFGS (Figure 2 left)


@cache
def authors(data: str = "synthetic_news_small") -> dict:
    """A fixture's runs: ``{scheme: {seed: {"log_lambda": [...], ...}}}``."""
    return json.loads((FIXTURES / f"{data}.json").read_text())["runs"]


@cache
def run(
    method: str, overrides: tuple[str, ...], seed: int, steps: int, data: str
) -> tuple[np.ndarray, int]:
    """``log λ`` of our run at the initial point and after each of ``steps`` outer steps, and
    the number of rejected steps."""
    task = compose_task(
        [f"+experiment={data}", f"method={method}", f"seed={seed}", "dataset.outer_half=second"]
        + list(overrides)
    )
    problem, w0 = task.build()
    stepper = task.method.stepper(problem, w0)
    lam = [float(stepper.lam.min())]
    rejected = 0
    for _ in range(steps):
        metrics = stepper.step()
        lam.append(metrics["log_lambda"][0])
        rejected += bool(metrics["rejected"])
    return np.array(lam), rejected


def deviation(
    scheme: str,
    method: str,
    overrides: list[str],
    seed: int,
    steps: int,
    data: str = "synthetic_news_small",
) -> float:
    """Largest ``|Δ log λ|`` between the authors' scheme and our run over ``steps`` steps."""
    ours, _ = run(method, tuple(overrides), seed, steps, data)
    theirs = np.array(authors(data)[scheme][str(seed)]["log_lambda"][: steps + 1])
    return float(np.abs(ours - theirs).max())


# (authors' scheme, our method, overrides, steps over which every seed agrees to < 1e-4)
FAITHFUL = [
    ("fpn", "jacobian_free", [], 29),
    ("original", "hoag", [], 7),
    ("truncated-inversion", "hoag_limited", [], 20),
    ("shine-big-rank", "shine", [], 14),
    ("shine-big-rank-refined", "shine_refine", [], 14),
    ("pure-python", "hoag", KEEP, 6),
    ("shine-big-rank-pp", "shine", KEEP, 3),
    ("shine-big-rank-opa", "shine_opa", KEEP, 3),
]


@pytest.mark.parametrize(("scheme", "method", "overrides", "steps"), FAITHFUL, ids=lambda v: v)
def test_faithful_mode_follows_the_authors_code(scheme, method, overrides, steps):
    for seed in SEEDS:
        assert deviation(scheme, method, overrides, seed, steps) < 1e-3, seed


@pytest.mark.parametrize("seed", [2, 4, 5, 7, 9])
def test_faithful_hoag_follows_the_authors_code_through_rejected_steps(seed):
    # breast cancer: the authors' HOAG rejects two steps on each of these seeds, after which
    # their "lambda0" stays frozen at the first rejected trial value; the whole run agrees
    assert deviation("original", "hoag", [], seed, 29, data="breast_cancer") < 1e-3
    assert run("hoag", (), seed, 29, "breast_cancer")[1] == 2


def test_fixture_is_the_authors_split_and_initial_point():
    # the authors' w0 (np.random.seed(seed); randn) and their outer half give the same first
    # held-out loss as ours: the data, split and initial point are theirs
    fixture = authors()["fpn"]
    for seed in (0, 3):
        task = compose_task(
            ["+experiment=synthetic_news_small", "method=jacobian_free", f"seed={seed}"]
            + ["dataset.outer_half=second"]
        )
        problem, w0 = task.build()
        held_out = float(problem.test.loss(w0))
        outer = float(problem.outer.loss(w0))
        assert held_out == pytest.approx(fixture[str(seed)]["heldout_loss"][0], rel=1e-10)
        assert outer == pytest.approx(fixture[str(seed)]["outer_loss"][0], rel=1e-10)


# each behaviour of the faithful preset switched off alone (6 steps, 3 seeds): the run leaves
# the authors' trajectory by more than 20x the faithful bound on at least one seed
QUIRKS = [
    # 1. the inner tolerance reads the current lambda (their lambda0 aliases the iterate)
    ("shine-big-rank", "shine", ["method.tolerance_reference=initial"]),
    ("original", "hoag", ["method.tolerance_reference=initial"]),
    # 2. their SHINE estimate: SciPy's LbfgsInvHessProduct on the L-BFGS-B workspace
    ("shine-big-rank", "shine", ["method.estimate=solver"]),
    # 3. their outer set is the second half of the held-out remainder
    ("shine-big-rank", "shine", ["dataset.outer_half=first"]),
    # 4. their initial inner weights
    ("shine-big-rank", "shine", ["task.initial_weights=torch"]),
    # 5. their L-BFGS-B driver tests the tolerance at every evaluation; and it is L-BFGS-B
    ("shine-big-rank", "shine", ["method.inner_stop_test=iterates"]),
    ("shine-big-rank", "shine", ["method.inner_solver=solver"]),
    # their pure-Python L-BFGS settings and OPA countdown (Figure 2 left)
    ("pure-python", "hoag", [*KEEP, "method.inner_solver=solver"]),
    ("shine-big-rank-opa", "shine_opa", [*KEEP, "method.opa_schedule=fixed"]),
]


@pytest.mark.parametrize(("scheme", "method", "overrides"), QUIRKS, ids=lambda v: v)
def test_each_quirk_of_the_faithful_preset_matters(scheme, method, overrides):
    # overrides are applied after outer_half=second, so outer_half=first wins
    devs = [deviation(scheme, method, overrides, seed, 6) for seed in range(3)]
    assert max(devs) > 2e-2, devs


@pytest.mark.slow
@pytest.mark.parametrize(("method", "seed"), [("shine", 0), ("hoag", 1), ("jacobian_free", 2)])
def test_faithful_mode_follows_the_authors_code_on_the_20news_sized_set(method, seed):
    # experiments/authors_code: their hoag_lbfgs on synthetic_news (18 000 x 100 000), 10 seeds
    import csv

    table = Path(__file__).parents[1] / "experiments" / "authors_code" / "fig_e1" / "runs.csv"
    with table.open(newline="") as fh:
        theirs = [
            float(r["log_lambda"])
            for r in csv.DictReader(fh)
            if r["method"] == method and int(r["seed"]) == seed
        ]
    assert len(theirs) == 30
    ours, _ = run(method, (), seed, 29, "synthetic_news")
    assert float(np.abs(ours - np.array(theirs)).max()) < 1e-3
