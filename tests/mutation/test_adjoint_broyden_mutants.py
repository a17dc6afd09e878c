"""AdjointBroyden and LowRankMemory paths the other tests leave open (surviving mutants).

Non-finite steps, the unbatched call, the counters, ``opa_every=1``, the memory policies
against a dense replay, the relative tolerance, a residual that does not depend on ``z``, and
``LowRankMemory.seeded`` with weighted estimates. Float64, small problems.
"""

from __future__ import annotations

import torch
from deq_problems import DT, Recorder, make_problem

from shine.solvers import AdjointBroyden, Broyden


def _mv(H, x):
    return torch.einsum("bij,bj->bi", H, x)


def _rmv(H, x):
    return torch.einsum("bji,bj->bi", H, x)


def _term(H, sigma, J):
    a, b = _mv(H, sigma), _rmv(H, _rmv(J, sigma))
    return torch.einsum("bi,bj->bij", a, sigma - b) / (b * sigma).sum(-1)[:, None, None]


def dense_replay(prob, zs, target, memory, policy, opa_every, n_iter):
    """Dense ``(B, D, D)`` replay of AdjointBroyden(h0=-1) with a capped memory."""
    B, D = zs[0].shape
    minus_eye = -torch.eye(D, dtype=DT).expand(B, D, D)
    kept, frozen, step_H = [], [False], []

    def H_now():
        return minus_eye + sum(kept, torch.zeros(B, D, D, dtype=DT))

    def update(direction, J):
        if len(kept) == memory:  # make_room, before the direction is computed from H
            if policy == "restart":
                kept.clear()
            elif policy == "freeze":
                frozen[0] = True
        if frozen[0]:
            return
        H = H_now()
        term = _term(H, direction(H), J)
        if len(kept) == memory:  # fifo
            kept.pop(0)
        kept.append(term)

    for n in range(n_iter):
        if opa_every is not None and n > 0 and n % opa_every == 0:

            def opa(H, z=zs[n]):
                v = _rmv(H, z - target)  # paper eq. 8: vᵀ = ∇L(z_n)ᵀ H_n
                return v / v.norm(dim=1, keepdim=True)

            update(opa, prob.jacobian(zs[n]))
        step_H.append(H_now())
        update(lambda H, z=zs[n + 1]: prob.g(z).detach(), prob.jacobian(zs[n + 1]))
    return step_H, H_now()


