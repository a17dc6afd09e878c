"""ScipyLBFGSB against SciPy's L-BFGS-B called directly and against hand-derived iterations.

Hand derivation used below (1-D, ``r(z) = z²/2``, ``z0 = 2``): L-BFGS-B's first step is the
steepest descent step of length ``1/‖g‖`` (``z1 = z0 - g0/|g0| = 1``, accepted: Wolfe holds);
its second step uses the pair ``s = y = -1`` (``H = 1``), ``z2 = z1 - g1 = 0``, ``g = 0``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from shine.bilevel.losses import L2Regularized, LogisticLoss
from shine.solvers import LBFGSMemory, ScipyLBFGSB

DT = torch.float64


def half_square(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.5 * (z * z).sum(), z.clone()


def recording(fun):
    """``fun`` wrapped to record every point it is evaluated at."""
    points: list[torch.Tensor] = []

    def recorded(z):
        points.append(z.clone())
        return fun(z)

    return recorded, points


def scipy_reference(fun, x0: np.ndarray, **options):
    """SciPy's L-BFGS-B on ``fun`` (torch in, torch out) with the wrapper's native tests off."""

    def f(x):
        value, grad = fun(torch.from_numpy(x.copy()))
        return float(value), grad.detach().to(DT).numpy().copy()

    opts = {"ftol": 0.0, "gtol": 0.0, "maxls": 20} | options
    return scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", options=opts)


def logistic_problem(seed: int = 0, n: int = 60, p: int = 8) -> L2Regularized:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=gen, dtype=DT)
    y = torch.where(X @ torch.randn(p, generator=gen, dtype=DT) > 0, 1.0, -1.0).to(DT)
    return L2Regularized(LogisticLoss(X, y))


# ---------------------------------------------------------------- stopping rule and statistics


def test_hand_derived_iterates_and_the_strict_tolerance():
    z0 = torch.tensor([2.0], dtype=DT)
    # one iteration: z1 = 1 with ‖g‖ = 1 = tol; "< tol" is strict, so not converged
    one = ScipyLBFGSB(max_iter=1, tol=1.0, stop_test="iterates")(half_square, z0)
    assert scipy_reference(half_square, z0.numpy(), maxiter=1).x.tolist() == [1.0]
    assert one.value.tolist() == [1.0] and one.stats.nstep == 1
    assert not bool(one.stats.converged)
    assert one.stats.lowest_step.dim() == 0 and int(one.stats.lowest_step) == 1
    # tested at iterates: z1 does not pass, z2 ≈ 0 does (L-BFGS-B's compact form leaves a
    # rounding error of one ulp of z1): two iterations, returned by SciPy
    two = ScipyLBFGSB(max_iter=10, tol=1.0, stop_test="iterates")(half_square, z0)
    assert abs(float(two.value)) < 1e-15 and two.stats.nstep == 2 and two.stats.n_evals == 3
    assert bool(two.stats.converged) and two.stats.extra["stopped_in_line_search"] == 0.0
    # tested at every evaluation: z1 (‖g‖ = tol) does not pass either; the trial point z2 of the
    # second line search does, before it is accepted (one accepted iterate)
    every = ScipyLBFGSB(max_iter=10, tol=1.0)(half_square, z0)
    assert abs(float(every.value)) < 1e-15 and every.stats.n_evals == 3
    assert every.stats.nstep == 1 and bool(every.stats.converged)
    assert every.stats.extra["stopped_in_line_search"] == 1.0
    # the trace holds ‖g‖ of the accepted iterates (then of the stopping trial point), in the
    # dtype of z0; residual is the last one; value is r at the returned point
    for res in (two, every):
        trace = res.stats.residual_trace
        assert trace.dtype == DT and res.stats.residual.dtype == DT
        assert trace[:2].tolist() == [2.0, 1.0] and len(trace) == 3
        assert float(trace[2]) == float(res.stats.residual) == abs(float(res.value))
        assert res.stats.extra["value"] == float(half_square(res.value)[0])
        assert res.stats.extra["n_opa_updates"] == 0.0
        assert int(res.stats.lowest_step) == res.stats.nstep


def test_zero_iterations_and_a_converged_start():
    z0 = torch.tensor([2.0], dtype=DT)
    recorded, points = recording(half_square)
    none = ScipyLBFGSB(max_iter=0, tol=1e-12)(recorded, z0)
    assert len(points) == 1 and torch.equal(points[0], z0)
    assert none.stats.nstep == 0 and none.stats.n_evals == 1
    assert not bool(none.stats.converged)
    assert none.value.tolist() == [2.0] and none.stats.residual_trace.tolist() == [2.0]
    assert none.stats.extra["stopped_in_line_search"] == 0.0
    assert none.stats.extra["value"] == 2.0 and len(none.state) == 0
    # a start that passes the test returns at once in both modes (x0 is tested either way)
    for stop_test in ("iterates", "every_evaluation"):
        points.clear()
        at_x0 = ScipyLBFGSB(tol=2.5, stop_test=stop_test)(recorded, z0)
        assert len(points) == 1 and at_x0.stats.n_evals == 1 and at_x0.stats.nstep == 0
        assert bool(at_x0.stats.converged) and at_x0.value.tolist() == [2.0]
        assert at_x0.stats.extra["stopped_in_line_search"] == 0.0
        assert at_x0.stats.residual_trace.tolist() == [2.0]


def test_iterates_mode_stops_at_the_first_accepted_iterate_below_tol():
    # the same trajectory with tol = 0 gives the gradient norms of the accepted iterates: the
    # solve tested at iterates stops at the first one below tol, with its trace as a prefix
    fun = logistic_problem().objective(torch.tensor(-1.0, dtype=DT))
    z0 = torch.zeros(8, dtype=DT)
    full = ScipyLBFGSB(max_iter=30, tol=0.0, stop_test="iterates")(fun, z0)
    norms = full.stats.residual_trace
    assert full.stats.nstep > 11
    tol = float(norms[10]) * 1.5
    k = int(torch.nonzero(norms < tol)[0])
    assert 0 < k <= 10
    res = ScipyLBFGSB(max_iter=30, tol=tol, stop_test="iterates")(fun, z0)
    assert res.stats.nstep == k and bool(res.stats.converged)
    torch.testing.assert_close(res.stats.residual_trace, norms[: k + 1], rtol=0, atol=0)


def test_settings_reach_scipy_without_warnings():
    # every option passed is one L-BFGS-B knows (an unknown one is ignored with an
    # OptimizeWarning, i.e. the setting would silently not apply); nothing else warns
    fun = logistic_problem().objective(torch.tensor(-1.0, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ScipyLBFGSB(max_iter=50, tol=1e-5, memory=4, max_ls=5)(fun, torch.zeros(8, dtype=DT))
    assert bool(res.stats.converged)


def test_errors():
    with pytest.raises(ValueError, match="empty memory"):
        ScipyLBFGSB()(half_square, torch.zeros(2, dtype=DT), warm_start=_one_pair_memory())


def _one_pair_memory() -> LBFGSMemory:
    one = torch.ones(1, 2, dtype=DT)
    return LBFGSMemory(one, one, None, 1.0)


# ---------------------------------------------------------------- failed line search


def wall(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z²/2`` with gradient ``z``, but ``r = 10`` for ``|z| < 0.9``: from ``z0 = 2`` the first
    step reaches ``z1 = 1``; every line search from ``z1`` lands in the wall and, with
    ``max_ls = 3``, fails (L-BFGS-B restarts once from ``z1`` without memory, fails again and
    stops abnormally at ``z1``)."""
    value = 0.5 * (z * z).sum() if float(z.abs().max()) >= 0.9 else torch.tensor(10.0, dtype=DT)
    return value, z.clone()


