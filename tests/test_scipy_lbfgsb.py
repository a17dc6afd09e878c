"""SciPy's L-BFGS-B as the authors drove it, and the fork's reading of its workspace."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.optimize
import torch

from shine.backward import Shine
from shine.bilevel import HOAG
from shine.bilevel.hoag import BilevelProblem, ToleranceSchedule
from shine.bilevel.losses import L2Regularized, LogisticLoss
from shine.solvers import LBFGS, LBFGSMemory, ScipyLBFGSB, lbfgsb_workspace_inverse

DT = torch.float64


def logistic_problem(seed: int = 0, n: int = 80, p: int = 12) -> L2Regularized:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=gen, dtype=DT)
    y = torch.where(X @ torch.randn(p, generator=gen, dtype=DT) > 0, 1.0, -1.0).to(DT)
    return L2Regularized(LogisticLoss(X, y))


def numpy_objective(fun):
    def f(x):
        value, grad = fun(torch.from_numpy(x.copy()))
        return float(value), grad.numpy().copy()

    return f


def test_rebuilt_memory_gives_scipys_own_workspace_estimate():
    # SciPy's result holds LbfgsInvHessProduct on the workspace (H0 = I, storage order): the
    # exact construction of the authors' SHINE. 14 iterations with maxcor 5 wrap the buffer.
    inner = logistic_problem()
    fun = inner.objective(torch.tensor(-2.0, dtype=DT))
    x0 = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=DT)
    solver = ScipyLBFGSB(max_iter=14, tol=0.0, memory=5, stop_test="iterates")
    ours = solver(fun, x0)
    # SciPy returns right after its 15th iterate, before the update of that iteration: its
    # workspace then holds the pairs of the first 14 iterations, as the authors' did when they
    # stopped in the 15th iteration's line search
    ref = scipy.optimize.minimize(
        numpy_objective(fun),
        x0.numpy(),
        jac=True,
        method="L-BFGS-B",
        options={"maxcor": 5, "maxiter": 15, "ftol": 0.0, "gtol": 0.0, "maxls": 20},
    )
    assert ours.stats.nstep == 14 and ref.nit == 15
    n_committed = int(ours.stats.extra["n_committed"])
    assert n_committed > len(ours.state) == 5  # the circular buffer has wrapped
    authors = lbfgsb_workspace_inverse(ours.state, n_committed)
    v = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=DT)
    expected = ref.hess_inv.matvec(v.numpy())
    np.testing.assert_allclose(authors.matvec(v).numpy(), expected, rtol=1e-10)
    # the chronological order (or the solver's gamma) is a different matrix
    for other in (
        lbfgsb_workspace_inverse(ours.state, n_committed, workspace_order=False),
        lbfgsb_workspace_inverse(ours.state, n_committed, identity_h0=False),
        ours.inverse,
    ):
        assert not np.allclose(other.matvec(v).numpy(), expected, rtol=1e-4)


def test_solver_estimate_is_lbfgsb_compact_matrix():
    # H0 = (s'y / y'y) I of the newest pair, pairs oldest first (L-BFGS-B's B^{-1})
    inner = logistic_problem(3)
    fun = inner.objective(torch.tensor(-1.0, dtype=DT))
    x0 = torch.zeros(12, dtype=DT)
    res = ScipyLBFGSB(max_iter=8, tol=0.0, memory=4, stop_test="iterates")(fun, x0)
    mem = res.state
    gamma = float(mem.s[-1] @ mem.y[-1] / (mem.y[-1] @ mem.y[-1]))
    assert mem.gamma == pytest.approx(gamma)
    h = torch.eye(12, dtype=DT) * gamma
    for s, y in zip(mem.s, mem.y, strict=True):
        rho = 1.0 / float(s @ y)
        left = torch.eye(12, dtype=DT) - rho * torch.outer(s, y)
        h = left @ h @ left.T + rho * torch.outer(s, s)
    torch.testing.assert_close(res.inverse.dense(), h)
    # every stored pair is a secant pair of consecutive accepted iterates
    assert bool((mem.curvatures() > 0).all())


def rosenbrock(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rosenbrock's function and its gradient: line searches with rejected trial points whose
    gradient is nevertheless the smallest so far."""
    z = z.detach().requires_grad_(True)
    value = (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def recording(fun):
    """``fun`` wrapped to append the gradient norm of every evaluation to the returned list."""
    norms: list[float] = []

    def recorded(z):
        value, grad = fun(z)
        norms.append(float(torch.linalg.vector_norm(grad)))
        return value, grad

    return recorded, norms


def first_trial_record(norms: list[float], accepted: torch.Tensor) -> int:
    """Index of an evaluation, not an accepted iterate, with a gradient norm below all before."""
    trace = accepted.numpy()
    return next(
        i
        for i, g in enumerate(norms)
        if i > 3 and not np.isclose(trace, g, rtol=1e-12).any() and g < min(norms[:i])
    )


def test_stops_at_the_first_evaluation_that_passes_the_tolerance():
    x0 = torch.randn(6, generator=torch.Generator().manual_seed(17), dtype=DT) * 1.5
    recorded, norms = recording(rosenbrock)

    full = ScipyLBFGSB(max_iter=60, tol=0.0, memory=5)(recorded, x0)
    assert full.stats.n_evals == len(norms)
    # a tolerance met first at a line-search trial point that is not an accepted iterate
    trial = first_trial_record(norms, full.stats.residual_trace)
    tol = norms[trial] * (1 + 1e-12)
    assert all(g >= tol for g in norms[:trial])
    norms.clear()
    res = ScipyLBFGSB(max_iter=60, tol=tol, memory=5)(recorded, x0)
    assert len(norms) == trial + 1  # stopped at that evaluation
    assert float(res.stats.residual) == pytest.approx(norms[trial], rel=1e-14)
    assert res.stats.extra["stopped_in_line_search"] == 1.0
    # the same tolerance tested at accepted iterates only goes further
    norms.clear()
    later = ScipyLBFGSB(max_iter=60, tol=tol, memory=5, stop_test="iterates")(recorded, x0)
    assert len(norms) > trial + 1
    assert later.stats.extra["stopped_in_line_search"] == 0.0
    # a converged initial point returns at once
    at_x0 = ScipyLBFGSB(tol=1e9)(rosenbrock, x0)
    assert at_x0.stats.n_evals == 1 and at_x0.stats.nstep == 0
    torch.testing.assert_close(at_x0.value, x0)


def test_our_lbfgs_can_stop_inside_its_line_search():
    x0 = torch.randn(6, generator=torch.Generator().manual_seed(22), dtype=DT) * 1.5
    recorded, norms = recording(rosenbrock)

    solver = LBFGS(max_iter=60, tol=0.0, memory=5, scale_gamma=True)
    full = solver(recorded, x0)
    trial = first_trial_record(norms, full.stats.residual_trace)
    tol = norms[trial] * (1 + 1e-12)
    norms.clear()
    res = replace(solver, tol=tol, stop_test="every_evaluation")(recorded, x0)
    assert len(norms) == trial + 1
    assert res.stats.extra["stopped_in_line_search"] == 1.0
    assert bool(res.stats.converged)
    # no pair of the interrupted line search was pushed
    n_pairs = int(res.stats.extra["n_committed"])
    assert n_pairs + int(res.stats.extra["n_skipped_pairs"]) == res.stats.nstep
    assert len(res.state) == min(n_pairs, 5)


def test_workspace_order_against_a_simulated_fortran_buffer_and_dense_bfgs():
    # pairs of an SPD matrix; the j-th of 11 updates goes to column (j - 1) mod 4
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(6, 6, generator=gen, dtype=DT)
    a = a @ a.T + 6 * torch.eye(6, dtype=DT)
    steps = torch.randn(11, 6, generator=gen, dtype=DT)
    m = 4
    columns: list[int | None] = [None] * m
    for j in range(1, 12):
        columns[(j - 1) % m] = j - 1
    memory = LBFGSMemory(steps[-m:], steps[-m:] @ a, None, gamma=0.37)
    estimate = lbfgsb_workspace_inverse(memory, 11)
    h = torch.eye(6, dtype=DT)  # H0 = I, pairs in storage (column) order
    for j in columns:
        s, y = steps[j], steps[j] @ a
        rho = 1.0 / float(s @ y)
        left = torch.eye(6, dtype=DT) - rho * torch.outer(s, y)
        h = left @ h @ left.T + rho * torch.outer(s, s)
    torch.testing.assert_close(estimate.dense(), h)
    # no wrap-around: the pairs oldest first
    short = LBFGSMemory(steps[:3], steps[:3] @ a, None, gamma=0.37)
    torch.testing.assert_close(
        lbfgsb_workspace_inverse(short, 3).dense(),
        replace_gamma(short, 1.0).inverse().dense(),
    )


def replace_gamma(memory: LBFGSMemory, gamma: float) -> LBFGSMemory:
    return LBFGSMemory(memory.s, memory.y, list(memory.kinds or []), gamma)


def test_faithful_shine_hypergradient_uses_the_authors_estimate():
    # one HOAG step on a small logistic problem: the faithful SHINE hypergradient is
    # -(e^λ w)ᵀ H ∇L with H the fork's estimate of the inner L-BFGS-B pairs (dense reference)
    inner = logistic_problem(11, n=120, p=15)
    gen = torch.Generator().manual_seed(12)
    X_out = torch.randn(40, 15, generator=gen, dtype=DT)
    y_out = torch.where(torch.randn(40, generator=gen, dtype=DT) > 0, 1.0, -1.0).to(DT)
    problem = BilevelProblem(inner=inner, outer=LogisticLoss(X_out, y_out))
    w0 = torch.randn(15, generator=gen, dtype=DT)
    for estimate in ("authors", "solver"):
        method = HOAG(
            solver=LBFGS(memory=4),
            backward=Shine(),
            tolerance=ToleranceSchedule(initial=1e-9),
            estimate=estimate,
            max_iter=1,
            lambda0=-1.0,
        )
        stepper = method.stepper(problem, w0)
        lam = stepper.lam.clone()
        fwd = stepper.solve_inner(lam)
        mem, n_committed = fwd.state, int(fwd.stats.extra["n_committed"])
        assert n_committed > len(mem)
        grad, _, _ = stepper.hypergradient(lam, fwd)
        if estimate == "authors":
            h = lbfgsb_workspace_inverse(mem, n_committed).dense()
        else:
            h = mem.inverse().dense()
        w = stepper.w
        expected = -(torch.exp(lam) * w) @ (h @ problem.outer.loss_grad(w))
        torch.testing.assert_close(grad.reshape(()), expected.reshape(()))
