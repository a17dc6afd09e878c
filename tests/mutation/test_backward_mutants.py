"""Backward strategies: the arguments they pass on (u0, memory, h0, tolerances) and their stats.

Written against the mutants of ``make mutation`` that survived the other tests: each test checks
a promise of the docstrings on a small float64 linear adjoint system ``J_gᵀ u = rhs``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shine.backward import IFT, BroydenAdjoint, Diagnose, Fallback, JacobianFree, Refine
from shine.backward.base import AdjointStats, initial_scale
from shine.backward.strategies import solve_adjoint

DT = torch.float64
NO_ESTIMATE = SimpleNamespace(inverse=None)  # a forward result without inverse estimate


def linear_system(dim=8, seed=0, spd=False, strength=0.4):
    """``vjp(u) = J_gᵀ u`` for a fixed ``J_g`` near ``-I`` (or SPD), and the exact solver."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, dtype=DT, generator=gen)
    if spd:
        J = torch.eye(dim, dtype=DT) + M @ M.T / dim
    else:
        J = -(torch.eye(dim, dtype=DT) + strength * M / torch.linalg.matrix_norm(M, 2))

    def vjp(u):
        return u @ J  # rows: (J_gᵀ u_b)ᵀ = u_bᵀ J_g

    def exact(rhs):
        return torch.linalg.solve(J.T, rhs.T).T if rhs.dim() == 2 else torch.linalg.solve(J.T, rhs)

    return vjp, exact


def rhs_of(batch, dim=8, seed=1):
    return torch.randn(batch, dim, dtype=DT, generator=torch.Generator().manual_seed(seed))


def test_summary_and_initial_scale():
    stats = AdjointStats(
        n_vjps=3,
        nstep=2,
        residual=torch.tensor([0.1, 0.3], dtype=DT),
        fallback_mask=torch.tensor([True, False, False, False]),
        extra={"cos": 0.5},
    )
    assert stats.summary("b/") == {
        "b/nstep": 2.0,
        "b/n_vjps": 3.0,
        "b/residual_max": 0.3,
        "b/fallback_frac": 0.25,
        "b/cos": 0.5,
    }
    # an estimate with neither a scale nor h0 (the L-BFGS inverse Hessian): the identity
    assert initial_scale(SimpleNamespace(inverse=object())) == 1.0
    assert initial_scale(NO_ESTIMATE) == -1.0


def test_zero_or_one_iteration():
    vjp, _ = linear_system()
    rhs, u0 = rhs_of(2), rhs_of(2, seed=5)
    res = solve_adjoint(vjp, rhs, u0=u0, max_iter=0, tol=0.0, method="broyden", h0=-1.0)
    torch.testing.assert_close(res.value, u0, rtol=0, atol=0)
    assert res.stats == AdjointStats()  # no iteration: no VJP, no residual
    one = solve_adjoint(vjp, rhs, u0=u0, max_iter=1, tol=0.0, method="broyden", h0=-1.0)
    assert one.stats.nstep == 1 and not torch.allclose(one.value, u0)


def test_h0_seeds_the_broyden_solve():
    # J_g = 0.5·I: H0 = 2·I is the exact inverse, so one step from 0 gives u = 2·rhs
    rhs = rhs_of(2)
    res = solve_adjoint(
        lambda u: 0.5 * u, rhs, u0=None, max_iter=1, tol=0.0, method="broyden", h0=2.0
    )
    torch.testing.assert_close(res.value, 2 * rhs)


def test_relative_tolerance_is_per_sample_and_scale_free():
    vjp, exact = linear_system()
    r = rhs_of(1)
    kw = dict(u0=None, max_iter=60, tol=1e-7, method="broyden", h0=-1.0)
    small, large = solve_adjoint(vjp, r, **kw), solve_adjoint(vjp, 1e4 * r, **kw)
    assert small.stats.nstep == large.stats.nstep < 60
    both = solve_adjoint(vjp, torch.cat([r, 1e4 * r]), **kw)
    # the solve is linear in rhs and the test relative: sample 1 is 1e4 times sample 0
    torch.testing.assert_close(both.value[1], 1e4 * both.value[0], rtol=1e-9, atol=0)
    true_rel = (vjp(both.value) - torch.cat([r, 1e4 * r])).norm(dim=1) / torch.cat(
        [r, 1e4 * r]
    ).norm(dim=1)
    torch.testing.assert_close(both.stats.residual, true_rel, rtol=1e-6, atol=1e-18)
    assert bool((both.stats.residual <= 1e-7).all())
    torch.testing.assert_close(both.value, exact(torch.cat([r, 1e4 * r])), rtol=1e-5, atol=0)


