"""Broyden and adjoint Broyden: convergence, secant conditions, estimates, per-sample logic."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DT, Recorder, make_problem

from shine.solvers import AdjointBroyden, Broyden
from shine.solvers.low_rank import LowRankInverse, LowRankMemory


def dense_good_broyden(zs, gs, h0):
    """Reference: dense good-Broyden inverse recursion on recorded iterates (one sample)."""
    D = zs[0].shape[-1]
    H = h0 * torch.eye(D, dtype=DT)
    for n in range(len(zs) - 1):
        s, y = zs[n + 1] - zs[n], gs[n + 1] - gs[n]
        Hy = H @ y
        H = H + torch.outer(s - Hy, s @ H) / (s @ Hy)
    return H


@pytest.mark.parametrize("batch", [1, 3])
def test_broyden_converges_to_root(batch):
    prob = make_problem(dim=10, batch=batch)
    res = Broyden(max_iter=60, tol=1e-12, memory=60)(prob.g, torch.zeros_like(prob.x))
    assert bool(res.stats.converged.all())
    torch.testing.assert_close(res.value, prob.root(), atol=1e-10, rtol=0)
    assert res.stats.residual_trace.shape == (res.stats.nstep + 1, batch)
    assert res.stats.n_evals == res.stats.nstep + 1


def test_low_rank_estimate_equals_dense_broyden_and_secant():
    prob = make_problem(dim=6, batch=2)
    rec = Recorder(prob.g)
    res = Broyden(max_iter=5, tol=0.0, memory=10, inverse_at="last")(rec, torch.zeros_like(prob.x))
    zs = torch.stack(rec.zs)  # (n+1, B, D), no line search: every evaluation is an iterate
    gs = torch.stack(rec.gs)
    Hd = res.inverse.dense()
    for b in range(2):
        ref = dense_good_broyden(zs[:, b], gs[:, b], -1.0)
        torch.testing.assert_close(Hd[b], ref, rtol=1e-9, atol=1e-12)
        # secant condition of the last update: H_{n+1} y_n = s_n
        s, y = zs[-1, b] - zs[-2, b], gs[-1, b] - gs[-2, b]
        torch.testing.assert_close(Hd[b] @ y, s, rtol=1e-9, atol=1e-12)


def test_full_step_update_equals_the_general_secant_update():
    # without line search the update reuses the cached H g(z_n) (s - H y = -H g(z_{n+1}), terms
    # stored with both factors negated); a line search that accepts every full step goes through
    # the general formula s - H y: both must build the same iterates and the same estimate (4
    # steps: the secant pairs stay large, their rounding ~1e-16/‖s‖ well below the tolerance)
    prob = make_problem(dim=7, batch=3, contraction=0.3, seed=5)
    plain = Broyden(max_iter=4, tol=0.0, memory=10, inverse_at="last")
    searched = Broyden(max_iter=4, tol=0.0, memory=10, inverse_at="last", line_search=True)
    a = plain(prob.g, torch.zeros_like(prob.x))
    b = searched(prob.g, torch.zeros_like(prob.x))
    assert a.stats.n_evals == b.stats.n_evals  # every full step was accepted
    torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.inverse.dense(), b.inverse.dense(), rtol=1e-10, atol=1e-12)


def test_memory_never_reads_unwritten_columns():
    # the buffers are allocated uninitialised: fill them with NaN to prove that a fresh column
    # written for part of the batch gives the other samples a zero term, and that dropping the
    # terms of a sample only touches written columns
    like = torch.zeros(2, 5, dtype=DT)
    mem = LowRankMemory(2, 5, 3, -1.0, "fifo", like)
    mem.U.fill_(float("nan"))
    mem.V.fill_(float("nan"))
    u = torch.ones(2, 5, dtype=DT)
    mem.push(u, 2 * u, step=1, mask=torch.tensor([True, False]))
    x = torch.arange(10, dtype=DT).view(2, 5)
    Hx = mem.estimate().matvec(x)
    torch.testing.assert_close(Hx[1], -x[1])  # sample 1: H0 only
    torch.testing.assert_close(Hx[0], -x[0] + u[0] * (2 * u[0] @ x[0]))
    mem.reset_samples(torch.tensor([True, False]))
    torch.testing.assert_close(mem.estimate().matvec(x), -x)
    assert mem.estimate().matvec(x).isfinite().all()


def test_rmatvec_is_transpose_of_matvec():
    gen = torch.Generator().manual_seed(3)
    U = torch.randn(2, 4, 7, dtype=DT, generator=gen)
    V = torch.randn(2, 4, 7, dtype=DT, generator=gen)
    weights = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=DT)
    for H in (LowRankInverse(-1.0, U, V), LowRankInverse(0.5, U, V, weights)):
        Hd = H.dense()
        v = torch.randn(2, 7, dtype=DT, generator=gen)
        torch.testing.assert_close(H.matvec(v), torch.einsum("bij,bj->bi", Hd, v))
        torch.testing.assert_close(H.rmatvec(v), torch.einsum("bji,bj->bi", Hd, v))
        torch.testing.assert_close(H.transpose().dense(), Hd.transpose(1, 2))
    assert LowRankInverse(-1.0, U, V, weights).rank == 3


def test_unbatched_input_and_line_search():
    prob = make_problem(dim=8, batch=1, contraction=0.9)
    g1 = lambda z: prob.g(z.unsqueeze(0)).squeeze(0)  # noqa: E731
    for ls in (False, True):
        res = Broyden(max_iter=80, tol=1e-11, memory=80, line_search=ls)(
            g1, torch.zeros(8, dtype=DT)
        )
        assert res.value.shape == (8,)
        assert res.stats.residual.dim() == 0 and bool(res.stats.converged)
        assert res.inverse.matvec(torch.ones(8, dtype=DT)).shape == (8,)


def _columns(inverse):
    """The rank-one terms ``(u_j, v_j)`` of sample 0 of a low-rank estimate, as a list."""
    return [(inverse.U[0, j], inverse.V[0, j]) for j in range(inverse.U.shape[1])]


def _index_of(term, terms):
    """Position of ``term`` among ``terms`` (same u and v to rounding), or None."""
    for i, (u, v) in enumerate(terms):
        if torch.allclose(term[0], u, rtol=1e-10, atol=1e-13) and torch.allclose(
            term[1], v, rtol=1e-10, atol=1e-13
        ):
            return i
    return None


def test_line_search_backtracks_an_overshooting_step():
    # g(z) = -3 (z - z*): from H0 = -I the full step z + g(z) overshoots to -2 e0 (residual x2);
    # the search halves it: z + g/2 = z* - e0/2, residual halved (accepted at α = 1/2)
    z_star = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    z0 = torch.zeros_like(z_star)
    calls = []

    def g(z):
        calls.append(z.clone())
        return -3.0 * (z - z_star)

    res = Broyden(max_iter=1, tol=0.0, line_search=True)(g, z0)
    e0 = z0 - z_star
    torch.testing.assert_close(calls[1], z_star - 2 * e0)  # the full step, rejected
    torch.testing.assert_close(calls[2], z_star - 0.5 * e0)  # half of it, accepted
    assert res.stats.n_evals == 3
    torch.testing.assert_close(res.value, z_star - 0.5 * e0)
    calls.clear()
    plain = Broyden(max_iter=1, tol=0.0, line_search=False)(g, z0)
    assert plain.stats.n_evals == 2 and len(calls) == 2
    torch.testing.assert_close(calls[1], z_star - 2 * e0)  # no backtracking
    torch.testing.assert_close(plain.value, z0)  # its step made things worse: z0 is the lowest


@pytest.mark.parametrize("policy", ["fifo", "restart", "freeze"])
def test_memory_cap_policies_keep_the_columns_they_promise(policy):
    # five updates with room for four. Unlimited memory: terms t1..t5. fifo overwrites the
    # oldest: t2..t5 (t5 is computed before the eviction, as without a cap); freeze keeps
    # t1..t4 and ignores t5; restart discards t1..t4 and computes its fifth term from H0 (a term
    # of no unlimited run)
    prob = make_problem(dim=12, batch=1, contraction=0.8)
    z0 = torch.zeros_like(prob.x)
    solve = dict(max_iter=5, tol=0.0, inverse_at="last")
    unlimited = _columns(Broyden(memory=10, **solve)(prob.g, z0).inverse)
    assert len(unlimited) == 5
    capped = Broyden(memory=4, memory_policy=policy, **solve)(prob.g, z0)
    kept = sorted(_index_of(t, unlimited) for t in _columns(capped.inverse))
    expected = {"fifo": [1, 2, 3, 4], "freeze": [0, 1, 2, 3], "restart": [None]}[policy]
    assert kept == expected, kept
    # and each still converges
    res = Broyden(max_iter=100, tol=1e-10, memory=4, memory_policy=policy)(prob.g, z0)
    assert bool(res.stats.converged.all())


def test_per_sample_convergence_freezes_converged_samples():
    prob = make_problem(dim=8, batch=2)
    z0 = torch.zeros_like(prob.x)
    z0[0] = prob.root()[0]  # sample 0 starts at its root
    rec = Recorder(prob.g)
    res = Broyden(max_iter=40, tol=1e-10, memory=40)(rec, z0)
    assert int(res.stats.lowest_step[0]) == 0
    assert int(res.stats.lowest_step[1]) > 0
    for z in rec.zs:  # sample 0 never moved
        torch.testing.assert_close(z[0], z0[0])
    assert res.inverse.rank > 0
    # the estimate of sample 0 is H0 (no update) because its estimate is taken at step 0
    v = torch.randn(2, 8, dtype=DT)
    torch.testing.assert_close(res.inverse.matvec(v)[0], -v[0])


def test_returns_lowest_residual_iterate():
    prob = make_problem(dim=8, batch=2)
    res = Broyden(max_iter=6, tol=0.0, memory=6)(prob.g, torch.zeros_like(prob.x))
    trace = res.stats.residual_trace
    torch.testing.assert_close(res.stats.residual, trace.min(dim=0).values)
    torch.testing.assert_close(res.stats.lowest_step, trace.argmin(dim=0))
    torch.testing.assert_close(
        torch.linalg.vector_norm(prob.g(res.value), dim=-1), res.stats.residual
    )


def test_inverse_at_selects_the_estimate_of_the_returned_iterate():
    prob = make_problem(dim=6, batch=1)
    rec = Recorder(prob.g)
    res = Broyden(max_iter=4, tol=0.0, memory=10, inverse_at="before_lowest")(
        rec, torch.zeros_like(prob.x)
    )
    k = int(res.stats.lowest_step[0])
    zs, gs = torch.stack(rec.zs)[:, 0], torch.stack(rec.gs)[:, 0]
    ref = dense_good_broyden(zs[:k], gs[:k], -1.0)  # H_{k-1}: pairs up to z_{k-1}
    torch.testing.assert_close(res.inverse.dense()[0], ref, rtol=1e-9, atol=1e-12)


def test_non_finite_residuals_are_rejected():
    prob = make_problem(dim=6, batch=2)
    calls = {"n": 0}

    def g(z):
        out = prob.g(z)
        calls["n"] += 1
        if calls["n"] == 3:  # the second step of sample 1 blows up once
            out = out.clone()
            out[1] = float("nan")
        return out

    res = Broyden(max_iter=60, tol=1e-10, memory=60)(g, torch.zeros_like(prob.x))
    assert res.stats.extra["rejected_steps"] == 1.0
    assert bool(torch.isfinite(res.value).all()) and bool(res.stats.converged.all())
    torch.testing.assert_close(res.value, prob.root(), atol=1e-8, rtol=0)


def test_init_inverse_seeds_the_memory():
    prob = make_problem(dim=6, batch=2)
    fwd = Broyden(max_iter=5, tol=0.0, memory=10)(prob.g, torch.zeros_like(prob.x))
    # zero iterations: the result carries exactly the seed (masked columns baked in)
    res = Broyden(max_iter=0, tol=0.0, memory=3, inverse_at="last")(
        prob.g, fwd.value, init_inverse=fwd.inverse
    )
    torch.testing.assert_close(res.inverse.dense(), fwd.inverse.dense())


def test_adjoint_broyden_converges_and_satisfies_adjoint_secant():
    prob = make_problem(dim=8, batch=2)
    rec = Recorder(prob.g)
    res = AdjointBroyden(max_iter=4, tol=0.0, memory=10, inverse_at="last")(
        rec, torch.zeros_like(prob.x)
    )
    z_last, sigma = rec.zs[-1], rec.gs[-1]
    J = prob.jacobian(z_last)
    # sigmaᵀ B_{n+1} = sigmaᵀ J(z_{n+1})  <=>  H_{n+1}ᵀ J(z_{n+1})ᵀ sigma = sigma
    jts = torch.einsum("bji,bj->bi", J, sigma)
    torch.testing.assert_close(res.inverse.rmatvec(jts), sigma, rtol=1e-8, atol=1e-12)
    full = AdjointBroyden(max_iter=60, tol=1e-12, memory=60)(prob.g, torch.zeros_like(prob.x))
    assert bool(full.stats.converged.all())
    torch.testing.assert_close(full.value, prob.root(), atol=1e-10, rtol=0)
    assert full.stats.extra["vjps"] == full.stats.nstep


def test_adjoint_broyden_opa_update_secant_and_validation():
    prob = make_problem(dim=8, batch=2)
    target = torch.randn_like(prob.x)
    outer_grad = lambda z: z - target  # noqa: E731
    with pytest.raises(ValueError, match="outer gradient"):
        AdjointBroyden(opa_every=2)(prob.g, torch.zeros_like(prob.x))
    res = AdjointBroyden(max_iter=3, tol=0.0, memory=10, opa_every=2)(
        prob.g, torch.zeros_like(prob.x), outer_grad=outer_grad
    )
    assert res.stats.extra["opa_updates"] == 2.0  # one per sample at n = 2
    assert res.stats.extra["vjps"] == 4.0


@pytest.mark.parametrize("direction", ["transpose", "as_is"])
def test_opa_secant_condition_holds_right_after_the_extra_update(direction):
    prob = make_problem(dim=8, batch=2)
    target = torch.randn_like(prob.x)
    rec = Recorder(prob.g)
    before = AdjointBroyden(max_iter=2, tol=0.0, memory=10, inverse_at="last")(
        prob.g, torch.zeros_like(prob.x)
    )
    res = AdjointBroyden(
        max_iter=3, tol=0.0, memory=10, opa_every=2, opa_orientation=direction, inverse_at="last"
    )(rec, torch.zeros_like(prob.x), outer_grad=lambda z: z - target)
    # columns in order: 2 regular updates, the OPA update at z_2, the regular update at z_3
    assert res.inverse.U.shape[1] == 4
    H_opa = LowRankInverse(-1.0, res.inverse.U[:, :3], res.inverse.V[:, :3])
    z2 = rec.zs[2]
    w = z2 - target
    H2 = before.inverse
    v = H2.rmatvec(w) if direction == "transpose" else H2.matvec(w)  # paper eq. 8: vᵀ = wᵀ H_2
    jtv = torch.einsum("bji,bj->bi", prob.jacobian(z2), v)
    # extra secant condition vᵀ B_+ = vᵀ J(z_2)  <=>  H_+ᵀ J(z_2)ᵀ v = v
    torch.testing.assert_close(H_opa.rmatvec(jtv), v, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("solver_cls", [Broyden, AdjointBroyden])
def test_estimate_of_a_sample_does_not_depend_on_the_rest_of_the_batch(solver_cls):
    # sample 0 converges fast, sample 1 slowly: the FIFO memory wraps around several times
    # after sample 0 stopped, which must not erase sample 0's columns. An erased column changes
    # the estimate at order one; the tolerance only absorbs rounding: batched and single products
    # round differently, and the last secant pairs (‖s‖ ~ tol) carry relative errors ~1e-16/tol
    easy = make_problem(dim=8, batch=1, contraction=0.2, seed=3)
    hard = make_problem(dim=8, batch=1, contraction=0.97, seed=4)
    both_x = torch.cat([easy.x, hard.x])
    W = torch.stack([easy.f.W.detach(), hard.f.W.detach()])

    def g_both(z):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + both_x) - z

    solver = solver_cls(max_iter=80, tol=1e-10, memory=4)
    alone = solver(easy.g, torch.zeros_like(easy.x))
    together = solver(g_both, torch.zeros_like(both_x))
    assert together.stats.nstep > alone.stats.nstep + 8
    torch.testing.assert_close(together.value[:1], alone.value)
    v = torch.randn(1, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        together.inverse.rmatvec(torch.cat([v, v]))[:1],
        alone.inverse.rmatvec(v),
        rtol=1e-5,
        atol=1e-8,
    )
