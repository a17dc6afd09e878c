"""Backward strategies against the exact adjoint solution ``J_g(z*)^{-T} rhs`` (dense solve)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from deq_problems import DT, make_problem

from shine.backward import (
    IFT,
    BroydenAdjoint,
    ConjugateGradientAdjoint,
    Diagnose,
    Fallback,
    JacobianFree,
    Refine,
    Shine,
)
from shine.backward.base import AdjointResult, AdjointStats
from shine.solvers import Anderson, Broyden
from shine.solvers.base import ScaledIdentity, SolverResult, SolverStats


@pytest.fixture(scope="module")
def setup():
    prob = make_problem(dim=10, batch=3, contraction=0.7)
    fwd = Broyden(max_iter=60, tol=1e-12, memory=60)(prob.g, torch.zeros_like(prob.x))
    J = prob.jacobian(fwd.value)

    def vjp(u):
        return torch.einsum("bji,bj->bi", J, u)

    rhs = torch.randn(3, 10, dtype=DT, generator=torch.Generator().manual_seed(5))
    exact = torch.linalg.solve(J.transpose(1, 2), rhs)
    return prob, fwd, vjp, rhs, exact


def rel_err(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def test_ift_solves_adjoint_system(setup):
    _, fwd, vjp, rhs, exact = setup
    out = IFT(max_iter=100, tol=1e-12)(vjp, rhs, fwd)
    assert rel_err(out.value, exact) < 1e-10
    assert out.stats.n_vjps == out.stats.nstep + 1
    assert float(out.stats.residual.max()) <= 1e-12


def test_ift_warm_start_from_solution_needs_no_iteration(setup):
    _, fwd, vjp, rhs, exact = setup
    out = IFT(max_iter=50, tol=1e-8)(vjp, rhs, fwd, u0=exact)
    assert out.stats.nstep == 0
    torch.testing.assert_close(out.value, exact)


def test_limited_ift_is_truncated(setup):
    _, fwd, vjp, rhs, _ = setup
    out = IFT(max_iter=2, tol=1e-12)(vjp, rhs, fwd)
    assert out.stats.nstep == 2 and out.stats.n_vjps == 3


def test_jacobian_free_and_shine_formulas(setup):
    _, fwd, vjp, rhs, exact = setup
    torch.testing.assert_close(JacobianFree()(vjp, rhs, fwd).value, -rhs)
    torch.testing.assert_close(JacobianFree(scale=2.0)(vjp, rhs, fwd).value, 2 * rhs)
    shine = Shine()(vjp, rhs, fwd).value
    torch.testing.assert_close(shine, torch.einsum("bji,bj->bi", fwd.inverse.dense(), rhs))
    # at a converged Broyden solve SHINE is a far better inverse than the identity
    assert rel_err(shine, exact) < rel_err(-rhs, exact)


def test_shine_without_estimate_raises(setup):
    prob, _, vjp, rhs, _ = setup
    fwd = Anderson(max_iter=30, tol=1e-10)(prob.g, torch.zeros_like(prob.x))
    with pytest.raises(ValueError, match="JacobianFree or IFT"):
        Shine()(vjp, rhs, fwd)
    torch.testing.assert_close(JacobianFree()(vjp, rhs, fwd).value, -rhs)


def test_refine_zero_steps_is_its_init(setup):
    _, fwd, vjp, rhs, _ = setup
    for init in (Shine(), JacobianFree()):
        out = Refine(init=init, n_steps=0)(vjp, rhs, fwd)
        torch.testing.assert_close(out.value, init(vjp, rhs, fwd).value)
        assert out.stats.n_vjps == 0


def test_refine_many_steps_converges_to_ift(setup):
    _, fwd, vjp, rhs, exact = setup
    for strat in (
        Refine(init=Shine(), n_steps=60, tol=1e-13),
        Refine(init=JacobianFree(), n_steps=60, solver=BroydenAdjoint(), tol=1e-13),
        Refine(
            init=Shine(),
            n_steps=60,
            solver=BroydenAdjoint(initial_matrix="forward_as_is"),
            tol=1e-13,
        ),
    ):
        assert rel_err(strat(vjp, rhs, fwd).value, exact) < 1e-9


def test_refine_error_decreases_with_steps_and_transpose_beats_official(setup):
    _, fwd, vjp, rhs, exact = setup
    errs = [
        rel_err(Refine(init=Shine(), n_steps=n)(vjp, rhs, fwd).value, exact) for n in (1, 3, 6)
    ]
    assert errs[2] < errs[0]
    official = rel_err(
        Refine(init=Shine(), n_steps=3, solver=BroydenAdjoint(initial_matrix="forward_as_is"))(
            vjp, rhs, fwd
        ).value,
        exact,
    )
    assert errs[1] < official


def test_refine_reuse_requires_broyden_estimate(setup):
    prob, _, vjp, rhs, _ = setup
    fwd = Anderson(max_iter=30, tol=1e-10)(prob.g, torch.zeros_like(prob.x))
    with pytest.raises(ValueError, match="use initial_matrix='h0'"):
        Refine(init=JacobianFree(), n_steps=2)(vjp, rhs, fwd)
    with pytest.raises(ValueError, match="initial_matrix must be"):
        BroydenAdjoint(initial_matrix="transpose")


def test_adjoint_solver_objects_solve_the_adjoint_system(setup):
    # IFT with the Broyden adjoint solver reaches J_g^{-T} rhs on the DEQ problem; with CG on a
    # symmetric positive definite system (CG's domain: HOAG's inner Hessian)
    _, fwd, vjp, rhs, exact = setup
    u = IFT(max_iter=80, tol=1e-12, solver=BroydenAdjoint())(vjp, rhs, fwd).value
    assert rel_err(u, exact) < 1e-8
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, dtype=DT, generator=gen)
    spd = a @ a.T + 6 * torch.eye(6, dtype=DT)
    b = torch.randn(6, dtype=DT, generator=gen)
    none = SolverResult(torch.zeros(6, dtype=DT), fwd.stats)  # CG reads no forward result
    cg = IFT(max_iter=50, tol=1e-13, solver=ConjugateGradientAdjoint())
    u_cg = cg(lambda w: spd @ w, b, none).value
    assert torch.allclose(u_cg, torch.linalg.solve(spd, b), atol=1e-10)
    # two Broyden steps from the forward estimate beat two from h0 (the refine of §2.1)
    two = {
        m: Refine(JacobianFree(), n_steps=2, solver=BroydenAdjoint(initial_matrix=m))(
            vjp, rhs, fwd
        ).value
        for m in ("h0", "forward")
    }
    assert rel_err(two["forward"], exact) < 0.5 * rel_err(two["h0"], exact)


@dataclass(frozen=True)
class Scaled:
    """A crafted 'bad estimate': the primary answer scaled per sample."""

    factors: tuple[float, ...]

    def __call__(self, vjp, rhs, fwd, *, u0=None):
        f = torch.tensor(self.factors, dtype=rhs.dtype)[:, None]
        return AdjointResult(f * rhs, AdjointStats())


def test_fallback_mask_on_crafted_bad_estimate(setup):
    _, fwd, vjp, rhs, _ = setup
    primary = Scaled((1.0, 5.0, float("nan")))
    out = Fallback(primary=primary, fallback=JacobianFree(), ratio=1.3)(vjp, rhs, fwd)
    assert out.stats.fallback_mask.tolist() == [False, True, True]
    torch.testing.assert_close(out.value[0], rhs[0])
    torch.testing.assert_close(out.value[1:], -rhs[1:])
    assert out.stats.summary()["fallback_frac"] == pytest.approx(2 / 3)
    # the official threshold 1.8 keeps a 1.5x answer that 1.3 rejects
    mid = Scaled((1.5, 1.0, 1.0))
    assert Fallback(primary=mid, ratio=1.8)(vjp, rhs, fwd).stats.fallback_mask.sum() == 0
    assert Fallback(primary=mid, ratio=1.3)(vjp, rhs, fwd).stats.fallback_mask.sum() == 1


def test_fallback_unbatched():
    rhs = torch.ones(4, dtype=DT)
    fwd = SolverResult(
        value=rhs,
        stats=SolverStats(0, 0, rhs[None], rhs.norm(), torch.tensor(True), torch.tensor(0)),
        inverse=ScaledIdentity(3.0),
    )
    # the Jacobian-Free scale is inferred from the forward estimate's initial matrix
    torch.testing.assert_close(JacobianFree()(lambda u: u, rhs, fwd).value, 3.0 * rhs)
    # SHINE's answer here is the Jacobian-Free one (H = H0 = 3 I): no reason to fall back
    out = Fallback(fallback=JacobianFree(scale=-1.0), ratio=1.3)(lambda u: u, rhs, fwd)
    assert out.stats.fallback_mask.shape == () and not bool(out.stats.fallback_mask)
    torch.testing.assert_close(out.value, 3.0 * rhs)
    # the test is against ‖u_JF‖ = 3 ‖rhs‖ (the paper's), not ‖rhs‖: 2 ‖rhs‖ is kept, 5 is not
    for factor, falls_back in ((2.0, False), (5.0, True)):
        primary = Scaled((factor,))
        out = Fallback(primary=primary, fallback=JacobianFree(scale=-1.0), ratio=1.3)(
            lambda u: u, rhs[None], fwd
        )
        assert out.stats.fallback_mask.tolist() == [falls_back]


def test_diagnose_reports_agreement(setup):
    _, fwd, vjp, rhs, exact = setup
    out = Diagnose(strategy=IFT(max_iter=100, tol=1e-12))(vjp, rhs, fwd)
    assert out.stats.extra["cos_to_reference"] == pytest.approx(1.0, abs=1e-9)
    assert out.stats.extra["ratio_to_reference"] == pytest.approx(1.0, abs=1e-8)
    jf = Diagnose(strategy=JacobianFree())(vjp, rhs, fwd)
    # the statistics are those of the JF answer against the exact one, computed here directly
    u_jf = JacobianFree()(vjp, rhs, fwd).value
    cos = (u_jf * exact).sum(-1) / (u_jf.norm(dim=-1) * exact.norm(dim=-1))
    assert jf.stats.extra["cos_to_reference"] == pytest.approx(float(cos.mean()), rel=1e-6)
    ratio = u_jf.norm(dim=-1) / exact.norm(dim=-1)
    assert jf.stats.extra["ratio_to_reference"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert float(cos.mean()) < 0.99  # JF is visibly off on this problem


def test_fallback_on_a_real_shine_estimate():
    # a real Broyden forward on a DEQ close to its contraction limit, stopped early: the SHINE
    # directions of some samples are much longer than their Jacobian-Free ones. With the ratio
    # set between the samples' norm ratios, exactly those above it fall back, to -rhs
    prob = make_problem(dim=10, batch=6, contraction=0.95, seed=3)
    fwd = Broyden(max_iter=8, tol=1e-12, memory=8)(prob.g, torch.zeros_like(prob.x))
    rhs = torch.randn(6, 10, dtype=DT, generator=torch.Generator().manual_seed(8))
    shine = Shine()(None, rhs, fwd).value
    ratios = shine.norm(dim=-1) / rhs.norm(dim=-1)  # |h0| = 1
    assert float(ratios.max() / ratios.min()) > 1.05  # the samples differ
    threshold = float(ratios.median())
    out = Fallback(primary=Shine(), fallback=JacobianFree(), ratio=threshold)(None, rhs, fwd)
    expected = ratios > threshold
    assert out.stats.fallback_mask.tolist() == expected.tolist()
    assert 0 < int(expected.sum()) < 6
    torch.testing.assert_close(out.value[expected], -rhs[expected])
    torch.testing.assert_close(out.value[~expected], shine[~expected])
