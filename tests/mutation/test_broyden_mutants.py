"""Broyden: the line search's sufficient-decrease test and the restart policy (surviving mutants).

The line-search problems are scalar and exact in binary floating point, so the acceptance test
``‖g(z - α q)‖ <= (1 - c·α)·‖g(z)‖`` is checked at its boundary, where ``<`` and ``<=`` differ.
"""

from __future__ import annotations

import torch
from deq_problems import DT, Recorder, make_problem

from shine.solvers import Broyden


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
