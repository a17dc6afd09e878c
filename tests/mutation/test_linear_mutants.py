"""Batched conjugate gradient against exact linear algebra and hand-derived iterations.

References: the CG iterate ``x_k`` minimises the ``A``-norm error over the Krylov space
``K_k(A, b)`` (computed here by a dense Galerkin solve), CG terminates in ``k`` steps on a system
with ``k`` distinct eigenvalues, and small diagonal systems whose iterations are done by hand.
"""

from __future__ import annotations

import pytest
import torch

from shine.solvers import ConjugateGradient

DT = torch.float64

# 6 x 6 diagonal SPD matrix with 3 distinct eigenvalues: CG ends in exactly 3 steps
EIGS = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0, 4.0], dtype=DT)
B_HAT = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 0.7], dtype=DT)
B_HAT = B_HAT / B_HAT.norm()


def krylov_iterate(b: torch.Tensor, k: int) -> torch.Tensor:
    """``argmin_{x ∈ K_k(A, b)} ‖x - A⁻¹b‖_A`` by a dense Galerkin solve (``A = diag(EIGS)``)."""
    if k == 0:
        return torch.zeros_like(b)
    basis = torch.stack([EIGS**j * b for j in range(k)], dim=1)
    return basis @ torch.linalg.solve(basis.T @ (EIGS[:, None] * basis), basis.T @ b)


def diag_matvec(v: torch.Tensor) -> torch.Tensor:
    return EIGS * v


def test_tolerance_is_relative_to_each_right_hand_side_norm():
    # the same direction at two scales: CG is scale invariant, so with the rule
    # ‖r_k‖ <= tol·‖b‖ both samples stop at the same step; tol lies between the relative
    # residuals of steps 1 and 2, so that step is 2
    b = torch.stack([10.0 * B_HAT, 0.1 * B_HAT])
    ref_x = [krylov_iterate(B_HAT, k) for k in range(4)]
    rho = [float((B_HAT - EIGS * x).norm()) for x in ref_x]  # relative residuals, ‖b̂‖ = 1
    assert rho[2] < rho[1] / 2 and rho[3] < 1e-12
    tol = (rho[1] * rho[2]) ** 0.5
    res = ConjugateGradient(max_iter=50, tol=tol)(diag_matvec, b)
    st = res.stats
    assert st.nstep == 2 and st.lowest_step.tolist() == [2, 2]
    assert st.converged.tolist() == [True, True]
    scale = torch.tensor([10.0, 0.1], dtype=DT)
    expected_trace = torch.tensor(rho[:3], dtype=DT)[:, None] * scale
    torch.testing.assert_close(st.residual_trace, expected_trace, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.value, ref_x[2] * scale[:, None], rtol=1e-10, atol=1e-13)
    # a tight tolerance: finite termination after as many steps as distinct eigenvalues
    exact = ConjugateGradient(max_iter=50, tol=1e-10)(diag_matvec, b)
    assert exact.stats.nstep == 3 and bool(exact.stats.converged.all())
    torch.testing.assert_close(exact.value, b / EIGS, rtol=1e-12, atol=0)


def test_zero_tolerance_accepts_an_exactly_zero_residual():
    # A = 2I: alpha = bᵀb / (2 bᵀb) = 1/2 exactly and r_1 = b - (1/2)(2b) = 0 exactly, so with
    # tol = 0 the rule ‖r‖ <= 0·‖b‖ holds after one step (no further step, no curvature stop)
    b = B_HAT * 3.0
    res = ConjugateGradient(max_iter=10, tol=0.0)(lambda v: 2.0 * v, b)
    st = res.stats
    assert st.nstep == 1 and st.n_evals == 1
    assert bool(st.converged) and float(st.residual) == 0.0
    assert st.extra["n_nonpositive_curvature"] == 0.0
    assert st.lowest_step.dim() == 0 and int(st.lowest_step) == 1
    assert torch.equal(res.value, 1.5 * B_HAT)