def test_failed_line_search_returns_the_last_iterate(caplog):
    z0 = torch.tensor([2.0], dtype=DT)
    ref = scipy_reference(wall, z0.numpy(), maxls=3, maxiter=50)
    assert "ABNORMAL" in ref.message and ref.nit == 1 and ref.x.tolist() == [1.0]
    # 2 evaluations (z0, z1), then 2 failed line searches of max_ls = 3 evaluations each
    assert ref.nfev == 2 + 2 * 3
    with caplog.at_level(logging.WARNING, logger="shine.solvers.scipy_lbfgsb"):
        res = ScipyLBFGSB(max_iter=50, tol=0.0, max_ls=3)(wall, z0)
    assert res.value.tolist() == [1.0] and res.stats.nstep == 1
    assert res.stats.n_evals == ref.nfev
    assert res.stats.extra["stopped_in_line_search"] == 0.0  # returned at an accepted iterate
    assert res.stats.residual_trace.tolist() == [2.0, 1.0] and float(res.stats.residual) == 1.0
    # value is r at the returned point (SciPy's own res.fun is the failed trial point's 10.0)
    assert res.stats.extra["value"] == float(wall(res.value)[0]) == 0.5
    assert not bool(res.stats.converged)
    # the abnormal termination is logged with SciPy's message and the iterations done
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "ABNORMAL" in record.getMessage() and "after 1 iterations" in record.getMessage()
    # a normal termination (iteration limit) logs nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shine.solvers.scipy_lbfgsb"):
        ScipyLBFGSB(max_iter=1, tol=0.0)(half_square, z0)
    assert not caplog.records


def test_line_search_failing_from_the_start_returns_z0_and_its_value():
    """From ``z0 = 1`` (already next to the wall) the first line search fails: SciPy stops
    abnormally without an iteration; the solver returns ``z0`` and ``value = r(z0)``, the one
    accepted iterate (its value recorded at the first evaluation)."""
    z0 = torch.tensor([1.0], dtype=DT)
    ref = scipy_reference(wall, z0.numpy(), maxls=3, maxiter=50)
    assert "ABNORMAL" in ref.message and ref.nit == 0 and ref.x.tolist() == [1.0]
    res = ScipyLBFGSB(max_iter=50, tol=0.0, max_ls=3)(wall, z0)
    assert res.value.tolist() == [1.0] and res.stats.nstep == 0
    assert res.stats.extra["value"] == 0.5 and len(res.state) == 0


