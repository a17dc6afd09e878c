"""The L-BFGS driver (``LBFGS.__call__``): stopping rules, restarts, counters, pair rules.

Every scenario below is small enough to be followed by hand: the expected iterates, counts and
decisions are derived in the comments from the documented algorithm (class docstring of
:class:`~shine.solvers.LBFGS`), not read off the solver. Most problems are quadratics with
power-of-two data, so that the boundary cases of the documented inequalities (``<=`` of the
stopping test, ``>`` of the curvature rule, ``<=`` of the noise floor) are hit exactly in float64.
Scenarios that involve ``[S Y]ᵀ∇r`` run twice: below and above ``_CACHE_MIN_DIM``, where the
solver keeps that projection across iterations instead of recomputing it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.recording import recorded

from shine.solvers import LBFGS, LBFGSMemory
from shine.solvers.lbfgs import _CACHE_MIN_DIM

DT = torch.float64
LOGGER = "shine.solvers.lbfgs"
SMALL_AND_CACHED = pytest.mark.parametrize("D", [3, _CACHE_MIN_DIM])


def unit(D, i=0):
    e = torch.zeros(D, dtype=DT)
    e[i] = 1.0
    return e


def shifted_sphere(c):
    """``r(z) = ½‖z - c‖²``: ``∇r = z - c``, Hessian ``I`` (every secant pair is exact)."""

    def fun(z):
        return 0.5 * (z - c) @ (z - c), z - c

    return fun


def messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == LOGGER]


# ---------------------------------------------------------------- settings and arguments


@pytest.mark.parametrize("c1, c2", [(0.0, 0.5), (0.5, 0.5)])
def test_line_search_constants_must_satisfy_strict_inequalities(c1, c2):
    """``0 < c1 < c2 < 1`` strictly: c1 = 0 (no sufficient decrease) and c1 = c2 are refused."""
    with pytest.raises(ValueError, match="c1"):
        LBFGS(c1=c1, c2=c2)


def test_opa_direction_without_opa_every_is_ignored_with_a_warning(caplog):
    fun = shifted_sphere(torch.tensor([0.5, -1.0], dtype=DT))
    z0 = torch.zeros(2, dtype=DT)
    v = torch.ones(2, dtype=DT)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plain = LBFGS()(fun, z0)
        assert messages(caplog, logging.WARNING) == []  # nothing to warn about
        LBFGS(opa_every=2)(fun, z0, opa_direction=v)
        assert messages(caplog, logging.WARNING) == []  # OPA on: the direction is used
        ignored = LBFGS()(fun, z0, opa_direction=v)
    (warning,) = messages(caplog, logging.WARNING)
    assert "OPA disabled" in warning
    assert ignored.stats.extra["n_opa_updates"] == 0
    assert ignored.stats.n_evals == plain.stats.n_evals  # no OPA evaluation was made
    assert torch.equal(ignored.value, plain.value)


def test_opa_direction_is_cast_to_the_dtype_of_z0():
    """A float32 ``v`` (exactly representable) gives the same solve as its float64 copy."""
    A = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)
    b = torch.tensor([1.0, -1.0, 0.5, 0.25], dtype=DT)

    def fun(z):
        return 0.5 * (A * z) @ z - b @ z, A * z - b

    v32 = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float32)
    solver = LBFGS(tol=1e-10, opa_every=1)
    z0 = torch.zeros(4, dtype=DT)
    ref = solver(fun, z0, opa_direction=v32.to(DT))
    for direction in (v32, lambda z: v32):
        res = solver(fun, z0, opa_direction=direction)
        assert res.value.dtype == DT and res.state.s.dtype == DT
        assert res.stats.extra["n_opa_updates"] == ref.stats.extra["n_opa_updates"] > 0
        assert torch.equal(res.value, ref.value)
        assert torch.equal(res.inverse.dense(), ref.inverse.dense())


def test_results_live_on_the_device_of_z0_whatever_the_default_device():
    """``z0`` sets the device: with another default device active (here ``meta``), the
    workspace, the estimate and every statistic still live on ``z0``'s (CPU)."""
    A = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)
    b = torch.tensor([1.0, -1.0, 0.5, 0.25], dtype=DT)

    def fun(z):
        return 0.5 * (A * z) @ z - b @ z, A * z - b

    z0 = torch.zeros(4, dtype=DT)
    with torch.device("meta"):
        res = LBFGS(tol=1e-10, opa_every=2)(fun, z0, opa_direction=b)
    st = res.stats
    cpu = z0.device
    for t in (res.value, res.state.s, res.state.y, st.residual_trace, st.residual):
        assert t.device == cpu
    assert st.converged.device == cpu and st.lowest_step.device == cpu
    assert res.inverse.dense().device == cpu
    assert bool(st.converged) and int(st.lowest_step) == st.nstep
    torch.testing.assert_close(res.value, b / A, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- stopping test


def quarter_sphere():
    """``r(z) = ¼‖z‖²`` from ``z0 = e1``: ``∇r(z0) = ½ e1`` (norm 0.5 < 1, so the first trial is
    the unit step ``-∇r(z0)``, ``α = min(1, 1/‖p‖) = 1``), landing at ``½ e1`` with
    ``‖∇r‖ = 0.25``, value ``1/16``: all exact in binary."""

    def fun(z):
        return 0.25 * z @ z, 0.5 * z

    return fun, unit(2)


def test_stopping_test_is_inclusive_at_iterates():
    """``‖∇r(z_n)‖ <= max(tol, rel_tol·‖∇r(z0)‖)`` with equality counts as converged."""
    fun, z0 = quarter_sphere()
    for kwargs in ({"tol": 0.25}, {"tol": 0.0, "rel_tol": 0.5}):  # threshold 0.25 both times
        f, calls = recorded(fun)
        res = LBFGS(**kwargs)(f, z0)
        assert torch.equal(calls[1], 0.5 * z0)  # unit step of the first iteration
        assert res.stats.nstep == 1 and bool(res.stats.converged)
        assert float(res.stats.residual) == 0.25
        assert res.stats.n_evals == 2 == len(calls)
        assert res.stats.extra["stopped_in_line_search"] == 0.0


def test_stopping_test_is_inclusive_at_trial_points():
    """With ``stop_test="every_evaluation"`` the first trial point, with ``‖∇r‖ = tol``,
    is returned at once: 0 completed iterations, no pair stored."""
    fun, z0 = quarter_sphere()
    res = LBFGS(tol=0.25, stop_test="every_evaluation")(fun, z0)
    st = res.stats
    assert st.extra["stopped_in_line_search"] == 1.0 and bool(st.converged)
    assert st.nstep == 0 and len(res.state) == 0
    assert torch.equal(res.value, 0.5 * z0)
    torch.testing.assert_close(st.residual_trace, torch.tensor([0.5, 0.25], dtype=DT))
    assert st.n_evals == 2 and st.extra["n_line_search_evals"] == 1


def test_line_search_constants_are_those_of_the_solver():
    """On ``quarter_sphere`` the unit step has ``φ(1) - φ(0) = -0.1875 = 0.75·φ'(0)`` and
    ``|φ'(1)| = 0.125 = 0.5·|φ'(0)|``: it satisfies the sufficient decrease iff ``c1 <= 0.75`` and
    the curvature condition iff ``c2 >= 0.5``; otherwise the search evaluates more points."""
    fun, z0 = quarter_sphere()

    def first_search(**kwargs):
        st = LBFGS(tol=0.0, max_iter=1, **kwargs)(fun, z0).stats
        return st.extra["n_line_search_evals"], st.extra["n_line_search_failures"]

    assert first_search(c1=0.7, c2=0.9) == (1, 0)
    assert first_search(c1=0.8, c2=0.9)[0] >= 2
    assert first_search(c2=0.6) == (1, 0)
    assert first_search(c2=0.4)[0] >= 2
    # one evaluation allowed: the search fails, but its point of sufficient decrease is taken
    res = LBFGS(tol=0.0, max_iter=1, c2=0.4, max_ls=1)(fun, z0)
    assert res.stats.extra["n_line_search_evals"] == 1
    assert res.stats.extra["n_line_search_failures"] == 1
    assert torch.equal(res.value, 0.5 * z0)


def test_line_search_failures_are_counted_per_search():
    """With ``max_ls=1`` each search evaluates one trial; on this well-conditioned quadratic
    every trial has sufficient decrease (checked), so it is a failure iff the strong-Wolfe
    curvature condition ``|∇r(z_t)ᵀs| <= c2 |∇r(z)ᵀs|`` fails: counted from the recorded
    trials, independently of the solver."""
    A = torch.tensor([1.0, 1.2, 1.5, 1.8, 2.0], dtype=DT)
    b = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.3], dtype=DT)

    def fun(z):
        return 0.5 * (A * z) @ z - b @ z, A * z - b

    c2 = 0.2
    f, calls = recorded(fun)
    res = LBFGS(max_ls=1, c2=c2, max_iter=8, tol=1e-12)(f, torch.zeros(5, dtype=DT))
    assert res.stats.nstep == 8 == len(calls) - 1
    failures = 0
    for z, z_t in zip(calls[:-1], calls[1:], strict=True):
        (f0, g0), (f_t, g_t) = fun(z), fun(z_t)
        s = z_t - z
        assert f_t <= f0 + 1e-4 * (g0 @ s)  # sufficient decrease: the trial became the iterate
        failures += int(abs(g_t @ s) > c2 * abs(g0 @ s))
    assert 2 <= failures <= 6  # both outcomes occur (measured: 5 failures, 3 successes)
    assert res.stats.extra["n_line_search_failures"] == failures
    assert res.stats.extra["n_line_search_evals"] == 8
    assert res.stats.extra["n_restarts"] == 0


