"""Broyden: the line search's sufficient-decrease test and the restart policy (surviving mutants).

The line-search problems are scalar and exact in binary floating point, so the acceptance test
``‖g(z - α q)‖ <= (1 - c·α)·‖g(z)‖`` is checked at its boundary, where ``<`` and ``<=`` differ.
"""

from __future__ import annotations

import pytest
import torch
from deq_problems import DT, Recorder, make_problem

from shine.solvers import AdjointBroyden, Broyden


def test_line_search_accepts_on_the_sufficient_decrease_boundary():
    # g_b(z) = -k_b z from z0 = 1 with H0 = -I: q = H0 g(z0) = k_b, trial points 1 - α k_b.
    # k = 1: α = 1 lands on the root, 0 <= 0·‖g0‖ (boundary). k = 7, c = 1: α = 1 (‖g‖ = 6·7),
    # α = 1/2 (2.5·7 > 0.5·7), α = 1/4 (0.75·7 = (1 - 1/4)·7: boundary): accepted
    k = torch.tensor([[1.0], [7.0]], dtype=DT)
    rec = Recorder(lambda z: -k * z)
    res = Broyden(max_iter=1, tol=0.0, line_search=True, ls_c=1.0)(rec, torch.ones(2, 1, dtype=DT))
    trial = torch.stack(rec.zs[1:])[:, 1, 0]
    torch.testing.assert_close(trial, torch.tensor([-6.0, -2.5, -0.75], dtype=DT))
    torch.testing.assert_close(res.value, torch.tensor([[0.0], [-0.75]], dtype=DT))
    assert res.stats.n_evals == 4
    # k = 1.5, c = 1/2: the full step is accepted on the boundary, one evaluation
    rec = Recorder(lambda z: -1.5 * z)
    res = Broyden(max_iter=1, tol=0.0, line_search=True, ls_c=0.5)(rec, torch.ones(1, 1, dtype=DT))
    assert res.stats.n_evals == 2 and len(rec.zs) == 2
    torch.testing.assert_close(res.value, torch.tensor([[-0.5]], dtype=DT))


def dense_restart_broyden(zs, gs, h0, memory):
    """Dense good-Broyden recursion (one sample), restarted from H0 once ``memory`` terms."""
    D = zs[0].shape[-1]
    H, count, step_H = h0 * torch.eye(D, dtype=DT), 0, []
    for n in range(len(zs) - 1):
        step_H.append(H)
        if count == memory:
            H, count = h0 * torch.eye(D, dtype=DT), 0
        s, y = zs[n + 1] - zs[n], gs[n + 1] - gs[n]
        Hy = H @ y
        H = H + torch.outer(s - Hy, s @ H) / (s @ Hy)
        count += 1
    return step_H, H


def test_restart_policy_matches_a_dense_restarted_recursion():
    prob = make_problem(dim=6, batch=1, contraction=0.8, seed=5)
    rec = Recorder(prob.g)
    res = Broyden(max_iter=8, tol=0.0, memory=3, memory_policy="restart", inverse_at="last")(
        rec, torch.zeros_like(prob.x)
    )
    zs, gs = [z[0] for z in rec.zs], [g[0] for g in rec.gs]
    step_H, H = dense_restart_broyden(zs, gs, -1.0, 3)
    for n in range(8):
        torch.testing.assert_close(zs[n + 1], zs[n] - step_H[n] @ gs[n], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.inverse.dense()[0], H, rtol=1e-8, atol=1e-12)


def test_update_after_a_backtracked_step_uses_the_step_taken():
    # k = 7: the accepted step is s = -0.25·7 = -1.75, y = -7 s; the secant update gives the
    # exact inverse Jacobian -1/7 (the full-step shortcut s = -q would be wrong here)
    k = torch.tensor([[1.0], [7.0]], dtype=DT)
    res = Broyden(max_iter=1, tol=0.0, line_search=True, ls_c=1.0, inverse_at="last")(
        lambda z: -k * z, torch.ones(2, 1, dtype=DT)
    )
    torch.testing.assert_close(res.inverse.dense()[1], torch.tensor([[-1 / 7]], dtype=DT))


def test_converged_samples_stay_put():
    prob = make_problem(dim=6, batch=2)
    z0 = torch.zeros_like(prob.x)
    z0[0] = prob.root()[0] + 1e-9  # sample 0 converges (tol 1e-7) after its first step
    rec = Recorder(prob.g)
    Broyden(max_iter=12, tol=1e-7, memory=20)(rec, z0)
    assert len(rec.zs) > 4
    for z in rec.zs[2:]:  # once converged, sample 0 is not moved, not even by H g ~ 1e-9
        torch.testing.assert_close(z[0], rec.zs[1][0], rtol=0, atol=0)


@pytest.mark.parametrize("solver", [Broyden, AdjointBroyden])
def test_rejections_in_two_iterations_add_up(solver):
    """A non-finite residual rejects the step of that sample only; two rejections in two
    iterations count 2, the trace stays finite and the root is still found."""
    prob = make_problem(dim=6, batch=2)
    calls = {"n": 0}

    def g(z):
        out = prob.g(z)
        calls["n"] += 1
        if calls["n"] in (3, 5):  # two rejected steps of sample 1, in two iterations
            out = out.clone()
            out[1] = float("nan")
        return out

    res = solver(max_iter=60, tol=1e-10, memory=60)(g, torch.zeros_like(prob.x))
    assert res.stats.extra["rejected_steps"] == 2.0
    assert bool(torch.isfinite(res.stats.residual_trace).all())
    torch.testing.assert_close(res.value, prob.root(), atol=1e-8, rtol=0)


def test_relative_tolerance_and_unbatched_call():
    prob = make_problem(dim=6, batch=1)
    z0 = torch.zeros_like(prob.x)
    full = Broyden(max_iter=40, tol=0.0, memory=40)(prob.g, z0)
    rel = Broyden(max_iter=40, tol=0.0, rel_tol=1e-3, memory=40)(prob.g, z0)
    assert rel.stats.nstep < full.stats.nstep and bool(rel.stats.converged.all())

    def g1(z):
        assert z.shape == (6,)  # the unbatched call hands g a (D,) tensor
        return prob.g(z.unsqueeze(0)).squeeze(0)

    single = Broyden(max_iter=10, tol=0.0, memory=10)(g1, z0[0])
    batched = Broyden(max_iter=10, tol=0.0, memory=10)(prob.g, z0)
    torch.testing.assert_close(single.value, batched.value[0], rtol=1e-12, atol=1e-14)


def test_a_memory_of_one_term_is_valid():
    prob = make_problem(dim=6, batch=1)
    res = Broyden(max_iter=50, tol=1e-10, memory=1)(prob.g, torch.zeros_like(prob.x))
    assert bool(res.stats.converged.all()) and res.inverse.U.shape[1] == 1
    with pytest.raises(ValueError, match="memory must be >= 1"):
        Broyden(memory=0)(prob.g, torch.zeros_like(prob.x))