def test_memory_policies_match_a_dense_replay():
    prob = make_problem(dim=6, batch=2, contraction=0.6, seed=2)
    target = torch.randn(prob.x.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    for policy in ("fifo", "restart", "freeze"):
        for opa_every in (None, 1, 3):
            rec = Recorder(prob.g)
            res = AdjointBroyden(
                max_iter=7,
                tol=0.0,
                memory=3,
                memory_policy=policy,
                opa_every=opa_every,
                inverse_at="last",
            )(rec, torch.zeros_like(prob.x), outer_grad=lambda z: z - target)
            step_H, H_final = dense_replay(prob, rec.zs, target, 3, policy, opa_every, 7)
            for n in range(7):
                torch.testing.assert_close(
                    rec.zs[n + 1], rec.zs[n] - _mv(step_H[n], rec.gs[n]), rtol=1e-9, atol=1e-12
                )
            torch.testing.assert_close(res.inverse.dense(), H_final, rtol=1e-8, atol=1e-12)
            n_opa = 0 if opa_every is None else 6 // opa_every
            assert res.stats.extra["vjps"] == 7 + n_opa
            if policy != "freeze":
                assert res.stats.extra["opa_updates"] == 2 * n_opa
            assert res.stats.n_evals == res.stats.nstep + 1 == 8


def test_non_finite_steps_are_rejected_and_counted():
    prob = make_problem(dim=6, batch=2)
    calls = {"n": 0}

    def g(z):
        out = prob.g(z)
        calls["n"] += 1
        if calls["n"] == 3:  # the second step of sample 1 blows up once
            out = out.clone()
            out[1] = float("nan")
        return out

    rec = Recorder(g)
    res = AdjointBroyden(max_iter=60, tol=1e-10, memory=60)(rec, torch.zeros_like(prob.x))
    assert res.stats.extra["rejected_steps"] == 1.0
    assert bool(torch.isfinite(res.value).all()) and bool(res.stats.converged.all())
    torch.testing.assert_close(res.value, prob.root(), atol=1e-8, rtol=0)
    # sample 0 was not affected by sample 1's rejection: same iterates as alone
    single = make_problem(dim=6, batch=2)
    single.x = prob.x[:1]
    rec0 = Recorder(single.g)
    AdjointBroyden(max_iter=3, tol=0.0, memory=60)(rec0, torch.zeros_like(single.x))
    for k in range(3):
        torch.testing.assert_close(rec.zs[k][0], rec0.zs[k][0], rtol=1e-12, atol=1e-14)


def test_unbatched_call_equals_a_batch_of_one():
    prob = make_problem(dim=6, batch=1)
    target = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(4))
    solver = AdjointBroyden(max_iter=8, tol=0.0, memory=10, opa_every=2, inverse_at="last")
    batched = solver(prob.g, torch.zeros_like(prob.x), outer_grad=lambda z: z - target)
    single = solver(
        lambda z: prob.g(z.unsqueeze(0)).squeeze(0),
        torch.zeros(6, dtype=DT),
        outer_grad=lambda z: assert_1d(z) - target,
    )
    assert single.value.shape == (6,)
    torch.testing.assert_close(single.value, batched.value[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        single.inverse.dense(), batched.inverse.dense(), rtol=1e-10, atol=1e-13
    )
    assert single.stats.extra["opa_updates"] == batched.stats.extra["opa_updates"] == 3


def assert_1d(z):
    assert z.shape == (6,), z.shape  # the unbatched call hands (D,) to outer_grad
    return z


def test_relative_tolerance_and_residual_independent_of_z():
    prob = make_problem(dim=6, batch=1)
    full = AdjointBroyden(max_iter=40, tol=0.0, memory=40)(prob.g, torch.zeros_like(prob.x))
    rel = AdjointBroyden(max_iter=40, tol=0.0, rel_tol=1e-3, memory=40)(
        prob.g, torch.zeros_like(prob.x)
    )
    assert rel.stats.nstep < full.stats.nstep and bool(rel.stats.converged.all())
    c = torch.ones(1, 4, dtype=DT)
    res = AdjointBroyden(max_iter=3, tol=0.0, memory=5)(lambda z: c.clone(), torch.zeros_like(c))
    assert res.stats.nstep == 3 and bool(torch.isfinite(res.value).all())


def test_opa_update_keeps_the_columns_of_converged_samples():
    # sample 0 converges fast, sample 1 slowly: the FIFO memory wraps around while OPA updates
    # keep coming; sample 0's estimate must be the one it has alone
    easy = make_problem(dim=6, batch=1, contraction=0.2, seed=3)
    hard = make_problem(dim=6, batch=1, contraction=0.95, seed=4)
    both_x = torch.cat([easy.x, hard.x])
    W = torch.stack([easy.f.W.detach(), hard.f.W.detach()])

    def g_both(z):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + both_x) - z

    target = torch.zeros(2, 6, dtype=DT)
    solver = AdjointBroyden(max_iter=60, tol=1e-10, memory=3, opa_every=2)
    alone = solver(easy.g, torch.zeros_like(easy.x), outer_grad=lambda z: z - target[:1])
    together = solver(g_both, torch.zeros_like(both_x), outer_grad=lambda z: z - target)
    assert together.stats.nstep > alone.stats.nstep + 6
    v = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        together.inverse.rmatvec(torch.cat([v, v]))[:1],
        alone.inverse.rmatvec(v),
        rtol=1e-5,
        atol=1e-8,
    )


def test_seeded_memory_keeps_the_weights_of_the_seed():
    prob = make_problem(dim=6, batch=2)
    z0 = torch.zeros_like(prob.x)
    for inverse_at in ("last", "before_lowest"):  # without / with column weights
        fwd = Broyden(max_iter=5, tol=0.0, memory=10, inverse_at=inverse_at)(prob.g, z0)
        for at in ("last", "lowest"):  # zero iterations: the seed itself (its step is 0)
            res = Broyden(max_iter=0, tol=0.0, memory=3, inverse_at=at)(
                prob.g, fwd.value, init_inverse=fwd.inverse
            )
            torch.testing.assert_close(res.inverse.dense(), fwd.inverse.dense())
    # a seed whose weights drop columns: before_lowest of a 5-step solve keeps 4 of 5 terms
    assert fwd.inverse.weights is not None and float(fwd.inverse.weights.sum(1).min()) < 5