def test_memory_defaults_to_the_iterations_and_is_passed_on():
    vjp, _ = linear_system(dim=40, seed=3, strength=2.0)  # slow to converge
    rhs = rhs_of(1, dim=40)
    kw = dict(tol=0.0, method="broyden", h0=-1.0)
    default = solve_adjoint(vjp, rhs, u0=None, max_iter=36, **kw)
    # more updates than Broyden's default memory (30), far from converged
    assert default.stats.nstep == 36 and float(default.stats.residual.max()) > 1e-4
    explicit = solve_adjoint(vjp, rhs, u0=None, max_iter=36, memory=36, **kw)
    torch.testing.assert_close(default.value, explicit.value, rtol=0, atol=0)
    short = solve_adjoint(vjp, rhs, u0=None, max_iter=36, memory=4, **kw)
    assert not torch.allclose(short.value, default.value)
    ift = IFT(max_iter=36, tol=0.0, solver=BroydenAdjoint(memory=4))(vjp, rhs, NO_ESTIMATE)
    torch.testing.assert_close(ift.value, short.value, rtol=0, atol=0)
    refine = Refine(init=JacobianFree(), n_steps=36, solver=BroydenAdjoint())
    out = refine(vjp, rhs, NO_ESTIMATE)
    start = -rhs  # JacobianFree with h0 = -1
    ref = solve_adjoint(vjp, rhs, u0=start, max_iter=36, memory=36, **kw)
    torch.testing.assert_close(out.value, ref.value, rtol=0, atol=0)


def test_conjugate_gradient_gets_start_iterations_and_tolerance():
    vjp, exact = linear_system(dim=12, spd=True)
    rhs = rhs_of(2, dim=12)
    u_star = exact(rhs)
    warm = solve_adjoint(vjp, rhs, u0=u_star, max_iter=1, tol=1e-10, method="cg", h0=1.0)
    torch.testing.assert_close(warm.value, u_star, rtol=1e-10, atol=1e-12)
    two = solve_adjoint(vjp, rhs, u0=None, max_iter=2, tol=1e-14, method="cg", h0=1.0)
    assert two.stats.nstep == 2
    loose = solve_adjoint(vjp, rhs, u0=None, max_iter=50, tol=1e-2, method="cg", h0=1.0)
    tight = solve_adjoint(vjp, rhs, u0=None, max_iter=50, tol=1e-12, method="cg", h0=1.0)
    assert loose.stats.nstep < tight.stats.nstep
    assert float(loose.stats.residual.max()) <= 1e-2


def test_refine_starts_from_init_with_its_warm_start_and_adds_the_vjps():
    vjp, exact = linear_system()
    rhs = rhs_of(2)
    u_star = exact(rhs)
    init = IFT(max_iter=3, tol=1e-10)
    start = init(vjp, rhs, NO_ESTIMATE, u0=u_star)
    out = Refine(init=init, n_steps=1, solver=BroydenAdjoint(), tol=1e-10)(
        vjp, rhs, NO_ESTIMATE, u0=u_star
    )
    torch.testing.assert_close(out.value, u_star, rtol=1e-9, atol=1e-12)
    assert out.stats.n_vjps == start.stats.n_vjps + 1
    cold = IFT(max_iter=3, tol=0.0)
    none = Refine(init=cold, n_steps=0, solver=BroydenAdjoint())(vjp, rhs, NO_ESTIMATE)
    assert none.stats.nstep == 3 and none.stats.residual is not None  # init's result, as is
    one = Refine(init=cold, n_steps=1, solver=BroydenAdjoint())(vjp, rhs, NO_ESTIMATE)
    assert one.stats.nstep == 1 and one.stats.n_vjps == 4 + 2  # evaluations: 1 + steps
    assert not torch.allclose(one.value, none.value)


def test_fallback_passes_vjp_and_warm_start_and_merges_stats():
    vjp, exact = linear_system()
    rhs = rhs_of(2)
    u_star = exact(rhs)
    primary, fallback = IFT(max_iter=2, tol=1e-10), IFT(max_iter=60, tol=1e-12)
    p = primary(vjp, rhs, NO_ESTIMATE, u0=u_star)
    f = fallback(vjp, rhs, NO_ESTIMATE, u0=u_star)
    out = Fallback(primary, fallback, ratio=0.0)(vjp, rhs, NO_ESTIMATE, u0=u_star)
    assert bool(out.stats.fallback_mask.all())
    torch.testing.assert_close(out.value, f.value, rtol=0, atol=0)
    assert out.stats.n_vjps == p.stats.n_vjps + f.stats.n_vjps == 2
    cold = Fallback(IFT(max_iter=4, tol=0.0), JacobianFree(), ratio=0.0)(vjp, rhs, NO_ESTIMATE)
    assert cold.stats.nstep == 4 and cold.stats.n_vjps == 5
    torch.testing.assert_close(cold.value, -rhs)
    single = Fallback(IFT(max_iter=4, tol=0.0), JacobianFree(), ratio=0.0)(
        vjp, rhs[0], NO_ESTIMATE
    )
    assert single.value.shape == rhs[0].shape and single.stats.fallback_mask.shape == ()
    torch.testing.assert_close(single.value, -rhs[0])


