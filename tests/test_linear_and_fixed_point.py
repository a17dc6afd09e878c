"""Baseline solvers without inverse estimate: batched conjugate gradient, fixed point, Anderson."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DT, make_problem

from shine.solvers import Anderson, ConjugateGradient, FixedPoint


def spd_batch(B=3, D=12, seed=0, shifts=(0.1, 1.0, 0.5)):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(B, D, D, dtype=DT, generator=gen)
    shift = torch.tensor(shifts[:B], dtype=DT)[:, None, None]
    A = M @ M.mT / D + shift * torch.eye(D, dtype=DT)
    b = torch.randn(B, D, dtype=DT, generator=gen)
    return A, b


def batched_matvec(A):
    return lambda v: torch.einsum("bij,bj->bi", A, v)


# ---------------------------------------------------------------- conjugate gradient


def test_cg_matches_direct_solve():
    A, b = spd_batch()
    res = ConjugateGradient(max_iter=100, tol=1e-12)(batched_matvec(A), b)
    torch.testing.assert_close(res.value, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    st = res.stats
    assert bool(st.converged.all()) and res.inverse is None
    assert st.n_evals == st.nstep <= 12 + 2  # D products in exact arithmetic, plus rounding
    assert st.residual_trace.shape == (st.nstep + 1, 3)
    torch.testing.assert_close(st.residual_trace[0], b.norm(dim=-1))
    true_res = (b - batched_matvec(A)(res.value)).norm(dim=-1)
    assert bool((true_res <= 1e-11 * b.norm(dim=-1)).all())
    assert bool((st.residual <= 1e-12 * b.norm(dim=-1)).all())
    torch.testing.assert_close(st.residual, st.residual_trace[st.lowest_step, torch.arange(3)])


def test_cg_warm_start_from_solution():
    A, b = spd_batch()
    x_star = torch.linalg.solve(A, b)
    res = ConjugateGradient(max_iter=100, tol=1e-10)(batched_matvec(A), b, x0=x_star)
    assert res.stats.nstep == 0 and res.stats.n_evals == 1
    assert bool(res.stats.converged.all())
    torch.testing.assert_close(res.value, x_star)
    # a nearby warm start needs fewer iterations than a cold one
    x0 = x_star + 1e-6 * torch.ones_like(x_star)
    warm = ConjugateGradient(max_iter=100, tol=1e-8)(batched_matvec(A), b, x0=x0)
    cold = ConjugateGradient(max_iter=100, tol=1e-8)(batched_matvec(A), b)
    assert warm.stats.n_evals == warm.stats.nstep + 1
    assert warm.stats.nstep < cold.stats.nstep, (warm.stats.nstep, cold.stats.nstep)
    torch.testing.assert_close(warm.value, x_star, rtol=0, atol=1e-6)


def test_cg_per_sample_convergence():
    A, b = spd_batch(B=2, shifts=(0.05, 1.0))
    A[0] = 2.0 * torch.eye(12, dtype=DT)  # easy: one iteration
    calls = []

    def matvec(v):
        calls.append(v.clone())
        return batched_matvec(A)(v)

    res = ConjugateGradient(max_iter=100, tol=1e-10)(matvec, b)
    st = res.stats
    assert bool(st.converged.all())
    assert int(st.lowest_step[0]) == 1 < int(st.lowest_step[1]) == st.nstep
    torch.testing.assert_close(res.value, torch.linalg.solve(A, b), rtol=0, atol=1e-9)
    # the finished sample is frozen: its residual stays put while the other one iterates
    assert bool((st.residual_trace[1:, 0] == st.residual_trace[1, 0]).all())
    assert all(torch.equal(v[0], torch.zeros(12, dtype=DT)) for v in calls[1:])


def test_cg_zero_rhs_and_unbatched():
    A, b = spd_batch()
    b[1] = 0.0
    res = ConjugateGradient(max_iter=100, tol=1e-12)(batched_matvec(A), b, x0=torch.ones_like(b))
    assert torch.equal(res.value[1], torch.zeros(12, dtype=DT))
    assert bool(res.stats.converged.all()) and float(res.stats.residual[1]) == 0.0
    torch.testing.assert_close(res.value, torch.linalg.solve(A, b), rtol=0, atol=1e-10)

    single = ConjugateGradient(max_iter=100, tol=1e-12)(lambda v: A[2] @ v, b[2])
    assert single.value.shape == (12,)
    assert single.stats.residual.dim() == 0 and single.stats.converged.dim() == 0
    assert single.stats.residual_trace.shape == (single.stats.nstep + 1,)
    torch.testing.assert_close(single.value, torch.linalg.solve(A[2], b[2]), rtol=0, atol=1e-10)


def test_cg_nonpositive_curvature_is_reported():
    A, b = spd_batch()
    A[2] = torch.diag(torch.linspace(-1.0, 1.0, 12, dtype=DT))  # indefinite
    b[2] = torch.ones(12, dtype=DT)  # pᵀA p = Σ d_i = 0 at the first step: not positive
    res = ConjugateGradient(max_iter=100, tol=1e-10)(batched_matvec(A), b)
    assert res.stats.extra["n_nonpositive_curvature"] == 1.0
    assert res.stats.converged.tolist() == [True, True, False]
    assert bool(torch.isfinite(res.value).all())
    torch.testing.assert_close(res.value[:2], torch.linalg.solve(A[:2], b[:2]), atol=1e-8, rtol=0)
    # with a negative definite A every sample stops
    neg = ConjugateGradient(max_iter=100, tol=1e-10)(lambda v: -v, b)
    assert neg.stats.extra["n_nonpositive_curvature"] == 3.0
    assert not bool(neg.stats.converged.any())


def test_cg_max_iter_and_validation():
    A, b = spd_batch(shifts=(1e-3, 1e-3, 1e-3))
    res = ConjugateGradient(max_iter=3, tol=1e-12)(batched_matvec(A), b)
    assert res.stats.nstep == 3 and not bool(res.stats.converged.any())
    with pytest.raises(ValueError, match="max_iter"):
        ConjugateGradient(max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        ConjugateGradient(tol=-1.0)


# ---------------------------------------------------------------- fixed point and Anderson


@pytest.fixture(scope="module")
def deq():
    prob = make_problem(dim=10, batch=3, contraction=0.95, seed=2)
    return prob, prob.root(4000)


@pytest.mark.parametrize("solver", [FixedPoint(max_iter=300, tol=1e-11), Anderson(tol=1e-11)])
def test_root_solvers_converge_to_fixed_point(deq, solver):
    prob, z_star = deq
    res = solver(prob.g, torch.zeros_like(prob.x))
    assert res.inverse is None
    assert bool(res.stats.converged.all())
    torch.testing.assert_close(res.value, z_star, rtol=0, atol=1e-10)
    assert bool((prob.g(res.value).norm(dim=-1) <= 1e-11).all())
    st = res.stats
    assert st.residual_trace.shape == (st.nstep + 1, 3)
    assert st.n_evals == st.nstep + 1
    torch.testing.assert_close(st.residual, prob.g(res.value).norm(dim=-1))


def test_anderson_needs_fewer_iterations(deq):
    prob, _ = deq
    z0 = torch.zeros_like(prob.x)
    fp = FixedPoint(max_iter=300, tol=1e-10)(prob.g, z0)
    aa = Anderson(max_iter=300, tol=1e-10, memory=5)(prob.g, z0)
    assert bool(fp.stats.converged.all()) and bool(aa.stats.converged.all())
    assert aa.stats.nstep <= 0.75 * fp.stats.nstep  # measured 18 vs 31
    assert aa.stats.extra["n_fallback_steps"] == 0.0


@pytest.mark.parametrize("solver", [FixedPoint(max_iter=300, tol=1e-10), Anderson(tol=1e-10)])
def test_per_sample_convergence_masks(solver):
    prob = make_problem(dim=10, batch=3, contraction=0.9, seed=4)
    prob.x[0] = 0.0  # z0 = 0 is the root of sample 0: converged before the first step
    z0 = torch.zeros_like(prob.x)
    z0[1] = prob.root(2000)[1] + 1e-6  # sample 1 starts next to its root: a fast sample
    res = solver(prob.g, z0)
    st = res.stats
    assert bool(st.converged.all())
    assert int(st.lowest_step[0]) == 0
    assert torch.equal(res.value[0], torch.zeros(10, dtype=DT))
    assert int(st.lowest_step[1]) < int(st.lowest_step[2]) == st.nstep
    # a converged sample is frozen: its residual no longer changes
    for b in range(3):
        k = int(st.lowest_step[b])
        assert bool((st.residual_trace[k:, b] == st.residual_trace[k, b]).all())
        assert float(st.residual_trace[k, b]) <= 1e-10


def test_max_iter_reached_returns_best_iterate(deq):
    prob, _ = deq
    res = FixedPoint(max_iter=4, tol=1e-14)(prob.g, torch.zeros_like(prob.x))
    assert res.stats.nstep == 4 and not bool(res.stats.converged.any())
    trace = res.stats.residual_trace
    torch.testing.assert_close(res.stats.residual, trace.min(dim=0).values)
    torch.testing.assert_close(res.stats.lowest_step, trace.argmin(dim=0))


@pytest.mark.parametrize("solver", [FixedPoint(max_iter=300, tol=1e-11), Anderson(tol=1e-11)])
def test_unbatched_root_solvers(deq, solver):
    prob, z_star = deq

    def g1(z):
        return prob.g(z.unsqueeze(0).expand(3, -1))[1]

    res = solver(g1, torch.zeros(10, dtype=DT))
    assert res.value.shape == (10,)
    assert res.stats.residual.dim() == 0 and bool(res.stats.converged)
    assert res.stats.residual_trace.shape == (res.stats.nstep + 1,)
    torch.testing.assert_close(res.value, z_star[1], rtol=0, atol=1e-10)


def test_damped_fixed_point_and_validation(deq):
    prob, z_star = deq
    res = FixedPoint(max_iter=500, tol=1e-11, step=0.7)(prob.g, torch.zeros_like(prob.x))
    torch.testing.assert_close(res.value, z_star, rtol=0, atol=1e-10)
    for cls in (FixedPoint, Anderson):
        with pytest.raises(ValueError, match="max_iter"):
            cls(max_iter=-1)
        with pytest.raises(ValueError, match=r"tol must be >= 0\.0, got -1\.0"):
            cls(tol=-1.0)
        with pytest.raises(ValueError, match="rel_tol must be >= 0"):
            cls(rel_tol=-1e-3)
    with pytest.raises(ValueError, match="memory"):
        Anderson(memory=0)
    with pytest.raises(ValueError, match="lam"):
        Anderson(lam=-1.0)