def test_trial_points_are_tested_from_the_iteration_that_reaches_min_iter():
    """``min_iter`` applies to trial points too: a trial point of iteration ``n`` would be
    iterate ``n + 1``, so it is tested iff ``n + 1 >= min_iter``.

    ``r = ½‖z‖² + 0.05 Σ log cosh z_i`` from ``z0`` with ``‖∇r(z0)‖ = 0.65``: every later trial
    point has ``‖∇r‖ <= 0.03 < tol = 0.1`` (the first is the unit step, the next quasi-Newton
    ones). So the solve returns the first trial point of iteration ``min_iter - 1`` (0 for
    ``min_iter = 0``) after ``max(min_iter - 1, 0)`` iterations, each with one evaluation.
    """

    def fun(z):
        return 0.5 * z @ z + 0.05 * torch.log(torch.cosh(z)).sum(), z + 0.05 * torch.tanh(z)

    z0 = torch.tensor([0.5, -0.3, 0.2], dtype=DT)
    for min_iter in (0, 1, 2, 3):
        f, calls = recorded(fun)
        res = LBFGS(tol=0.1, min_iter=min_iter, stop_test="every_evaluation")(f, z0)
        st = res.stats
        nstep = max(min_iter - 1, 0)
        assert st.extra["stopped_in_line_search"] == 1.0 and bool(st.converged)
        assert st.nstep == nstep and len(res.state) == nstep
        assert st.n_evals == len(calls) == nstep + 2
        assert st.extra["n_line_search_evals"] == nstep + 1
        assert torch.equal(res.value, calls[-1])
        assert st.residual_trace.shape == (nstep + 2,)
        assert float(st.residual) == float(fun(calls[-1])[1].norm()) <= 0.1


