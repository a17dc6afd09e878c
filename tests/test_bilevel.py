"""Bi-level hyper-parameter optimisation: losses, hypergradients of every method, HOAG's rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch

from shine.backward import IFT, ConjugateGradientAdjoint, JacobianFree, Refine, Shine
from shine.bilevel import (
    HOAG,
    BilevelProblem,
    GridSearch,
    L2Regularized,
    LogisticLoss,
    RandomSearch,
    Scheduled,
    SigmoidSquaredLoss,
    ToleranceSchedule,
)
from shine.solvers import LBFGS

CG = ConjugateGradientAdjoint()

DT = torch.float64


def make_data(n=80, p=12, seed=0, sparse=False):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, dtype=DT, generator=gen)
    if sparse:
        X = X * (torch.rand(n, p, generator=gen, dtype=DT) < 0.4)
    w = torch.randn(p, dtype=DT, generator=gen)
    y = torch.where(torch.rand(n, generator=gen, dtype=DT) < torch.sigmoid(X @ w), 1.0, -1.0)
    return (X.to_sparse_csr() if sparse else X), y


def make_problem(loss="logistic", groups=None, seed=0):
    X, y = make_data(120, 10, seed)
    cls = LogisticLoss if loss == "logistic" else SigmoidSquaredLoss
    parts = [(X[:60], y[:60]), (X[60:90], y[60:90]), (X[90:], y[90:])]
    inner, outer, test = (cls(a, b) for a, b in parts)
    return BilevelProblem(L2Regularized(inner, groups), outer, test)


def solve_exact(problem, lam, w0=None):
    w0 = torch.zeros(problem.inner.n_features, dtype=DT) if w0 is None else w0
    res = LBFGS(memory=50, tol=1e-12, max_iter=5000)(problem.inner.objective(lam), w0)
    assert float(res.stats.residual) < 1e-10
    return res.value


def exact_hypergradient(problem, lam):
    w = solve_exact(problem, lam)
    q = torch.linalg.solve(problem.inner.hessian(w, lam), problem.outer.loss_grad(w))
    return -problem.inner.cross_vjp(w, lam, q), w


# ---------------------------------------------------------------------------- losses
@pytest.mark.parametrize("cls", [LogisticLoss, SigmoidSquaredLoss])
@pytest.mark.parametrize("sparse", [False, True])
def test_loss_gradient_and_hvp_match_autograd(cls, sparse):
    X, y = make_data(sparse=sparse)
    loss = cls(X, y)
    dense = X.to_dense() if sparse else X
    w = torch.randn(X.shape[1], dtype=DT, generator=torch.Generator().manual_seed(3))

    def ref(w):
        m = dense @ w
        if cls is LogisticLoss:
            return torch.nn.functional.softplus(-y * m).sum()
        return 0.5 * ((0.5 * (1 + y) - torch.sigmoid(m)) ** 2).sum()

    wr = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(ref(wr), wr, create_graph=True)
    v = torch.randn_like(w)
    (hv,) = torch.autograd.grad(g @ v, wr)
    torch.testing.assert_close(loss.loss(w), ref(w))
    torch.testing.assert_close(loss.loss_grad(w), g.detach())
    torch.testing.assert_close(loss.loss_hvp(w, v), hv)
    batch = torch.stack([v, 2 * v])
    torch.testing.assert_close(loss.loss_hvp(w, batch), torch.stack([hv, 2 * hv]))
    torch.testing.assert_close(loss.loss_hessian(w) @ v, hv)


def test_nls_authors_targets_and_indefinite_hessian():
    X, y = make_data(60, 5, seed=2)
    faithful = SigmoidSquaredLoss(X, y, targets="plus_minus_one")
    assert torch.equal(faithful.targets, y)
    w = 3 * torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(0))
    eig = torch.linalg.eigvalsh(faithful.loss_hessian(w))
    assert float(eig.min()) < 0 < float(eig.max())  # non-convex: CG / L-BFGS must cope
    with pytest.raises(ValueError, match="targets"):
        SigmoidSquaredLoss(X, y, targets="bogus")
    with pytest.raises(ValueError, match=r"-1 or \+1"):
        LogisticLoss(X, (y + 1) / 2)


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])])
def test_regularised_oracles_and_cross_derivative_match_autograd(groups):
    problem = make_problem(groups=groups)
    inner = problem.inner
    gen = torch.Generator().manual_seed(5)
    lam = inner.initial_log_lambda(0.0) + 0.3 * torch.randn(
        inner.initial_log_lambda().shape, generator=gen, dtype=DT
    )
    w = torch.randn(inner.n_features, dtype=DT, generator=gen)
    q = torch.randn_like(w)

    lam_r = lam.clone().requires_grad_()
    w_r = w.clone().requires_grad_()
    scale = torch.exp(lam_r) if groups is None else torch.exp(lam_r)[groups]
    h = inner.data_loss.loss(w_r) + 0.5 * (scale * w_r * w_r).sum()
    (g,) = torch.autograd.grad(h, w_r, create_graph=True)
    value, grad = inner.value_and_grad(w, lam)
    torch.testing.assert_close(value, h.detach())
    torch.testing.assert_close(grad, g.detach())
    (cross,) = torch.autograd.grad(g @ q, lam_r, retain_graph=True)
    torch.testing.assert_close(inner.cross_vjp(w, lam, q), cross)
    (hq,) = torch.autograd.grad(g @ q, w_r)
    torch.testing.assert_close(inner.hvp(w, lam, q), hq)
    torch.testing.assert_close(inner.hvp_at(w, lam)(q), hq)
    torch.testing.assert_close(inner.hessian(w, lam) @ q, hq)
    dense_cross = inner.cross_derivative(w, lam)
    torch.testing.assert_close(dense_cross @ q if groups is not None else dense_cross @ q, cross)


def test_hvp_operator_computes_the_curvature_once_and_only_when_used(monkeypatch):
    inner = make_problem().inner
    w = torch.randn(inner.n_features, dtype=DT)
    q = torch.randn_like(w)
    lam = torch.tensor(-1.0, dtype=DT)
    expected = inner.hvp(w, lam, q)
    calls = []
    curvature = inner.data_loss.curvature
    monkeypatch.setattr(inner.data_loss, "curvature", lambda w: calls.append(1) or curvature(w))
    hvp = inner.hvp_at(w, lam)
    assert calls == []  # SHINE / Jacobian-Free never multiply: no pass over X for them
    torch.testing.assert_close(hvp(q), expected)
    torch.testing.assert_close(hvp(2 * q), 2 * expected)
    assert calls == [1]


def test_shifted_curvature_pairs_are_exact_secant_pairs_at_the_new_lambda():
    inner = make_problem().inner
    gen = torch.Generator().manual_seed(1)
    z, s = torch.randn(2, inner.n_features, dtype=DT, generator=gen)
    old, new = torch.tensor(-2.0, dtype=DT), torch.tensor(1.5, dtype=DT)

    def diff(lam):
        return inner.value_and_grad(z + s, lam)[1] - inner.value_and_grad(z, lam)[1]

    shifted = inner.shift_curvature_pairs(s[None], diff(old)[None], old, new)[0]
    torch.testing.assert_close(shifted, diff(new))


# ---------------------------------------------------------------------------- hypergradients
def test_exact_hypergradient_matches_finite_differences_of_the_value_function():
    problem = make_problem()
    lam = torch.tensor(-0.5, dtype=DT)
    grad, _ = exact_hypergradient(problem, lam)
    h = 1e-5

    def value(x):
        return float(problem.outer.loss(solve_exact(problem, torch.tensor(x, dtype=DT))))

    fd = (value(-0.5 + h) - value(-0.5 - h)) / (2 * h)
    assert math.isclose(float(grad), fd, rel_tol=1e-5)


def one_step(method, problem, lam0=-0.5):
    """First outer iteration of ``method``; returns its hypergradient and the stepper."""
    stepper = replace(method, lambda0=lam0, max_iter=1).stepper(
        problem, torch.zeros(problem.inner.n_features, dtype=DT)
    )
    metrics = stepper.step()
    return torch.tensor(metrics["hypergradient"], dtype=DT), stepper


TIGHT = ToleranceSchedule(initial=1e-11)


@pytest.mark.parametrize("loss", ["logistic", "nls"])
def test_hoag_cg_and_long_refine_give_the_exact_hypergradient(loss):
    problem = make_problem(loss)
    lam = torch.tensor(-0.5, dtype=DT)
    w = solve_exact(problem, lam)
    hess = problem.inner.hessian(w, lam)
    exact = -problem.inner.cross_vjp(w, lam, torch.linalg.solve(hess, problem.outer.loss_grad(w)))
    hoag = HOAG(backward=Scheduled(IFT(solver=CG, max_iter=500)), tolerance=TIGHT)
    refine = HOAG(
        backward=Scheduled(
            Refine(init=Shine(), solver=CG, n_steps=0),
            steps_field="n_steps",
            min_steps=200,
        ),
        tolerance=TIGHT,
        solver=LBFGS(memory=30),
    )
    for method in (hoag, refine):
        grad, _ = one_step(method, problem)
        torch.testing.assert_close(grad.reshape(()), exact.reshape(()), rtol=1e-6, atol=1e-9)


def test_shine_opa_converges_to_the_hypergradient_and_beats_jacobian_free():
    # Theorem 3 (BFGS + OPA): the SHINE hypergradient tends to the exact one as the inner
    # tolerance shrinks. Full-memory BFGS (memory > p) and OPA at every iteration; tolerances
    # stop at ~1e-7: tighter solves store secant pairs dominated by rounding. Our algorithm
    # (mode="robust"): the paper's OPA schedule and the solver's own estimate; the authors'
    # preset (faithful) runs L-BFGS-B without OPA and reads its pairs with H0 = I
    problem = make_problem()
    lam = torch.tensor(-0.5, dtype=DT)
    exact, _ = exact_hypergradient(problem, lam)
    errors = {}
    for name, method in {
        "shine_opa": HOAG(solver=LBFGS(memory=30, opa_every=1), backward=Shine(), mode="robust"),
        "shine": HOAG(solver=LBFGS(memory=30), backward=Shine(), mode="robust"),
        "jacobian_free": HOAG(solver=LBFGS(memory=30), backward=JacobianFree(), mode="robust"),
    }.items():
        errs = []
        for tol in (1e-4, 1e-6, 1e-8):
            grad, _ = one_step(replace(method, tolerance=ToleranceSchedule(initial=tol)), problem)
            errs.append(abs(float(grad) - float(exact)) / abs(float(exact)))
        errors[name] = errs
    opa = errors["shine_opa"]
    assert opa[0] > opa[1] > opa[2]
    assert opa[2] < 1e-3
    assert opa[2] < 0.1 * errors["shine"][2]
    assert errors["shine"][2] < 0.1 * errors["jacobian_free"][2]


def test_group_hypergradient_matches_the_exact_one():
    groups = torch.arange(10) % 3
    problem = make_problem(groups=groups)
    lam = torch.tensor([-0.5, 0.0, 0.5], dtype=DT)
    w = solve_exact(problem, lam)
    q = torch.linalg.solve(problem.inner.hessian(w, lam), problem.outer.loss_grad(w))
    exact = -problem.inner.cross_vjp(w, lam, q)
    method = HOAG(backward=Scheduled(IFT(solver=CG, max_iter=500)), tolerance=TIGHT, max_iter=1)
    stepper = method.stepper(problem, torch.zeros(10, dtype=DT))
    stepper.lam = lam.clone()
    stepper.old_lam = lam.clone()
    grad = torch.tensor(stepper.step()["hypergradient"], dtype=DT)
    torch.testing.assert_close(grad, exact, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- outer loop rules
def test_tolerance_schedule():
    sched = ToleranceSchedule(initial=1e-3, decrease=0.9)
    eps = [sched.first()]
    for k in range(1, 5):
        eps.append(sched.next(eps[-1], k))
    assert eps == pytest.approx([1e-3 * 0.9**k for k in range(5)])
    assert ToleranceSchedule(kind="quadratic").next(1.0, 3) == pytest.approx(1e-3 / 9)
    assert ToleranceSchedule(kind="exact").first() == 1e-12
    assert ToleranceSchedule(initial=1e-11, decrease=0.1).next(1e-11, 1) == 1e-12  # floor
    with pytest.raises(ValueError, match="exponential"):
        ToleranceSchedule(kind="linear")


def test_scheduled_backward_follows_the_tolerance():
    sched = Scheduled(IFT(solver=CG, max_iter=9), steps_field="max_iter", min_steps=5)
    assert sched.at(1e-2) == IFT(solver=CG, max_iter=5, tol=1e-2)
    assert sched.at(1e-6).max_iter == 10  # floor(1 / (100 * 1e-3))
    with pytest.raises(ValueError, match="no field 'n_steps'"):
        Scheduled(IFT(), steps_field="n_steps").at(1e-3)


def test_faithful_hoag_first_step_is_the_authors_double_step_and_eps_decreases():
    problem = make_problem()
    method = HOAG(backward=Scheduled(IFT(solver=CG, max_iter=200)), max_iter=6)
    stepper = method.stepper(problem, torch.zeros(10, dtype=DT))
    m = stepper.step()
    # L = |grad| on the first iteration and the accepted step is taken twice: |Δλ| = 2
    assert abs(m["log_lambda"][0]) == pytest.approx(2.0)
    eps = [m["tolerance"]]
    for _ in range(5):
        r = stepper.step()
        eps.append(r["tolerance"])
        assert method.bounds[0] <= r["log_lambda"][0] <= method.bounds[1]
    for a, b in zip(eps, eps[1:], strict=False):
        assert b == pytest.approx(0.9 * a) or b == pytest.approx(0.45 * a)  # halved on rejection


def test_faithful_rejection_restores_lambda_doubles_l_and_halves_eps():
    problem = make_problem()
    method = HOAG(backward=Scheduled(IFT(solver=CG, max_iter=200)), max_iter=3)
    stepper = method.stepper(problem, torch.zeros(10, dtype=DT))
    stepper.step()
    stepper.g_old = 1e-9  # the next outer loss will look 20 % worse than the previous one
    lam_before, lip, eps = stepper.lam.clone(), stepper.lipschitz, stepper.eps
    m = stepper.step()
    assert m["rejected"]
    torch.testing.assert_close(stepper.lam, lam_before)
    assert stepper.lipschitz == pytest.approx(2 * lip)
    assert stepper.eps == pytest.approx(0.5 * method.tolerance.next(eps, 2))


def test_robust_hoag_converges_to_the_outer_optimum_without_oscillation():
    problem = make_problem()
    grid = torch.linspace(-4, 3, 71, dtype=DT)
    values = [float(problem.outer.loss(solve_exact(problem, lam))) for lam in grid]
    best = float(grid[int(torch.tensor(values).argmin())])
    method = HOAG(backward=Scheduled(IFT(solver=CG, max_iter=500)), mode="robust", max_iter=25)
    stepper = method.stepper(problem, torch.zeros(10, dtype=DT))
    lams = [stepper.step()["log_lambda"][0] for _ in range(25)]
    steps = [abs(b - a) for a, b in zip(lams, lams[1:], strict=False)]
    assert max(steps) <= method.max_step + 1e-12
    assert abs(lams[-1] - best) < 0.15
    assert max(steps[-5:]) < 0.1  # settled


def test_hoag_needs_a_backward_and_valid_settings():
    with pytest.raises(ValueError, match="backward strategy"):
        HOAG()
    with pytest.raises(ValueError, match="mode"):
        HOAG(backward=Shine(), mode="fast")
    with pytest.raises(ValueError, match="inner_memory"):
        HOAG(backward=Shine(), inner_memory="forget")


def test_stepper_state_round_trip_continues_identically():
    problem = make_problem()
    method = HOAG(solver=LBFGS(memory=30), backward=Shine(), max_iter=6)
    w0 = torch.zeros(10, dtype=DT)
    a = method.stepper(problem, w0)
    ref = [a.step() for _ in range(6)]
    b = method.stepper(problem, w0)
    for _ in range(3):
        b.step()
    c = method.stepper(problem, w0)
    c.load_state_dict(b.state_dict())
    rest = [c.step() for _ in range(3)]
    for x, y in zip(ref[3:], rest, strict=True):
        assert x["log_lambda"] == y["log_lambda"]
        assert x["outer_loss"] == y["outer_loss"]


# ---------------------------------------------------------------------------- searches
def test_grid_and_random_search_candidates_and_best_so_far():
    problem = make_problem()
    grid = GridSearch(n_points=5, low=-4, high=4)
    assert grid.candidates(0) == pytest.approx([-4, -2, 0, 2, 4])
    rnd = RandomSearch(n_points=5, low=-4, high=4)
    assert rnd.candidates(1) == rnd.candidates(1) != rnd.candidates(2)
    assert all(-4 <= c <= 4 for c in rnd.candidates(3))
    stepper = grid.stepper(problem, torch.zeros(10, dtype=DT))
    best = []
    while not stepper.finished:
        m = stepper.step()
        best.append(m["outer_loss"])
        assert m["outer_loss"] <= m["candidate_outer_loss"]
    assert best == sorted(best, reverse=True)
    assert best[-1] == pytest.approx(
        min(
            float(problem.outer.loss(solve_exact(problem, torch.tensor(c, dtype=DT))))
            for c in grid.candidates(0)
        ),
        rel=1e-3,
    )


def test_robust_rejection_returns_to_the_accepted_point_and_recomputes_there():
    problem = make_problem()

    class Uphill:
        """A wrong hypergradient (the exact one negated): every step goes uphill."""

        def __call__(self, vjp, rhs, fwd, *, u0=None):
            out = IFT(solver=CG, max_iter=200, tol=1e-10)(vjp, rhs, fwd)
            out.value = -out.value
            return out

    method = HOAG(backward=Uphill(), mode="robust", max_iter=4, lambda0=-2.0)
    stepper = method.stepper(problem, torch.zeros(10, dtype=DT))
    first = stepper.step()
    accepted = stepper.accepted["lam"].clone()
    second = stepper.step()  # evaluated uphill: rejected, back to the accepted point
    assert not first["rejected"] and second["rejected"]
    torch.testing.assert_close(stepper.lam, accepted)
    eps = stepper.eps
    third = stepper.step()  # re-solved there at the tighter tolerance, a fresh hypergradient
    assert not third["rejected"] and third["backward_iters"] > 0
    assert third["tolerance"] == pytest.approx(eps)


@dataclass(frozen=True)
class SpyLBFGS(LBFGS):
    """An LBFGS that records the memory each solve starts from (HOAG's inner_memory)."""

    seen: list = field(default_factory=list, compare=False)

    def __call__(self, fun, z0, *, opa_direction=None, warm_start=None):
        self.seen.append(warm_start)
        return super().__call__(fun, z0, opa_direction=opa_direction, warm_start=warm_start)


@pytest.mark.parametrize("policy", ["restart", "keep", "shift"])
def test_inner_memory_policies_hand_over_what_they_promise(policy):
    # second inner solve: restart starts empty; keep gets the first solve's pairs as they are;
    # shift gets them with y moved to the new lambda (y + (e^λ2 - e^λ1) s), exact secant pairs
    problem = make_problem()
    spy = SpyLBFGS(memory=30)
    method = HOAG(solver=spy, backward=Shine(), inner_memory=policy, mode="robust", max_iter=2)
    stepper = method.stepper(problem, torch.zeros(problem.inner.n_features, dtype=DT))
    stepper.step()
    first, lam1 = stepper.memory, stepper.memory_lam.clone()
    stepper.step()
    handed = spy.seen[1]
    if policy == "restart":
        assert handed is None
        return
    lam2 = stepper.memory_lam  # the λ of the second inner solve
    torch.testing.assert_close(handed.s, first.s)
    if policy == "keep":
        torch.testing.assert_close(handed.y, first.y)
    else:
        shift = (torch.exp(lam2) - torch.exp(lam1)).reshape(()) * first.s
        torch.testing.assert_close(handed.y, first.y + shift)
        assert not torch.allclose(handed.y, first.y)