# ---------------------------------------------------------------- the pair-skipping rule


T_LIN, T_QUAD, CURV = 1e10, 2.5e10, 1e9


def piecewise_linear(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D: ``r = -z`` with gradient ``-1`` up to ``T_LIN``, ``-1 + 2⁻⁵²`` on
    ``[T_LIN, T_QUAD)``, then ``r = -z + (z - T_QUAD)²/(2 CURV)`` (a minimum at
    ``T_QUAD + CURV``).

    From ``z0 = 0`` (``d = 1``) each of the first two line searches extrapolates (trial steps
    1, 5, 21, ...) up to L-BFGS-B's step bound 1e10, where it ends with "STP = STPMAX",
    accepted: step 1 ``s = 1e10``, ``y = 2⁻⁵²``, so ``sᵀy = ε·(-g₀ᵀs)`` exactly (the boundary of
    the skip rule ``sᵀy <= ε·(-gᵀs)``: skipped); step 2 ``y = 0`` (skipped); the third line
    search reaches the quadratic part and ends with a Wolfe step (a pair kept)."""
    x = float(z[0])
    if x < T_LIN:
        value, grad = -x, -1.0
    elif x < T_QUAD:
        value, grad = -x, -1.0 + 2.0**-52
    else:
        value, grad = -x + (x - T_QUAD) ** 2 / (2 * CURV), -1.0 + (x - T_QUAD) / CURV
    return torch.tensor(value, dtype=DT), torch.tensor([grad], dtype=DT)


def test_skipped_pairs_follow_lbfgsb_own_rule():
    z0 = torch.zeros(1, dtype=DT)
    res = ScipyLBFGSB(max_iter=3, tol=0.0, memory=5, stop_test="iterates")(piecewise_linear, z0)
    # SciPy's workspace after 4 iterations holds the pairs L-BFGS-B itself kept in 3
    ref = scipy_reference(piecewise_linear, z0.numpy(), maxcor=5, maxiter=4)
    assert res.stats.nstep == 3 and ref.nit == 4
    assert res.stats.extra["n_skipped_pairs"] == 2.0
    assert res.stats.extra["n_committed"] == 1.0 == len(res.state)
    assert ref.hess_inv.sk.shape == (1, 1)
    np.testing.assert_allclose(res.state.s.numpy(), ref.hess_inv.sk, rtol=1e-12)
    np.testing.assert_allclose(res.state.y.numpy(), ref.hess_inv.yk, rtol=1e-12)


# ---------------------------------------------------------------- dtypes


def test_float32_start_keeps_float64_arithmetic():
    # the objective gets float32 tensors, the results are float32, and the pairs and γ are
    # those of SciPy's float64 iteration (its own workspace), rounded once at the end
    fun64 = logistic_problem(2).objective(torch.tensor(-2.0, dtype=DT))
    dtypes = []

    def fun32(z):
        dtypes.append(z.dtype)
        value, grad = fun64(z.to(DT))
        return value.to(torch.float32), grad.to(torch.float32)

    z0 = torch.full((8,), 0.3, dtype=torch.float32)
    res = ScipyLBFGSB(max_iter=6, tol=0.0, memory=10, stop_test="iterates")(fun32, z0)
    assert set(dtypes) == {torch.float32}
    assert res.value.dtype == torch.float32
    assert res.state.s.dtype == res.state.y.dtype == torch.float32
    assert res.inverse.dense().dtype == torch.float32
    ref = scipy_reference(lambda z: fun32(z.to(torch.float32)), z0.double().numpy(), maxiter=7)
    sk, yk = ref.hess_inv.sk, ref.hess_inv.yk
    assert res.stats.extra["n_committed"] == len(sk) == 6
    assert res.state.gamma == pytest.approx(float(sk[-1] @ yk[-1] / (yk[-1] @ yk[-1])), rel=1e-13)
    torch.testing.assert_close(res.state.s, torch.from_numpy(sk).float(), rtol=2e-7, atol=0)
    torch.testing.assert_close(res.state.y, torch.from_numpy(yk).float(), rtol=2e-7, atol=0)


@pytest.mark.gpu  # CUDA-only mutants (equivalent.txt "cuda-only"); skipped without a device
def test_results_live_on_the_device_of_z0():
    # documented: the computation runs on the CPU, the objective receives tensors of z0's
    # device and dtype, and every returned tensor lives on that device
    devices = []

    def fun(z):
        devices.append(z.device.type)
        return half_square(z)

    z0 = torch.tensor([2.0, -1.0], dtype=DT, device="cuda")
    res = ScipyLBFGSB(max_iter=1, tol=0.0, stop_test="iterates")(fun, z0)
    assert set(devices) == {"cuda"}
    stats = res.stats
    tensors = [res.value, res.state.s, res.state.y, res.inverse.dense()]
    tensors += [stats.residual_trace, stats.residual, stats.converged, stats.lowest_step]
    assert all(t.device.type == "cuda" for t in tensors)
    empty = ScipyLBFGSB(max_iter=0)(fun, z0)
    assert empty.value.device.type == "cuda" and empty.state.s.device.type == "cuda"
