"""Grid / random search baselines and the named inner problems, on exact numbers.

``GridSearch`` candidates are the float64 ``linspace``; ``RandomSearch`` draws them as the
authors did (``RandomState(seed).uniform``) in faithful mode and from a torch generator seeded
with ``derived_seed(seed, 7919)`` in robust mode. ``SearchStepper`` is driven through a config
whose inner solver records each call (its tolerance, start point and result), so the warm start,
the relative tolerance and every field of the step record are checked against what was run.
``L2LogisticRegression`` / ``L2NonlinearLeastSquares`` are compared with hand-written formulas.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_bilevel import make_problem

from shine.bilevel import GridSearch, RandomSearch
from shine.bilevel.problems import L2LogisticRegression, L2NonlinearLeastSquares
from shine.bilevel.search import SearchStepper
from shine.rng import derived_seed
from shine.solvers.lbfgs import LBFGS
from shine.solvers.scipy_lbfgsb import ScipyLBFGSB

DT = torch.float64
RECORD_KEYS = {
    "candidate_log_lambda",
    "candidate_outer_loss",
    "outer_loss",
    "improved",
    "inner_iters",
    "inner_evals",
    "inner_time",
    "backward_time",
    "log_lambda",
}


@dataclass(frozen=True)
class RecordingGrid(GridSearch):
    """A GridSearch whose inner solves are logged in ``calls`` (tol, start, result)."""

    def inner_solver(self, tol):
        solver = super().inner_solver(tol)

        def run(objective, start):
            res = solver(objective, start)
            CALLS.append((tol, start.clone(), res))
            return res

        return run


CALLS: list = []


@pytest.fixture
def calls():
    CALLS.clear()
    yield CALLS
    CALLS.clear()


# ---------------------------------------------------------------------------- candidates
def test_grid_candidates_are_the_float64_linspace():
    grid = GridSearch(n_points=4, low=-1.0, high=0.3)
    got = grid.candidates(0)
    assert got == pytest.approx(np.linspace(-1.0, 0.3, 4).tolist(), rel=0, abs=1e-15)
    assert got != pytest.approx(torch.linspace(-1.0, 0.3, 4).tolist(), rel=0, abs=1e-12)  # float32
    assert got[0] == -1.0 and got[-1] == 0.3 and all(type(v) is float for v in got)
    assert GridSearch(n_points=1, low=0.25, high=1.0).candidates(5) == [0.25]


def test_random_candidates_faithful_are_the_authors_numpy_draws():
    rnd = RandomSearch(n_points=6, low=-3.0, high=5.0)
    for seed in (0, 3):
        expected = np.random.RandomState(seed).uniform(-3.0, 5.0, 6)
        got = rnd.candidates(seed)
        assert got == [float(v) for v in expected]
        assert all(type(v) is float for v in got)


def test_random_candidates_robust_are_the_seeded_torch_draws():
    rnd = RandomSearch(n_points=6, low=-3.0, high=5.0, mode="robust")
    for seed in (0, 3):
        gen = torch.Generator().manual_seed(derived_seed(seed, 7919))
        draws = torch.rand(6, generator=gen, dtype=DT)
        expected = (-3.0 + 8.0 * draws).tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the global generator must not matter
            assert rnd.candidates(seed) == expected
    assert rnd.candidates(0) != RandomSearch(n_points=6, low=-3.0, high=5.0).candidates(0)
    assert len(rnd.candidates(1)) == 6
    assert all(-3.0 <= v <= 5.0 for v in rnd.candidates(1))


def test_stepper_default_seed_is_zero():
    problem = make_problem()
    w0 = torch.zeros(10, dtype=DT)
    for mode in ("faithful", "robust"):
        rnd = RandomSearch(n_points=3, mode=mode)
        assert rnd.stepper(problem, w0).candidates == rnd.candidates(0)
        assert rnd.stepper(problem, w0, seed=4).candidates == rnd.candidates(4)


# ---------------------------------------------------------------------------- validation
def test_validation_bounds():
    GridSearch(n_points=1, low=0.0, high=1.0)  # a single candidate is allowed
    RandomSearch(n_points=1, low=0.0, high=1.0, mode="robust")
    with pytest.raises(ValueError, match="n_points"):
        GridSearch(n_points=0)
    with pytest.raises(ValueError, match="low < high"):
        GridSearch(low=1.0, high=1.0)
    with pytest.raises(ValueError, match="mode"):
        GridSearch(mode="exact")


# ---------------------------------------------------------------------------- inner solver
def test_inner_solver_of_each_mode():
    base = LBFGS(memory=7, max_iter=33, max_ls=9, tol=0.5, rel_tol=0.25)
    faithful = GridSearch(solver=base).inner_solver(1e-4)
    assert isinstance(faithful, ScipyLBFGSB)
    assert (faithful.max_iter, faithful.tol, faithful.memory, faithful.max_ls) == (33, 1e-4, 7, 9)
    robust = GridSearch(solver=base, mode="robust").inner_solver(2e-5)
    assert isinstance(robust, LBFGS)
    assert robust == LBFGS(memory=7, max_iter=33, max_ls=9, tol=2e-5, rel_tol=0.0)


# ---------------------------------------------------------------------------- stepper
def test_fresh_stepper_state():
    problem = make_problem()
    w0 = torch.linspace(-1, 1, 10, dtype=torch.float32)
    st = GridSearch(n_points=3, low=-2.0, high=2.0).stepper(problem, w0)
    assert st.w0.dtype == DT and st.w.dtype == DT
    assert torch.equal(st.w0, w0.to(DT)) and torch.equal(st.answer_w, w0.to(DT))
    assert st.answer_w is not st.w0 and st.w is not st.w0
    assert st.iteration == 0 and not st.finished
    assert st.lam.dtype == DT and st.lam.shape == () and float(st.lam) == 0.0
    assert st.log_lambda_list() == [0.0]
    assert st.best_loss == math.inf


@pytest.mark.parametrize("mode", ["faithful", "robust"])
def test_step_records_warm_start_and_tolerance(calls, mode):
    problem, inner = make_problem(), make_problem().inner
    w0 = torch.full((10,), 0.1, dtype=DT)
    cfg = RecordingGrid(n_points=3, low=-2.0, high=2.0, rel_tol=1e-2, mode=mode)
    st = cfg.stepper(problem, w0)
    records = []
    for i, lam_value in enumerate([-2.0, 0.0, 2.0]):
        before = st.w.clone()
        t0 = time.perf_counter()
        m = st.step()
        elapsed = time.perf_counter() - t0
        records.append(m)
        tol, start, res = calls[i]
        assert torch.equal(start, before)  # warm start from the previous solution
        lam = torch.tensor(lam_value, dtype=DT)
        expected_tol = 1e-2 * float(torch.linalg.vector_norm(inner.value_and_grad(start, lam)[1]))
        assert tol == pytest.approx(expected_tol, rel=1e-12)
        assert set(m) == RECORD_KEYS
        assert m["candidate_log_lambda"] == lam_value
        loss = float(problem.outer.loss(res.value))
        assert m["candidate_outer_loss"] == loss
        assert m["inner_iters"] == int(res.stats.nstep) and m["inner_evals"] == res.stats.n_evals
        assert isinstance(m["inner_time"], float) and 0.0 <= m["inner_time"] <= elapsed
        assert m["backward_time"] == 0.0
        assert torch.equal(st.w, res.value)
        assert st.iteration == i + 1
    assert [r["improved"] for r in records][0] is True
    best = min(range(3), key=lambda i: records[i]["candidate_outer_loss"])
    assert records[-1]["outer_loss"] == records[best]["candidate_outer_loss"] == st.best_loss
    assert records[-1]["log_lambda"] == [[-2.0, 0.0, 2.0][best]] == st.log_lambda_list()
    assert torch.equal(st.answer_w, calls[best][2].value)
    assert st.finished


def test_cold_start_and_ties_are_not_improvements(calls):
    problem = make_problem()
    w0 = torch.full((10,), 0.1, dtype=DT)
    cfg = RecordingGrid(warm_start=False)
    st = SearchStepper(cfg, problem, w0, [1.0, 1.0, -1.0])
    first, second, third = (st.step() for _ in range(3))
    assert all(torch.equal(start, w0) for _, start, _ in calls)
    assert first["improved"] is True
    assert second["candidate_outer_loss"] == first["candidate_outer_loss"]
    assert second["improved"] is False
    assert second["log_lambda"] == [1.0]
    assert torch.equal(st.w, calls[2][2].value)
    assert third["outer_loss"] == min(first["outer_loss"], third["candidate_outer_loss"])


def test_state_dict_round_trip():
    problem = make_problem()
    w0 = torch.zeros(10, dtype=DT)
    cfg = GridSearch(n_points=4, low=-3.0, high=3.0, mode="robust")
    st = cfg.stepper(problem, w0)
    st.step(), st.step()
    state = st.state_dict()
    assert set(state) == {"w", "best_w", "best_lam", "best_loss", "iteration", "candidates"}
    fresh = SearchStepper(cfg, problem, w0, [9.0])
    fresh.load_state_dict(state)
    assert fresh.iteration == 2 and fresh.candidates == st.candidates and not fresh.finished
    assert torch.equal(fresh.w, st.w) and torch.equal(fresh.answer_w, st.answer_w)
    assert torch.equal(fresh.lam, st.lam) and fresh.best_loss == st.best_loss
    a, b = st.step(), fresh.step()
    for key in RECORD_KEYS - {"inner_time"}:
        assert a[key] == b[key]

    # every entry is read from its own key and converted
    manual = {
        "w": torch.full((10,), 0.5, dtype=DT),
        "best_w": torch.full((10,), -0.5, dtype=DT),
        "best_lam": torch.tensor(0.75, dtype=DT),
        "best_loss": torch.tensor(1.25, dtype=DT),
        "iteration": torch.tensor(1),
        "candidates": np.array([0.5, 1.5]),
    }
    fresh.load_state_dict(manual)
    assert torch.equal(fresh.w, manual["w"]) and torch.equal(fresh.answer_w, manual["best_w"])
    assert fresh.log_lambda_list() == [0.75]
    assert type(fresh.best_loss) is float and fresh.best_loss == 1.25
    assert type(fresh.iteration) is int and fresh.iteration == 1
    assert fresh.candidates == [0.5, 1.5] and all(type(c) is float for c in fresh.candidates)
    assert fresh.step()["candidate_log_lambda"] == 1.5 and fresh.finished


# ---------------------------------------------------------------------------- problems
def _data():
    X = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, 1.0, 0.0]])
    return X.to(DT), torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DT)


def test_logistic_regression_against_the_formula():
    X, y = _data()
    w = torch.tensor([0.3, -0.2, 0.7], dtype=DT)
    h = L2LogisticRegression(X, y)
    lam = torch.tensor(0.4, dtype=DT)
    loss = torch.log1p(torch.exp(-y * (X @ w))).sum()
    value, grad = h.value_and_grad(w, lam)
    assert float(value) == pytest.approx(float(loss + 0.5 * math.exp(0.4) * (w @ w)), rel=1e-12)
    sig = torch.sigmoid(-y * (X @ w))
    assert torch.allclose(grad, X.T @ (-y * sig) + math.exp(0.4) * w, rtol=1e-12)
    assert float(h.loss(w)) == pytest.approx(float(loss), rel=1e-12)
    assert torch.allclose(h.loss_grad(w), X.T @ (-y * sig), rtol=1e-12)
    assert torch.equal(h.X, X) and torch.equal(h.y, y) and h.n_samples == 4 and not h.sparse
    assert h.groups is None and repr(h).startswith("L2LogisticRegression(")

    grouped = L2LogisticRegression(X, y, groups=torch.tensor([0, 1, 1]))
    assert grouped.groups.tolist() == [0, 1, 1] and grouped.n_groups == 2
    lam2 = torch.tensor([0.0, 1.0], dtype=DT)
    reg = 0.5 * (w[0] ** 2 + math.e * (w[1] ** 2 + w[2] ** 2))
    assert float(grouped.value_and_grad(w, lam2)[0]) == pytest.approx(float(loss + reg), rel=1e-12)


@pytest.mark.parametrize("targets", [None, "zero_one", "plus_minus_one"])
def test_nonlinear_least_squares_against_the_formula(targets):
    X, y = _data()
    w = torch.tensor([0.3, -0.2, 0.7], dtype=DT)
    args = () if targets is None else (targets,)
    h = L2NonlinearLeastSquares(X, y, *args)
    t = y if targets == "plus_minus_one" else 0.5 * (1.0 + y)
    s = torch.sigmoid(X @ w)
    loss = 0.5 * ((t - s) ** 2).sum()
    value, grad = h.value_and_grad(w, torch.tensor(-0.3, dtype=DT))
    assert float(value) == pytest.approx(float(loss + 0.5 * math.exp(-0.3) * (w @ w)), rel=1e-12)
    data_grad = X.T @ (-(t - s) * s * (1 - s))
    assert torch.allclose(grad, data_grad + math.exp(-0.3) * w, rtol=1e-12)
    assert float(h.loss(w)) == pytest.approx(float(loss), rel=1e-12)
    assert torch.equal(h.X, X) and torch.equal(h.y, y) and h.groups is None
    assert repr(h).startswith("L2NonlinearLeastSquares(")

    grouped = L2NonlinearLeastSquares(X, y, "zero_one", torch.tensor([1, 0, 1]))
    assert grouped.groups.tolist() == [1, 0, 1] and grouped.n_groups == 2
    kw = L2NonlinearLeastSquares(X, y, groups=torch.tensor([0, 0, 1]))
    assert kw.groups.tolist() == [0, 0, 1]
