"""HOAGStepper: the authors' step rule and the safeguarded one on exact numbers, one outer
iteration's metrics and counters, the OPA direction, and the authors' inverse estimate.

The step rules are driven with prescribed hypergradients (a stubbed ``_backward_metrics``) and
prescribed outer losses, and where a test sits on the boundary of a comparison every quantity
is a dyadic rational (``ε = 2^-k``, ``C = 1/4``, ``L = 1/2``), so that the hand-computed bound
and the code's bound are the same floating-point number. The rules (module docstring of
:mod:`shine.bilevel.hoag`, and the authors' ``hoag_lbfgs``, Pedregosa 2016):

* first ``L = ‖∇‖/√G`` if ``‖∇‖ > 1e-3`` else 1; step ``s = 1/L``;
* authors: ``λ ← clip(λ - s∇)``, ``incr = ‖s∇‖``; if ``g_k ≤ g_{k-1} + C ε_k + ε_{k-1}(C+1) incr
  - L incr²``: ``L ← 0.95 L`` and a second step; elif ``g_k ≥ 1.2 g_{k-1}``: reject (``L ← 2L``,
  back to the previous ``λ``, ``ε ← ε/2``, the authors' "lambda0" frozen at the trial point);
  else a second step, the intermediate point becoming ``old_λ``;
* safeguarded: reject when ``g > g_acc + C ε |g_acc|``; ``L ← 0.95 L`` when
  ``g_acc - g ≥ C ‖∇_acc‖² / L``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import pytest
import torch
from test_bilevel import make_problem

from shine.backward import JacobianFree, Shine
from shine.bilevel import HOAG
from shine.bilevel.hoag import ToleranceSchedule
from shine.solvers import LBFGS
from shine.solvers.base import SolverResult, SolverStats
from shine.solvers.lbfgs import LBFGSMemory

DT = torch.float64
LOGGER = "shine.bilevel.hoag"
#: ε_k = 2^-(4+k): every tolerance is exact in floating point
DYADIC = ToleranceSchedule(initial=1 / 16, decrease=0.5)


def stepper_with(grads, mode="faithful", groups=None, lambda0=-2.0, **kw):
    """A stepper whose hypergradients are the tensors ``grads``, in order."""
    problem = make_problem(groups=groups)
    method = HOAG(backward=JacobianFree(), mode=mode, lambda0=lambda0, **kw)
    st = method.stepper(problem, torch.zeros(10, dtype=DT))
    queue = iter(grads)

    def backward_metrics(lam, fwd):
        return torch.as_tensor(next(queue), dtype=DT), {"backward_time": 0.0, "backward_iters": 1}

    st._backward_metrics = backward_metrics
    return st


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def scalar(t):
    return float(t.reshape(()))


# ---------------------------------------------------------------------------- first step size
@pytest.mark.parametrize("mode", ["faithful", "robust"])
@pytest.mark.parametrize(
    ("grad", "groups", "lipschitz0"),
    [
        (0.5, None, 0.5),  # ‖∇‖/√1
        (0.25, 4, 0.25),  # ‖∇‖ = 0.5 over G = 4 hyper-parameters: 0.5/√4
        (1e-3, None, 1.0),  # ‖∇‖ = 1e-3 is not > 1e-3: L = 1
        (1e-4, None, 1.0),
    ],
)
def test_first_step_size_is_the_gradient_norm_per_hyperparameter(mode, grad, groups, lipschitz0):
    part = None if groups is None else torch.arange(10) % groups
    g = torch.tensor(grad, dtype=DT) if groups is None else torch.full((groups,), grad, dtype=DT)
    tol = ToleranceSchedule(kind="quadratic", initial=1e-3)
    st = stepper_with([g], mode=mode, groups=part, tolerance=tol, max_step=100.0)
    lam0 = st.lam.clone()
    update = st._authors_update if mode == "faithful" else st._safeguarded_update
    out = update(lam0.clone(), None, 10.0, 3)
    assert out["rejected"] is False and "skipped" not in out
    expected_step = g / lipschitz0
    if mode == "faithful":
        # g_old = inf: the first step always passes the test, L shrinks, and the step is taken
        # twice (the authors' quirk)
        assert st.lipschitz == pytest.approx(0.95 * lipschitz0, rel=1e-14)
        torch.testing.assert_close(st.lam, lam0 - 2 * expected_step)
    else:
        assert st.lipschitz == pytest.approx(lipschitz0, rel=1e-14)
        torch.testing.assert_close(st.lam, lam0 - expected_step)
    torch.testing.assert_close(st.old_lam, lam0)
    assert st.g_old == 10.0
    assert st.eps == pytest.approx(1e-3 / 9)  # quadratic schedule after iteration 3: ε0/3²


# ---------------------------------------------------------------------------- authors' rule
def two_authors_steps(g2):
    """Step 1 at g = 10 (∇ = 0.5), then L := 1/2 and step 2 at ``g2`` with ∇ = 0.25."""
    st = stepper_with([torch.tensor(0.5), torch.tensor(0.25)], tolerance=DYADIC)
    st._authors_update(st.lam.clone(), None, 10.0, 1)
    assert scalar(st.lam) == -4.0 and st.eps == 1 / 32  # -2 - 2·(0.5/0.5)
    st.lipschitz = 0.5  # dyadic: the test's bound below is exact
    out = st._authors_update(st.lam.clone(), None, g2, 2)
    return st, out


# step 2: s = 2, incr = 2·0.25 = 0.5, ε_2 = 1/64, ε_1 = 1/32:
# g_1 + C ε_2 + ε_1 (C + 1) incr - L incr² = 10 + 1/256 + 5/256 - 32/256
BOUND = 10.0 + 0.25 * (1 / 64) + (1 / 32) * 1.25 * 0.5 - 0.5 * 0.5**2


def test_authors_sufficient_decrease_at_the_bound_shrinks_l_and_steps_twice():
    assert BOUND == 10.0 - 26 / 256
    st, out = two_authors_steps(BOUND)  # g ≤ bound holds with equality
    assert out["rejected"] is False
    assert st.lipschitz == 0.95 * 0.5
    assert scalar(st.lam) == -4.0 - 2 * 2 * 0.25  # two steps of s∇ = 0.5
    assert scalar(st.old_lam) == -4.0  # the λ the step started from
    assert st.g_old == BOUND and st.eps == 1 / 64 and st.old_eps == 1 / 32


def test_authors_step_just_above_the_bound_keeps_l_and_still_steps_twice():
    g2 = BOUND + 1 / 256  # above the bound, far below 1.2 g_1: the third branch
    st, out = two_authors_steps(g2)
    assert out["rejected"] is False
    assert st.lipschitz == 0.5
    assert scalar(st.lam) == -5.0
    assert scalar(st.old_lam) == -4.5  # the authors' old_lambdak: the point after one step
    assert st.g_old == g2


def test_authors_rejection_at_the_threshold_and_the_frozen_lambda0(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    g = torch.tensor(0.5)
    st = stepper_with([g, g, g], tolerance=DYADIC)
    st._authors_update(st.lam.clone(), None, 7.25, 1)
    lam1, lip1 = st.lam.clone(), st.lipschitz  # -4, 0.475
    g2 = st.cfg.reject_factor * st.g_old  # g_k >= 1.2 g_{k-1} holds with equality
    out = st._authors_update(lam1.clone(), None, g2, 2)
    assert out["rejected"] is True
    torch.testing.assert_close(st.lam, lam1)  # back to the previous λ
    assert st.lipschitz == pytest.approx(2 * lip1)
    assert st.eps == 0.5 * (1 / 64)  # the schedule's ε_2, halved
    assert st.g_old == g2
    trial = scalar(lam1) - 0.5 / lip1
    # tolerance_reference="aliased": the authors' lambda0 is now the rejected trial point
    assert st.tolerance_factor() == pytest.approx(math.exp(scalar(lam1) - trial), rel=1e-12)
    (msg,) = [m for m in messages(caplog) if "rejected" in m]
    assert "iteration 2" in msg and f"{g2:.6g}" in msg and "7.25" in msg
    # a second rejection: lambda0 stays frozen at the first trial point
    out = st._authors_update(st.lam.clone(), None, 100.0, 3)
    assert out["rejected"] is True
    assert st.tolerance_factor() == pytest.approx(math.exp(scalar(lam1) - trial), rel=1e-12)


def test_authors_rejection_log_names_the_configured_factor(caplog):
    """The rejection message states the test that was applied: g_k >= reject_factor · g_{k-1}."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    g = torch.tensor(0.5)
    st = stepper_with([g, g], tolerance=DYADIC, reject_factor=1.5)
    st._authors_update(st.lam.clone(), None, 2.0, 1)
    out = st._authors_update(st.lam.clone(), None, 3.0, 2)  # 3 >= 1.5 x 2
    assert out["rejected"] is True
    (msg,) = [m for m in messages(caplog) if "rejected" in m]
    assert "3 >= 1.5 x 2" in msg