def test_diagnose_gives_the_strategy_the_warm_start():
    vjp, exact = linear_system()
    rhs = rhs_of(2)
    u_star = exact(rhs)
    out = Diagnose(IFT(max_iter=1, tol=1e-10))(vjp, rhs, NO_ESTIMATE, u0=u_star)
    torch.testing.assert_close(out.value, u_star, rtol=1e-9, atol=1e-12)
    assert out.stats.extra["cos_to_reference"] == pytest.approx(1.0, abs=1e-9)


def test_adjoint_solver_objects_pass_on_their_settings():
    from shine.backward.strategies import BroydenAdjoint, ConjugateGradientAdjoint
    from shine.solvers import Broyden

    vjp, exact = linear_system()
    rhs = rhs_of(2)
    # the warm start reaches both adjoint solvers: from the solution, one step keeps it
    for solver in (BroydenAdjoint(), ConjugateGradientAdjoint()):
        svjp, sexact = (
            (vjp, exact) if isinstance(solver, BroydenAdjoint) else linear_system(spd=True)
        )
        u = sexact(rhs)
        out = solver(svjp, rhs, NO_ESTIMATE, u0=u, max_iter=1, tol=1e-10)
        torch.testing.assert_close(out.value, u, rtol=1e-9, atol=1e-12)
    # memory is passed on: a memory of 1 term differs from the default (max_iter terms)
    long = dict(u0=None, max_iter=12, tol=0.0)
    big_vjp, _ = linear_system(dim=40, seed=3, strength=2.0)
    big_rhs = rhs_of(1, dim=40)
    one = BroydenAdjoint(memory=1)(big_vjp, big_rhs, NO_ESTIMATE, **long)
    default = BroydenAdjoint()(big_vjp, big_rhs, NO_ESTIMATE, **long)
    assert not torch.allclose(one.value, default.value)
    with pytest.raises(ValueError, match="memory"):
        BroydenAdjoint(memory=0)
    BroydenAdjoint(memory=1)  # valid
    # initial_matrix: h0 (no forward estimate needed), forward = Hᵀ, forward_as_is = H
    fwd = Broyden(max_iter=6, tol=0.0, memory=10, inverse_at="last")(
        lambda z: torch.tanh(z @ (0.5 * torch.eye(8, dtype=DT))) - z + 0.3, rhs.clone()
    )
    H = fwd.inverse
    zero = dict(u0=None, max_iter=1, tol=0.0)  # one step from 0: u = Hinit·rhs
    t = BroydenAdjoint(initial_matrix="forward")(vjp, rhs, fwd, **zero)
    a = BroydenAdjoint(initial_matrix="forward_as_is")(vjp, rhs, fwd, **zero)
    h = BroydenAdjoint(initial_matrix="h0")(vjp, rhs, fwd, **zero)
    torch.testing.assert_close(t.value, H.rmatvec(rhs))
    torch.testing.assert_close(a.value, H.matvec(rhs))
    torch.testing.assert_close(h.value, -rhs)
    for bad in ("forward", "forward_as_is"):
        with pytest.raises(ValueError, match="Broyden-type forward estimate"):
            BroydenAdjoint(initial_matrix=bad)(vjp, rhs, NO_ESTIMATE, **zero)
    for ok in ("h0", "forward", "forward_as_is"):
        BroydenAdjoint(initial_matrix=ok)
    with pytest.raises(ValueError, match="initial_matrix"):
        BroydenAdjoint(initial_matrix="H0")


def test_iteration_counts_of_zero_are_valid_and_batches_of_one_keep_their_shape():
    IFT(max_iter=0, tol=0.0)
    Refine(n_steps=0, tol=0.0)
    for bad in (dict(max_iter=-1), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            IFT(**bad)
    for bad in (dict(n_steps=-1), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            Refine(**bad)
    vjp, _ = linear_system()
    rhs = rhs_of(1)  # a batch of one sample stays (1, D)
    out = Fallback(IFT(max_iter=4, tol=0.0), JacobianFree(), ratio=0.0)(vjp, rhs, NO_ESTIMATE)
    assert out.value.shape == (1, 8) and out.stats.fallback_mask.shape == (1,)