def test_matvec_receives_the_shape_of_b_for_a_batch_of_one():
    # documented: matvec receives tensors of the shape of b, (B, D) even when B = 1
    shapes = []
    mat = torch.diag(EIGS)[None]

    def matvec(v):
        shapes.append(tuple(v.shape))
        return torch.einsum("bij,bj->bi", mat, v)

    res = ConjugateGradient(max_iter=50, tol=1e-10)(matvec, B_HAT[None])
    assert res.value.shape == (1, 6) and res.stats.nstep == 3
    assert shapes == [(1, 6)] * 3
    torch.testing.assert_close(res.value[0], B_HAT / EIGS, rtol=1e-12, atol=0)


def test_warm_start_of_another_dtype_and_zero_iterations():
    # a float32 warm start is cast to b's float64: the solve is as accurate as a float64 one
    b = torch.stack([B_HAT, -2.0 * B_HAT])
    x0 = torch.ones(2, 6, dtype=torch.float32)
    res = ConjugateGradient(max_iter=50, tol=1e-12)(diag_matvec, b, x0=x0)
    assert res.value.dtype == DT and res.stats.n_evals == res.stats.nstep + 1
    torch.testing.assert_close(res.value, b / EIGS, rtol=1e-12, atol=0)
    # max_iter = 0 is allowed: the warm start itself, with its residual, one product
    none = ConjugateGradient(max_iter=0, tol=1e-12)(diag_matvec, b, x0=x0)
    assert none.stats.nstep == 0 and none.stats.n_evals == 1
    assert not bool(none.stats.converged.any())
    torch.testing.assert_close(none.value, x0.to(DT), rtol=0, atol=0)
    torch.testing.assert_close(none.stats.residual, (b - EIGS * x0.to(DT)).norm(dim=-1))
    with pytest.raises(ValueError, match="max_iter"):
        ConjugateGradient(max_iter=-1)


def test_nonpositive_curvature_at_different_steps():
    # hand-derived, D = 3, b = (1, 1, 0) for the two indefinite samples:
    # sample 0, A = diag(1, -1, 1): p₀ᵀAp₀ = 1 - 1 = 0 at step 1 -> stops, keeps x₀ = 0;
    # sample 1, A = diag(1, -1/2, 1): p₀ᵀAp₀ = 1/2, α = 4, x₁ = (4, 4, 0), r₁ = (-3, 3, 0),
    #   β = 18/2, p₁ = (6, 12, 0), p₁ᵀAp₁ = 36 - 72 < 0 at step 2 -> stops, keeps x₁;
    # sample 2, A = diag(1, 2, 4) SPD with 3 distinct eigenvalues: converges at step 3.
    diag = torch.tensor([[1.0, -1.0, 1.0], [1.0, -0.5, 1.0], [1.0, 2.0, 4.0]], dtype=DT)
    b = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, -1.0, 2.0]], dtype=DT)
    calls = []

    def matvec(v):
        calls.append(v.clone())
        return diag * v

    res = ConjugateGradient(max_iter=20, tol=1e-10)(matvec, b)
    st = res.stats
    assert st.extra["n_nonpositive_curvature"] == 2.0  # one per sample, counted once each
    assert st.converged.tolist() == [False, False, True]
    assert st.nstep == 3 and st.lowest_step.tolist() == [0, 1, 3]
    expected = torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [1.0, -0.5, 0.5]], dtype=DT)
    torch.testing.assert_close(res.value, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.residual[:2], torch.tensor([2.0, 18.0], dtype=DT).sqrt())
    # a stopped sample's state is frozen: every later product requested for it is of its
    # final residual b - A x (generalises the zero vectors a converged sample with r = 0 gets)
    final_residual = b - diag * res.value
    assert len(calls) == 3
    for step in (1, 2):
        torch.testing.assert_close(calls[step][0], final_residual[0], rtol=0, atol=0)
    torch.testing.assert_close(calls[2][1], final_residual[1], rtol=0, atol=0)


@pytest.mark.gpu  # CUDA-only mutants (equivalent.txt "cuda-only"); skipped without a device
def test_cuda_batch():
    # the per-sample bookkeeping lives on b's device (mixed devices would fail in torch.where)
    b = torch.stack([B_HAT, 3.0 * B_HAT]).cuda()
    eigs = EIGS.cuda()
    res = ConjugateGradient(max_iter=50, tol=1e-10)(lambda v: eigs * v, b)
    assert res.stats.lowest_step.device.type == "cuda" and res.stats.nstep == 3
    torch.testing.assert_close(res.value, b / eigs, rtol=1e-12, atol=0)
