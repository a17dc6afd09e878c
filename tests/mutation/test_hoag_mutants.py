"""HOAG robust mode: the safeguarded step rule, driven with prescribed hypergradients.

``HOAGStepper._safeguarded_update`` is called directly with a stubbed ``_backward_metrics``
(the hypergradient), so each rule of the module docstring is checked on exact numbers: first
``L = ‖∇‖/√G``, step ``∇/L`` capped at ``max_step``, ``L *= 0.95`` after a sufficient decrease,
a step that increases the loss by more than ``C·ε·|g|`` is rejected (``L`` doubled, ``ε`` halved,
back to the accepted point), and after a rejection the loss to beat stays the accepted one.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_bilevel import make_problem

from shine.backward import JacobianFree
from shine.bilevel import HOAG
from shine.bilevel.hoag import ToleranceSchedule

DT = torch.float64


def stepper_with(grads, groups=None, **kw):
    problem = make_problem(groups=groups)
    method = HOAG(backward=JacobianFree(), mode="robust", lambda0=-2.0, **kw)
    st = method.stepper(problem, torch.zeros(10, dtype=DT))
    queue = iter(grads)

    def backward_metrics(lam, fwd):
        return next(queue).to(DT), {"backward_time": 0.0, "backward_iters": 1}

    st._backward_metrics = backward_metrics
    return st


def test_first_step_sets_the_lipschitz_estimate_and_follows_the_schedule():
    tol = ToleranceSchedule(kind="quadratic", initial=1e-3)
    st = stepper_with([torch.tensor(0.5)], tolerance=tol)
    lam0 = st.lam.clone()
    assert lam0.numel() == 1
    out = st._safeguarded_update(lam0, None, 10.0, 1)
    assert not out["rejected"]
    assert st.lipschitz == pytest.approx(0.5)  # ‖∇‖/√G with G = 1
    torch.testing.assert_close(st.lam, lam0 - 1.0)  # ∇/L
    torch.testing.assert_close(st.old_lam, lam0)
    assert st.g_old == 10.0 and st.accepted["g"] == 10.0
    assert st.eps == pytest.approx(tol.next(1e-3, 1))
    # a tiny hypergradient: L = 1
    st = stepper_with([torch.tensor(1e-4)])
    st._safeguarded_update(st.lam.clone(), None, 10.0, 1)
    assert st.lipschitz == 1.0


def test_steps_are_capped_at_max_step():
    groups = torch.arange(10) % 9  # nine hyperparameters
    st = stepper_with([torch.full((9,), 0.5)], groups=groups, max_step=2.0)
    lam0 = st.lam.clone()
    assert lam0.shape == (9,)
    st._safeguarded_update(lam0, None, 10.0, 1)
    # uncapped: ∇/L = 1 per coordinate, norm 3 > 2: scaled to norm 2
    step = lam0 - st.lam
    assert float(step.norm()) == pytest.approx(2.0)
    torch.testing.assert_close(step, torch.full((9,), 2.0 / 3.0, dtype=DT))


def test_sufficient_decrease_lengthens_the_steps():
    g = torch.tensor(0.5)
    st = stepper_with([g, g, g])
    lam = st.lam.clone()
    st._safeguarded_update(lam, None, 10.0, 1)  # L = 0.5, predicted ‖∇‖²/L = 0.5
    st._safeguarded_update(st.lam.clone(), None, 10.0 - 0.1, 2)  # 0.1 < C·0.5: no change
    assert st.lipschitz == pytest.approx(0.5)
    st._safeguarded_update(st.lam.clone(), None, 9.9 - 0.2, 3)  # 0.2 >= 0.125: L *= 0.95
    assert st.lipschitz == pytest.approx(0.475)


def test_rejection_and_the_loss_to_beat_after_it():
    g = torch.tensor(0.5)
    st = stepper_with([g, g, g], tolerance=ToleranceSchedule(initial=1e-2))
    lam0 = st.lam.clone()
    st._safeguarded_update(lam0, None, 10.0, 1)
    eps, lam1 = st.eps, st.lam.clone()
    slack = st.cfg.step_c * eps * 10.0
    out = st._safeguarded_update(lam1, None, 10.0 + 0.5 * slack, 2)  # within the slack
    assert not out["rejected"]
    lam2 = st.lam.clone()
    eps2, lipschitz = st.eps, st.lipschitz
    out = st._safeguarded_update(lam2, None, 11.0, 3)  # uphill: rejected
    assert out["rejected"] and out["backward_iters"] == 0
    assert st.lipschitz == pytest.approx(2 * lipschitz)
    assert st.eps == pytest.approx(max(eps2 * 0.5, st.cfg.tolerance.floor))
    torch.testing.assert_close(st.lam, lam1)  # back to the last accepted point
    assert st.accepted is None and st.retry_g == pytest.approx(10.0 + 0.5 * slack)
    # re-evaluated there with a slightly higher loss: the loss to beat stays the accepted one
    st._safeguarded_update(st.lam.clone(), None, 10.0 + slack, 4)
    assert st.accepted["g"] == pytest.approx(10.0 + 0.5 * slack)
    assert st.retry_g is None and not math.isinf(st.g_old)


def test_state_dict_round_trip_continues_identically():
    from shine.solvers import LBFGS

    problem = make_problem()
    method = HOAG(
        solver=LBFGS(memory=10), backward=JacobianFree(), mode="robust", inner_memory="keep"
    )
    a = method.stepper(problem, torch.zeros(10, dtype=DT))
    a.step()
    a.step()
    if a.accepted is None:  # the second step was rejected: one more
        a.step()
    assert a.memory is not None and a.accepted is not None and len(a.memory.kinds) > 0
    b = method.stepper(problem, torch.zeros(10, dtype=DT))
    b.load_state_dict(a.state_dict())
    for name in ("lam", "old_lam", "w", "memory_lam"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    for name in ("lam0_min", "ref_norm", "lipschitz", "eps", "old_eps", "g_old", "iteration"):
        assert getattr(b, name) == getattr(a, name), name
    assert b.retry_g == a.retry_g and b.accepted.keys() == a.accepted.keys()
    torch.testing.assert_close(b.accepted["grad"], a.accepted["grad"], rtol=0, atol=0)
    assert (a.u is None and b.u is None) or torch.equal(a.u, b.u)
    torch.testing.assert_close(b.memory.s, a.memory.s, rtol=0, atol=0)
    assert b.memory.kinds == a.memory.kinds and b.memory.gamma == a.memory.gamma
    ma, mb = a.step(), b.step()
    # the memory's caches (SᵀY, YᵀY) are recomputed after loading: rounding differs
    torch.testing.assert_close(b.lam, a.lam, rtol=1e-10, atol=1e-12)
    assert mb["outer_loss"] == pytest.approx(ma["outer_loss"], rel=1e-12)
