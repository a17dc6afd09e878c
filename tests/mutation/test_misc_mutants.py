"""Solver bookkeeping, low-rank memory, strategy validation and the DEQ layer's gradient dtype.

Written against the mutants of ``make mutation`` that survived the other tests. Each test checks
a documented promise on a problem small enough to know the answer by hand:

* ``BestIterateTracker``: a sample has converged when ``‖g‖ <= max(tol, rel_tol·‖g(z0)‖)``
  (inclusive, ``tol`` taken at the residuals' precision), the lowest-residual iterate is the
  first one reaching the lowest residual, a non-finite start does not block convergence;
* ``LowRankMemory.push`` with a mask: the samples not updated get a zero term that does not
  count in their estimate;
* ``SolverStats.summary``, ``ScaledIdentity``, ``as_batch``'s error;
* ``Fallback``/``JacobianFree`` field validation;
* ``DEQLayer``: the implicit gradient handed back to autograd has the dtype of the layer output,
  whatever precision the backward strategy computes in.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shine.backward import Fallback, JacobianFree
from shine.backward.base import AdjointResult, AdjointStats
from shine.deq import DEQLayer
from shine.solvers import Broyden
from shine.solvers._tracking import BestIterateTracker
from shine.solvers.base import ScaledIdentity, SolverStats, as_batch
from shine.solvers.low_rank import LowRankMemory

DT = torch.float64
NO_ESTIMATE = SimpleNamespace(inverse=None)  # a forward result without inverse estimate (h0 = -1)


def rows(*norms):
    """A batch ``(B, 2)`` of residuals whose rows have the given Euclidean norms exactly."""
    return torch.tensor([[float(n), 0.0] for n in norms], dtype=DT)


# ---------------------------------------------------------------------------- tracker
def test_tracker_tolerance_is_inclusive_and_relative_tolerance_off_by_default():
    """``‖g‖ <= tol`` converges (equality included), at the start and after an update; without
    ``rel_tol`` the threshold is ``tol`` alone, however large ``‖g(z0)‖`` is."""
    z0 = torch.zeros(3, 2, dtype=DT)
    # norms 5 (= tol: converged), 6 (not), 4 (below tol: converged); 3-4-5 gives exactly 5
    g0 = torch.tensor([[3.0, 4.0], [6.0, 0.0], [4.0, 0.0]], dtype=DT)
    tracker = BestIterateTracker(z0, g0, tol=5.0)
    assert tracker.converged.tolist() == [True, False, True]
    torch.testing.assert_close(tracker.threshold, torch.full((3,), 5.0, dtype=DT))
    z1 = torch.ones(3, 2, dtype=DT)
    tracker.update(z1, rows(1.0, 5.0, 1.0), step=1)  # sample 1 reaches tol exactly
    assert tracker.converged.tolist() == [True, True, True]
    assert tracker.best_step.tolist() == [0, 1, 0]  # converged samples are frozen
    torch.testing.assert_close(tracker.best_residual, torch.tensor([5.0, 5.0, 4.0], dtype=DT))

    no_rel = BestIterateTracker(torch.zeros(1, 2, dtype=DT), rows(100.0), tol=1.0)
    assert not bool(no_rel.converged[0]) and float(no_rel.threshold[0]) == 1.0


def test_tracker_relative_tolerance_scales_the_initial_residual():
    """``rel_tol = 0.25`` with ``‖g(z0)‖ = 8`` gives the threshold 2 (above ``tol``)."""
    tracker = BestIterateTracker(
        torch.zeros(2, 2, dtype=DT), rows(8.0, 8.0), tol=0.5, rel_tol=0.25
    )
    torch.testing.assert_close(tracker.threshold, torch.full((2,), 2.0, dtype=DT))
    tracker.update(torch.ones(2, 2, dtype=DT), rows(1.9, 2.1), step=1)
    assert tracker.converged.tolist() == [True, False]


def test_tracker_float_tolerance_is_not_rounded_to_float32():
    """A float ``tol`` is compared at the residuals' precision (float64 here): a residual just
    above 0.1 has not converged, although it is below float32(0.1) = 0.10000000149..."""
    tracker = BestIterateTracker(torch.zeros(1, 2, dtype=DT), rows(0.1 + 1e-12), tol=0.1)
    assert not bool(tracker.converged[0])
    assert tracker.threshold.dtype == DT and float(tracker.threshold[0]) == 0.1


def test_tracker_keeps_the_first_lowest_iterate_and_recovers_from_a_nonfinite_start():
    """A tie does not replace the best iterate (strict improvement), and a sample whose start
    has an infinite residual converges once an iterate meets the tolerance (rel_tol = 0)."""
    z0 = torch.zeros(2, 2, dtype=DT)
    g0 = torch.tensor([[2.0, 0.0], [float("inf"), 0.0]], dtype=DT)
    tracker = BestIterateTracker(z0, g0, tol=1e-3, rel_tol=0.0)
    assert tracker.best_residual.tolist() == [2.0, float("inf")]
    z1 = torch.ones(2, 2, dtype=DT)
    tracker.update(z1, rows(2.0, 1e-4), step=1)  # sample 0: same residual as z0
    assert tracker.best_step.tolist() == [0, 1]
    assert tracker.converged.tolist() == [False, True]
    torch.testing.assert_close(tracker.best_z, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT))
    stats = tracker.stats(nstep=1, n_evals=2)  # batched statistics by default
    assert stats.residual.shape == (2,) and stats.residual_trace.shape == (2, 2)
    assert stats.lowest_step.tolist() == [0, 1] and stats.converged.tolist() == [False, True]
    single = tracker.stats(nstep=1, n_evals=2, unbatched=True)
    assert single.residual.shape == () and single.residual_trace.shape == (2,)


# ---------------------------------------------------------------------------- low-rank memory
def test_masked_push_gives_the_other_samples_a_zero_term_outside_their_estimate():
    """Push a term for sample 0 only, then one for no sample: sample 1's estimate is
    ``H0 + u_0 v_0ᵀ`` with zero factors in the fresh column, and a column pushed for nobody
    belongs to no estimate (its rank does not grow)."""
    gen = torch.Generator().manual_seed(0)
    u, v = (
        torch.randn(3, 2, 3, dtype=DT, generator=gen),
        torch.randn(3, 2, 3, dtype=DT, generator=gen),
    )
    mem = LowRankMemory(batch=2, dim=3, memory=4, h0=-1.0, policy="fifo", like=u[0])
    mem.push(u[0], v[0], step=1)
    mem.push(u[1], v[1], step=2, mask=torch.tensor([True, False]))
    H = mem.estimate()
    assert torch.equal(H.U[1, 1], torch.zeros(3, dtype=DT))
    assert torch.equal(H.V[1, 1], torch.zeros(3, dtype=DT))
    eye = -torch.eye(3, dtype=DT)
    dense = H.dense()
    torch.testing.assert_close(
        dense[0], eye + torch.outer(u[0, 0], v[0, 0]) + torch.outer(u[1, 0], v[1, 0])
    )
    torch.testing.assert_close(dense[1], eye + torch.outer(u[0, 1], v[0, 1]))

    at = mem.estimate_at(torch.tensor([5, 5]))
    assert at.weights.tolist() == [[1.0, 1.0], [1.0, 0.0]] and at.rank == 2
    mem.push(u[2], v[2], step=3, mask=torch.tensor([False, False]))  # e.g. every update failed
    later = mem.estimate_at(torch.tensor([5, 5]))
    assert later.weights.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]] and later.rank == 2


# ---------------------------------------------------------------------------- base types
def test_scaled_identity_products():
    """``H = c·I``: ``H v = Hᵀ v = c v``, symmetric, rank 0."""
    v = torch.tensor([[1.0, -2.0, 4.0]], dtype=DT)
    H = ScaledIdentity(2.5)
    torch.testing.assert_close(H.matvec(v), 2.5 * v, rtol=0, atol=0)
    torch.testing.assert_close(H.rmatvec(v), 2.5 * v, rtol=0, atol=0)
    assert H.transpose() is H and H.rank == 0
    torch.testing.assert_close(ScaledIdentity().matvec(v), -v, rtol=0, atol=0)  # the DEQ -I


def test_solver_stats_summary_without_prefix():
    """The summary keys are the bare names by default; values: max/mean residual and the
    fraction of converged samples, computed here by hand."""
    stats = SolverStats(
        nstep=3,
        n_evals=5,
        residual_trace=torch.zeros(4, 4, dtype=DT),
        residual=torch.tensor([0.5, 1.5, 1.0, 3.0], dtype=DT),
        converged=torch.tensor([True, False, True, True]),
        lowest_step=torch.zeros(4, dtype=torch.long),
        extra={"rejected_steps": 2.0},
    )
    assert stats.summary() == {
        "nstep": 3.0,
        "n_evals": 5.0,
        "residual_max": 3.0,
        "residual_mean": 1.5,
        "converged_frac": 0.75,
        "rejected_steps": 2.0,
    }
    assert set(stats.summary("fwd/")) == {f"fwd/{k}" for k in stats.summary()}


def test_as_batch_error_says_how_to_fix_the_state():
    with pytest.raises(ValueError, match=r"got \(2, 3, 4\); flatten .* shine\.deq\.flatten"):
        as_batch(torch.zeros(2, 3, 4))


# ---------------------------------------------------------------------------- strategies
def test_fallback_ratio_range_and_jacobian_free_scale_type():
    """``ratio >= 0`` (a ratio below 1 is valid: fall back as soon as ‖u‖ > ratio·‖u_JF‖);
    wrong values and types are refused naming the field."""
    rhs = torch.tensor([[3.0, 4.0]], dtype=DT)  # ‖u_JF‖ = |h0|·‖rhs‖ = 5
    primary = JacobianFree(scale=-0.8)  # ‖u‖ = 4 = 0.8·‖u_JF‖
    for ratio, falls_back in ((0.5, True), (0.9, False), (0.0, True)):
        out = Fallback(primary, JacobianFree(), ratio=ratio)(None, rhs, NO_ESTIMATE)
        assert out.stats.fallback_mask.tolist() == [falls_back]
        torch.testing.assert_close(out.value, (-1.0 if falls_back else -0.8) * rhs)
    with pytest.raises(ValueError, match=r"Fallback\.ratio must be >= 0"):
        Fallback(ratio=-0.1)
    with pytest.raises(TypeError, match=r"Fallback\.ratio"):
        Fallback(ratio="1.3")
    with pytest.raises(TypeError, match=r"JacobianFree\.scale"):
        JacobianFree(scale="-1")
    assert JacobianFree(scale=None).scale is None


# ---------------------------------------------------------------------------- DEQ layer
class Float64Exact:
    """A backward strategy that solves the adjoint system densely in float64.

    It builds ``J_gᵀ`` column by column from the layer's VJPs, then solves ``J_gᵀ u = rhs``
    per sample in double precision and returns a float64 ``u``.
    """

    def __call__(self, vjp, rhs, fwd, *, u0=None):
        B, D = rhs.shape
        cols = [vjp(torch.eye(D, dtype=rhs.dtype)[j].expand(B, D)) for j in range(D)]
        JgT = torch.stack(cols, dim=-1).double()  # (B, D, D): column j = J_gᵀ e_j
        u = torch.linalg.solve(JgT, rhs.double())
        return AdjointResult(u, AdjointStats(n_vjps=D))


def test_deq_layer_hands_back_gradients_in_the_output_dtype():
    """A float32 layer with a float64 backward strategy: the gradient is cast back to float32
    (autograd refuses a hook that changes the dtype) and equals the implicit gradient
    ``dL/dx = uᵀ ∂f/∂x`` computed here in float64 from the exact Jacobian."""
    gen = torch.Generator().manual_seed(3)
    W = 0.5 * torch.randn(4, 4, dtype=DT, generator=gen) / 2.0
    x64 = torch.randn(2, 4, dtype=DT, generator=gen)

    class Tanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(W.float())

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x)

    layer = DEQLayer(Tanh(), Broyden(max_iter=40, tol=1e-6), Float64Exact())
    x = x64.float().requires_grad_(True)
    z = layer(x)
    assert z.dtype == torch.float32
    (gx,) = torch.autograd.grad((z.double() ** 2).sum(), x)
    assert gx.dtype == torch.float32 and layer.last_backward.value.dtype == DT

    with torch.no_grad():  # float64 reference: z* by fixed-point iteration, dense solve
        zs = torch.zeros_like(x64)
        for _ in range(200):
            zs = torch.tanh(zs @ W.T + x64)
        s = 1 - zs**2  # tanh' at the fixed point (z_out = f(z*) = z*)
        Jf = s[:, :, None] * W[None]
        u = torch.linalg.solve((torch.eye(4, dtype=DT) - Jf).transpose(1, 2), 2 * zs)
    torch.testing.assert_close(gx.double(), u * s, rtol=1e-4, atol=1e-5)