def test_authors_zero_hypergradient_skips_the_update(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    st = stepper_with([torch.tensor(0.0)], tolerance=DYADIC)
    lam0 = st.lam.clone()
    out = st._authors_update(lam0.clone(), None, 10.0, 4)
    assert out["skipped"] is True and out["rejected"] is False
    torch.testing.assert_close(st.lam, lam0)
    assert st.lipschitz is None  # no step size is estimated from a zero gradient
    assert st.eps == 1 / 32  # the tolerance schedule still advances
    (msg,) = messages(caplog)
    assert "zero hypergradient" in msg and "iteration 4" in msg


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_authors_steps_are_clipped_to_the_bounds(sign):
    # from λ = ∓2 a step of ±1 reaches the bound ∓3; the second step would go to ∓4
    st = stepper_with([torch.tensor(sign * 0.5)], lambda0=-sign * 2.0, bounds=(-3.0, 3.0))
    st._authors_update(st.lam.clone(), None, 10.0, 1)
    assert scalar(st.lam) == -sign * 3.0


# ---------------------------------------------------------------------------- safeguarded rule
def test_safeguarded_sufficient_decrease_at_the_bound_with_groups():
    # G = 4, ∇ = 0.25 each: ‖∇‖ = 0.5, L = 0.5/2 = 0.25; the predicted decrease C‖∇‖²/L = 0.25
    groups = torch.arange(10) % 4
    g = torch.full((4,), 0.25)
    st = stepper_with([g, g], mode="robust", groups=groups, max_step=100.0)
    lam0 = st.lam.clone()
    st._safeguarded_update(lam0.clone(), None, 10.0, 1)
    assert st.lipschitz == 0.25
    torch.testing.assert_close(st.lam, lam0 - 1.0)
    lam1 = st.lam.clone()
    out = st._safeguarded_update(lam1.clone(), None, 10.0 - 0.25, 2)  # decrease = prediction
    assert out["rejected"] is False
    assert st.lipschitz == pytest.approx(0.95 * 0.25, rel=1e-15)
    torch.testing.assert_close(st.lam, lam1 - 0.25 / (0.95 * 0.25))  # the new L steps already


def test_safeguarded_rejection_beyond_the_slack_undoes_the_step(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    g = torch.tensor(0.5)
    st = stepper_with([g, g, g], mode="robust", tolerance=DYADIC, tolerance_reference="aliased")
    st._safeguarded_update(st.lam.clone(), None, 8.0, 1)  # L = 0.5, λ: -2 -> -3, ε = 1/32
    # exactly at the slack C ε |g_acc| = 1/4 · 1/32 · 8: not an increase beyond it
    g2 = 8.0 + 0.25 * (1 / 32) * 8.0
    out = st._safeguarded_update(st.lam.clone(), None, g2, 2)
    assert out["rejected"] is False and scalar(st.lam) == -4.0 and st.eps == 1 / 64
    w_accepted = st.w.clone()
    st.w = st.w + 1.0  # the inner solve of the trial point moved w
    out = st._safeguarded_update(st.lam.clone(), None, 9.0, 3)  # uphill: rejected
    # no backward solve is run for a rejected step
    assert out == {"rejected": True, "backward_time": 0.0, "backward_iters": 0, "backward_hvps": 0}
    assert scalar(st.lam) == -3.0 and scalar(st.old_lam) == -3.0  # the accepted point
    torch.testing.assert_close(st.w, w_accepted)
    assert st.lipschitz == 1.0 and st.eps == 1 / 128 and st.retry_g == g2
    # tolerance_reference="aliased": lambda0 is frozen at the rejected point λ = -4
    assert st.tolerance_factor() == pytest.approx(math.exp(-3.0 - (-4.0)), rel=1e-14)
    (msg,) = [m for m in messages(caplog) if "rejected" in m]
    assert "iteration 3" in msg and "9" in msg and "8.0625" in msg
    # the state after a rejection is checkpointable and restores the same tolerance
    other = st.cfg.stepper(st.problem, torch.zeros(10, dtype=DT))
    other.load_state_dict(st.state_dict())
    assert other.g_old == 9.0 and other.tolerance_factor() == st.tolerance_factor()


# ---------------------------------------------------------------------------- one iteration
@dataclass(frozen=True)
class RecordingLBFGS(LBFGS):
    """An LBFGS that records its results; ``drop_opa_count`` removes ``n_opa_updates``."""

    results: list = field(default_factory=list, compare=False)
    drop_opa_count: bool = False

    def __call__(self, fun, z0, *, opa_direction=None, warm_start=None):
        res = super().__call__(fun, z0, opa_direction=opa_direction, warm_start=warm_start)
        if self.drop_opa_count:
            extra = {k: v for k, v in res.stats.extra.items() if k != "n_opa_updates"}
            res = replace(res, stats=replace(res.stats, extra=extra))
        self.results.append(res)
        return res


def test_step_reports_the_inner_solve_and_the_step_size():
    problem = make_problem()
    solver = RecordingLBFGS(memory=50, opa_every=2)
    method = HOAG(solver=solver, backward=Shine(), mode="robust", max_iter=1, lambda0=-1.0)
    st = method.stepper(problem, torch.zeros(10, dtype=DT))
    lam = st.lam.clone()
    tol = st.eps * st.ref_norm * st.tolerance_factor()
    t0 = time.perf_counter()
    m = st.step()
    elapsed = time.perf_counter() - t0
    (res,) = solver.results
    assert m["inner_iters"] == res.stats.nstep > 0
    assert m["inner_evals"] == res.stats.n_evals >= m["inner_iters"]
    # the reported residual is ‖∇_w h(w, λ)‖ at the returned w, below the inner tolerance
    grad = problem.inner.value_and_grad(st.w, lam)[1]
    assert m["inner_grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-10)
    assert m["inner_converged"] is True and m["inner_grad_norm"] <= tol
    assert 0.0 < m["inner_time"] <= elapsed
    # OPA pairs committed in this solve: the "opa" pairs of the memory (nothing evicted)
    kinds = st.memory.kinds
    assert len(kinds) < 50
    assert m["n_opa_updates"] == kinds.count("opa") > 0
    # robust first step: L = |∇| (G = 1), reported as the step-size estimate
    hg = m["hypergradient"][0]
    assert m["lipschitz"] == st.lipschitz == pytest.approx(abs(hg), rel=1e-14)


def test_step_counts_no_opa_updates_for_a_solver_that_reports_none():
    solver = RecordingLBFGS(memory=10, drop_opa_count=True)
    method = HOAG(solver=solver, backward=Shine(), mode="robust", max_iter=1)
    m = method.stepper(make_problem(), torch.zeros(10, dtype=DT)).step()
    assert "n_opa_updates" not in solver.results[0].stats.extra
    assert m["n_opa_updates"] == 0


@pytest.mark.parametrize("mode", ["faithful", "robust"])
def test_steps_count_the_outer_iterations_and_follow_the_schedule(mode):
    tol = ToleranceSchedule(kind="quadratic", initial=1e-3)
    method = HOAG(
        solver=LBFGS(memory=10), backward=JacobianFree(), mode=mode, tolerance=tol, max_iter=3
    )
    st = method.stepper(make_problem(), torch.zeros(10, dtype=DT))
    metrics = []
    while not st.finished and len(metrics) < 6:
        metrics.append(st.step())
    assert len(metrics) == 3 and st.iteration == 3
    # ε used by iteration k+1: ε0/k² after iteration k (faithful: halved if k was rejected;
    # robust: a rejected k halves the ε it used instead)
    expected = [1e-3]
    for k, m in enumerate(metrics[:-1], start=1):
        if mode == "faithful":
            expected.append(1e-3 / k**2 * (0.5 if m["rejected"] else 1.0))
        else:
            expected.append(0.5 * expected[-1] if m["rejected"] else 1e-3 / k**2)
    assert [m["tolerance"] for m in metrics] == pytest.approx(expected, rel=1e-14)
    hg = abs(metrics[0]["hypergradient"][0])
    assert hg > 1e-3
    first_l = 0.95 * hg if mode == "faithful" else hg  # faithful: the first step always shrinks L
    assert metrics[0]["lipschitz"] == pytest.approx(first_l, rel=1e-14)


# ---------------------------------------------------------------------------- OPA direction
@pytest.mark.parametrize("groups", [None, torch.arange(10) % 3])
def test_opa_direction_is_the_outer_gradient_or_the_cross_derivative(groups):
    problem = make_problem(groups=groups)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(10, dtype=DT, generator=gen)
    lam = problem.inner.initial_log_lambda(0.0) + torch.linspace(
        -1.0, 1.0, problem.inner.initial_log_lambda().numel(), dtype=DT
    ).reshape(problem.inner.initial_log_lambda().shape)
    base = HOAG(solver=LBFGS(memory=10), backward=Shine(), mode="robust")
    assert base.stepper(problem, w)._opa_direction(lam) is None  # no OPA: no direction
    opa = replace(base, solver=LBFGS(memory=10, opa_every=2))
    outer = opa.stepper(problem, w)._opa_direction(lam)
    torch.testing.assert_close(outer(w), problem.outer.loss_grad(w))
    cross = replace(opa, opa_vector="cross_derivative").stepper(problem, w)._opa_direction(lam)
    # ∂_λ∇_w h summed over the hyper-parameters: e^{λ_{g(j)}} w_j, a vector like w
    scale = torch.exp(lam) if groups is None else torch.exp(lam)[groups]
    v = cross(w)
    assert v.shape == w.shape
    torch.testing.assert_close(v, scale * w)


# ---------------------------------------------------------------------------- authors' estimate
def dense_bfgs_inverse(s, y):
    """``H`` from ``H0 = I`` by the BFGS inverse update, pair after pair in the given order."""
    eye = torch.eye(s.shape[1], dtype=DT)
    h = eye.clone()
    for si, yi in zip(s, y, strict=True):
        rho = 1.0 / float(yi @ si)
        h = (eye - rho * torch.outer(si, yi)) @ h @ (eye - rho * torch.outer(yi, si))
        h = h + rho * torch.outer(si, si)
    return h


def fake_solve(memory, extra):
    zero = torch.zeros((), dtype=DT)
    stats = SolverStats(1, 1, zero[None], zero, torch.tensor(True), torch.tensor(0), extra)
    return SolverResult(torch.zeros(10, dtype=DT), stats, state=memory)


@pytest.mark.parametrize(
    ("inner_memory", "extra", "order"),
    [
        # L-BFGS-B writes update j into column (j - 1) mod 3: after 5 updates the kept ones,
        # updates 3, 4, 5, sit in columns 2, 0, 1 and are read by column: 4, 5, 3
        ("restart", {"n_committed": 5.0}, [1, 2, 0]),
        ("restart", {"n_committed": 3.0}, [0, 1, 2]),  # not wrapped yet
        ("restart", {}, [0, 1, 2]),  # no count reported: the memory is taken as not wrapped
        ("keep", {"n_committed": 5.0}, [0, 1, 2]),  # pure-Python L-BFGS: oldest first
    ],
)
def test_authors_estimate_reads_the_pairs_in_the_authors_order_with_identity_h0(
    inner_memory, extra, order
):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(10, 10, dtype=DT, generator=gen)
    a = a @ a.T + torch.eye(10, dtype=DT)
    s = torch.randn(3, 10, dtype=DT, generator=gen)
    y = s @ a  # secant pairs of the quadratic ½ xᵀAx: yᵀs > 0
    memory = LBFGSMemory(s, y, None, gamma=0.37)  # the solver's γ is not the authors' H0
    method = HOAG(solver=LBFGS(memory=3), backward=Shine(), inner_memory=inner_memory)
    st = method.stepper(make_problem(), torch.zeros(10, dtype=DT))
    est = st.authors_estimate(fake_solve(memory, extra))
    torch.testing.assert_close(est.dense(), dense_bfgs_inverse(s[order], y[order]))