def test_evaluations_of_the_stopping_line_search_are_counted():
    """A search that stops at its second trial: the warm pair ``(2 e1, e1)`` doubles the step
    (``H e1 = 2 e1``), the unit step lands at ``c - e1`` (no decrease: rejected), the
    interpolation of the exact quadratic lands on ``c`` (``∇r = 0``): 1 + 2 evaluations."""
    c = torch.tensor([0.5, -0.25, 0.75], dtype=DT)
    e1 = unit(3)
    f, calls = recorded(shifted_sphere(c))
    res = LBFGS(tol=1e-8, stop_test="every_evaluation")(
        f, c + e1, warm_start=LBFGSMemory(2 * e1[None], e1[None])
    )
    st = res.stats
    assert torch.equal(calls[1], c - e1)
    assert st.extra["stopped_in_line_search"] == 1.0 and st.nstep == 0
    assert st.n_evals == len(calls) == 3 and st.extra["n_line_search_evals"] == 2
    torch.testing.assert_close(res.value, c, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- restarts and failures


@SMALL_AND_CACHED
@pytest.mark.parametrize("opa", [False, True])
def test_line_search_failure_clears_the_memory_and_retries_once(caplog, D, opa):
    """``r = ½‖z - c‖²`` from ``z0 = c + e1`` warm-started with the wrong pair ``(100 e1, e1)``:
    ``p = -H∇r = -100 e1`` overshoots, and with ``max_ls=1`` the search finds no point of
    sufficient decrease. The memory is cleared and iteration 0 retried from ``H0 = I`` without
    a new OPA pair: the unit step ``-e1`` lands on ``c``. So: 1 iteration, 1 restart, 1 failed
    search, 2 search evaluations (+1 for the OPA pair made before the failed step)."""
    c = torch.linspace(-1.0, 1.0, D, dtype=DT)
    c[0] = 0.5
    e1 = unit(D)
    warm = LBFGSMemory(100.0 * e1[None], e1[None])
    opa = {"opa_every": 1} if opa else {}
    v = {"opa_direction": unit(D, 1)} if opa else {}  # ⊥ e1: H v = v, exact OPA pair (v, v)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        res = LBFGS(tol=1e-12, max_ls=1, **opa)(shifted_sphere(c), c + e1, warm_start=warm, **v)
    st = res.stats
    assert st.nstep == 1 and bool(st.converged)
    assert torch.equal(res.value, c)
    assert st.extra["n_restarts"] == 1
    assert st.extra["n_line_search_failures"] == 1
    assert st.extra["n_line_search_evals"] == 2
    assert st.extra["n_opa_updates"] == int(bool(opa))
    assert st.n_evals == 3 + int(bool(opa))
    assert res.state.kinds == ["regular"]  # the warm (and OPA) pairs were cleared
    assert torch.equal(res.state.s[0], -e1)
    info = messages(caplog, logging.INFO)
    assert len(info) == 1
    assert "line search failed at n=0 (max_ls reached in zoom); memory cleared" in info[0]


def test_line_search_failure_without_memory_stops(caplog):
    """``r = 5‖z‖²`` (curvature 10): the first unit step overshoots, there is no memory to
    clear, so the solver stops at ``z0`` after 0 iterations (no restart)."""

    def fun(z):
        return 5.0 * z @ z, 10.0 * z

    z0 = torch.tensor([0.05, 0.05, 0.0], dtype=DT)  # ‖∇r(z0)‖ < 1: unit first step
    with caplog.at_level(logging.INFO, logger=LOGGER):
        res = LBFGS(max_ls=1)(fun, z0)
    st = res.stats
    assert st.nstep == 0 and not bool(st.converged)
    assert torch.equal(res.value, z0)
    assert st.extra["n_restarts"] == 0 and st.extra["n_line_search_failures"] == 1
    assert st.n_evals == 2
    (warning,) = messages(caplog, logging.WARNING)
    assert "line search failed at n=0 (max_ls reached in zoom); stopping" in warning
    assert messages(caplog, logging.INFO) == []


@pytest.mark.parametrize("line_search", ["strong_wolfe", "none"])
@pytest.mark.parametrize("warm", [False, True])
def test_zero_gradient_before_min_iter_stops_without_a_step(caplog, line_search, warm):
    """At an exact minimiser with ``min_iter=1`` the tolerance is not tested yet, and the search
    direction is 0: the solver stops (warning) instead of stepping. With a warm memory the
    memory is cleared first (``-H∇r = 0`` is no descent direction), and the gradient step is 0
    as well (this used to divide by ``‖p‖ = 0`` in the line search's first step)."""
    c = torch.tensor([0.5, -0.25], dtype=DT)
    e1 = unit(2)
    warm_start = LBFGSMemory(e1[None], e1[None]) if warm else None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = LBFGS(min_iter=1, line_search=line_search)(
            shifted_sphere(c), c.clone(), warm_start=warm_start
        )
    st = res.stats
    assert st.nstep == 0 and st.n_evals == 1 and float(st.residual) == 0.0
    assert st.extra["n_restarts"] == int(warm) and len(res.state) == 0
    assert torch.equal(res.value, c)
    (warning,) = messages(caplog, logging.WARNING)
    assert "zero or non-finite search direction" in warning


@SMALL_AND_CACHED
def test_non_descent_direction_restarts_from_gamma_identity(caplog, D):
    """``curvature_check=False`` (the authors' rule) keeps negative-curvature pairs.

    ``r = ½ zᵀA z - bᵀz`` with ``A = diag(-1, 1, …)``, ``b = -e1`` (so ``∇r(0) = e1``), unit
    steps, ``scale_gamma``, warm pair ``(e1, -e1)`` with ``γ = 0.5``, for which ``H e1 = -e1``:

    * n = 0: ``-H∇r = e1`` is an ascent direction: restart #1, ``p = -γ∇r = -0.5 e1`` (the warm
      ``γ`` is kept); ``z1 = -0.5 e1``, ``∇r(z1) = 1.5 e1``; pair ``(-0.5 e1, 0.5 e1)``
      (``sᵀy = -0.25``) stored, ``γ = sᵀy/yᵀy = -1``;
    * n = 1: ``H e1 = -e1`` again: restart #2, ``γ = -1`` is not positive and is reset to 1:
      ``p = -1.5 e1``, ``z2 = -2 e1``; pair ``(-1.5 e1, 1.5 e1)`` stored, ``γ = -1``.
    """
    e1 = unit(D)
    sign = torch.ones(D, dtype=DT)
    sign[0] = -1.0

    def fun(z):
        return 0.5 * (sign * z) @ z + z[0], sign * z + e1

    f, calls = recorded(fun)
    warm = LBFGSMemory(e1[None], -e1[None], None, 0.5)
    solver = LBFGS(
        tol=0.0, max_iter=2, line_search="none", curvature_check=False, scale_gamma=True
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        res = solver(f, torch.zeros(D, dtype=DT), warm_start=warm)
    assert [float(z[0]) for z in calls] == [0.0, -0.5, -2.0]
    assert all(float(z[1:].abs().max()) == 0.0 for z in calls)
    st = res.stats
    assert st.nstep == 2 and st.extra["n_restarts"] == 2 and st.extra["n_skipped_pairs"] == 0
    assert len(res.state) == 1 and res.state.gamma == -1.0
    assert torch.equal(res.state.s[0], -1.5 * e1) and torch.equal(res.state.y[0], 1.5 * e1)
    info = messages(caplog, logging.INFO)
    assert len(info) == 2
    for n, msg in enumerate(info):
        assert f"not a descent direction at n={n}; memory cleared" in msg


def test_both_kinds_of_restart_are_counted(caplog):
    """A solve with one restart of each kind, told apart by their log messages: at n = 0 the
    warm negative-curvature pair makes ``-H∇r`` an ascent direction; at n = 1 the quasi-Newton
    step overshoots the stiff coordinate (``max_ls=1``: no point of sufficient decrease), the
    memory is cleared again, and the retried gradient step fails as well: stop."""
    A = torch.tensor([1.0, 10.0], dtype=DT)

    def fun(z):
        return 0.5 * (A * z) @ z, A * z

    warm = LBFGSMemory(torch.tensor([[1.0, 0.0]], dtype=DT), torch.tensor([[-1.0, 0.0]], dtype=DT))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        res = LBFGS(max_ls=1, curvature_check=False, max_iter=4)(
            fun, torch.tensor([1.0, 0.001], dtype=DT), warm_start=warm
        )
    info = messages(caplog, logging.INFO)
    assert len(info) == 2
    assert "not a descent direction at n=0" in info[0]
    assert "line search failed at n=1" in info[1] and "memory cleared" in info[1]
    (warning,) = messages(caplog, logging.WARNING)
    assert "line search failed at n=1" in warning and "stopping" in warning
    assert res.stats.extra["n_restarts"] == 2 and res.stats.nstep == 1
    assert len(res.state) == 0  # cleared at the second restart, nothing stored since


def test_non_finite_gradient_stops_and_its_pair_is_not_stored(caplog):
    """The unit step from ``(1, 1)`` reaches a point where ``∂r/∂z_1 = +inf`` (``r`` finite):
    the pair (``sᵀy = -inf``) is skipped, and the solver stops before iteration 1."""

    def fun(z):
        grad = z.clone()
        if float(z[0]) < 0.5:
            grad[0] = float("inf")
        return 0.5 * z @ z, grad

    f, calls = recorded(fun)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = LBFGS(line_search="none", max_iter=5)(f, torch.ones(2, dtype=DT))
    st = res.stats
    assert st.nstep == 1 and st.n_evals == 2 == len(calls) and not bool(st.converged)
    assert st.extra["n_skipped_pairs"] == 1 and len(res.state) == 0
    assert float(st.residual) == float("inf")
    (warning,) = messages(caplog, logging.WARNING)
    assert "non-finite objective or gradient at iteration 1" in warning


# ---------------------------------------------------------------- which pairs are stored


def block_quadratic(D, block, c):
    """``r = ½ zᵀA z - c z_1`` with ``A = block`` (2 x 2) on the first two coordinates and ``I``
    on the others; from ``z0 = 0`` the unit step is ``s = c e1`` and ``y = c·block[:, 0]``."""
    block = torch.tensor(block, dtype=DT)

    def fun(z):
        Az = z.clone()
        Az[:2] = block @ z[:2]
        return 0.5 * z @ Az - c * z[0], Az - c * unit(D)

    return fun


TINY = 2.0**-52  # = ε of float64


@pytest.mark.parametrize("D", [2, _CACHE_MIN_DIM])
@pytest.mark.parametrize(
    ("block", "kwargs", "stored"),
    [
        # s = 2 e1, y = (2^-51, 2): sᵀy = 2^-50 = ε‖s‖‖y‖ (yᵀy rounds to 4): not stored
        ([[TINY, 1.0], [1.0, 0.0]], {}, False),
        # y = (2^-50, 2): sᵀy = 2^-49 = 2 ε‖s‖‖y‖: stored
        ([[2 * TINY, 1.0], [1.0, 0.0]], {}, True),
        # y = (2^-51, 0) and noise floor·ε·max‖∇r‖ = 1·2^-52·2 = ‖y‖: rounding noise, not stored
        ([[TINY, 0.0], [0.0, 1.0]], {"noise_floor": 1.0}, False),
        # noise level halved: ‖y‖ = 2·noise level, stored
        ([[TINY, 0.0], [0.0, 1.0]], {"noise_floor": 0.5}, True),
        # without the curvature check a pair needs sᵀy != 0 only: y = (0, 2) is not stored...
        ([[0.0, 1.0], [1.0, 0.0]], {"curvature_check": False}, False),
        # ... while y = (2^-51, 2^11), sᵀy = 2^-50, far below ε‖s‖‖y‖ = 2^-40, is (and is
        # not with the check)
        ([[TINY, 1024.0], [1024.0, 0.0]], {"curvature_check": False}, True),
        ([[TINY, 1024.0], [1024.0, 0.0]], {}, False),
    ],
)
def test_pair_rules_at_their_boundaries(D, block, kwargs, stored):
    """Documented rules: a pair is stored iff ``sᵀy > ε‖s‖‖y‖`` (``curvature_check``, strict) or
    ``sᵀy != 0`` (without), and ``‖y‖ > noise_floor·ε·max‖∇r‖`` (skipped when ``<=``)."""
    fun = block_quadratic(D, block, 2.0)
    res = LBFGS(tol=0.0, max_iter=1, line_search="none", **kwargs)(fun, torch.zeros(D, dtype=DT))
    assert res.stats.nstep == 1
    assert len(res.state) == int(stored)
    assert res.stats.extra["n_skipped_pairs"] == int(not stored)
    if stored:
        assert torch.equal(res.state.s[0], 2.0 * unit(D))
        torch.testing.assert_close(res.state.y[0], fun(res.value)[1] - fun(0 * res.value)[1])


def test_zero_opa_direction_makes_no_pair():
    """``v = 0`` gives ``e = 0`` and ``ŷ = 0`` (a gradient difference at rounding level): every
    due OPA update is made (one evaluation each) and skipped; the iterates are those without
    OPA."""
    A = torch.tensor([1.0, 1.5, 2.0, 0.7, 1.2, 0.9], dtype=DT)
    b = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.3, 0.8], dtype=DT)

    def fun(z):
        return 0.5 * (A * z) @ z - b @ z, A * z - b

    z0 = torch.zeros(6, dtype=DT)
    plain = LBFGS(tol=1e-10)(fun, z0)
    n = plain.stats.nstep
    assert n >= 4
    for every in (1, 2):
        res = LBFGS(tol=1e-10, opa_every=every)(fun, z0, opa_direction=torch.zeros(6, dtype=DT))
        due = len(range(0, n, every))  # paper schedule: n % opa_every == 0, from n = 0
        assert res.stats.nstep == n and torch.equal(res.value, plain.value)
        assert res.stats.extra["n_opa_updates"] == 0
        assert res.stats.extra["n_opa_skipped"] == due
        assert res.stats.n_evals == plain.stats.n_evals + due
        assert res.state.kinds == plain.state.kinds


def test_exported_caches_match_the_pairs_when_y_is_tiny_against_the_gradient():
    """``SᵀY`` and ``YᵀY`` exported with the memory must be those of its pairs even where
    ``‖y‖ = 1e-9‖∇r‖`` (differencing cached projections ``[S Y]ᵀ∇r`` would lose ~7 digits
    there), and the estimate must satisfy the secant condition ``H y = s``.

    ``r = cᵀz + ½λ‖z‖²`` with ``‖c‖ = 1e3``, ``λ = 1e-9``, ``D = _CACHE_MIN_DIM`` (the cached
    path), one unit step ``s = -c``: ``y = λ s``, ``sᵀy = 1e-3``.
    """
    D = _CACHE_MIN_DIM
    c = torch.randn(D, dtype=DT, generator=torch.Generator().manual_seed(1))
    c = c * (1e3 / c.norm())
    lam = 1e-9

    def fun(z):
        return c @ z + 0.5 * lam * z @ z, c + lam * z

    res = LBFGS(max_iter=1, line_search="none", tol=0.0)(fun, torch.zeros(D, dtype=DT))
    mem = res.state
    assert len(mem) == 1
    torch.testing.assert_close(mem.s[0], -c, rtol=0, atol=0)
    torch.testing.assert_close(mem.y[0], -lam * c, rtol=1e-6, atol=0)
    sy = (mem.s * mem.y).sum()
    torch.testing.assert_close(mem.sty_upper, sy.reshape(1, 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(mem.yty, (mem.y * mem.y).sum().reshape(1, 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.inverse.matvec(mem.y[0]), mem.s[0], rtol=1e-10, atol=0)


def test_skipped_pairs_add_up_over_the_warm_start_and_the_solve():
    """``n_skipped_pairs`` counts the warm-start pairs dropped by the curvature rule plus the
    pairs skipped during the solve: here one of each (the dropped warm pair leaves ``H = I``,
    so the solve is the first boundary case above, whose pair is skipped)."""
    D = 2
    fun = block_quadratic(D, [[TINY, 1.0], [1.0, 0.0]], 2.0)
    warm = LBFGSMemory(unit(D)[None], -unit(D)[None])  # sᵀy = -1: dropped
    res = LBFGS(tol=0.0, max_iter=1, line_search="none")(
        fun, torch.zeros(D, dtype=DT), warm_start=warm
    )
    assert torch.equal(res.value, 2.0 * unit(D))  # unit step with H = I
    assert res.stats.extra["n_skipped_pairs"] == 2 and len(res.state) == 0


@pytest.mark.parametrize("D", [3, _CACHE_MIN_DIM])
def test_step_after_a_tiny_y_pair_is_the_bfgs_step_of_that_pair(D):
    """Where ``‖y‖ ≪ ‖∇r‖`` the cached path recomputes ``[S Y]ᵀy`` by dot products; the ``sᵀy``
    of the pair (in ``R⁻¹``) must be that dot product too, not the differenced
    ``step·(φ'(1) - φ'(0))`` (cancellation: ~1e-7 relative error here). The second step is then
    ``-H₁∇r(z₁)`` with ``H₁`` the BFGS matrix (``H0 = I``) of the stored pair, on both paths.

    ``r = cᵀz + ½zᵀAz``, ``‖c‖ = 1e3``, ``A = diag(a_i)``, ``a_i ∈ [1e-9, 4e-9]`` (``y = -Ac``
    tiny and not parallel to ``∇r(z₁)``, so the two-loop formula below has no cancellation),
    unit steps.
    """
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(D, dtype=DT, generator=gen)
    c = c * (1e3 / c.norm())
    diag = 1e-9 * (1.0 + 3.0 * torch.rand(D, dtype=DT, generator=gen))

    def fun(z):
        return c @ z + 0.5 * z @ (diag * z), c + diag * z

    res = LBFGS(max_iter=2, line_search="none", tol=0.0)(fun, torch.zeros(D, dtype=DT))
    z1 = -c  # the first step: -H0 ∇r(0) = -c
    s, y = res.state.s[0], res.state.y[0]
    torch.testing.assert_close(s, z1, rtol=0, atol=0)
    rho = 1.0 / float(s @ y)
    g1 = c + diag * z1
    # two-loop recursion, one pair, H0 = I: H g = q + (a - ρ yᵀq) s, a = ρ sᵀg, q = g - a y
    a = rho * float(s @ g1)
    q = g1 - a * y
    expected = z1 - (q + (a - rho * float(y @ q)) * s)
    torch.testing.assert_close(res.value, expected, rtol=1e-11, atol=0)
