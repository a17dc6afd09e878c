"""L-BFGS memory and inverse estimate: pairs, caches, dtype/device moves, warm starts.

Covers :class:`LBFGSMemory`, :class:`LBFGSInverse`, the solver's workspace as seen through
``LBFGS(...)(..., warm_start=...)`` and the validation shared with ``ScipyLBFGSB``. Independent
references: the dense BFGS inverse update replayed over the pairs, and the dense compact form of
Byrd, Nocedal & Schnabel (1994, Thm. 2.2) built from given ``R = triu(S Yᵀ)`` and ``Y Yᵀ``.

No GPU in the quick tests: where a tensor must follow the device of its inputs, PyTorch's
``meta`` device (shapes only, no data) stands in for an accelerator: a tensor left on the CPU
shows in ``.device`` or makes an operation that mixes devices fail.
"""

from __future__ import annotations

import pytest
import torch
from helpers.recording import recorded

from shine.solvers import LBFGS, LBFGSInverse, LBFGSMemory, ScipyLBFGSB
from shine.solvers.lbfgs import _Workspace

DT = torch.float64
META = torch.device("meta")


def spd_pairs(k=4, dim=6, seed=0):
    """Pairs ``(s_i, y_i = A s_i)`` of an SPD matrix ``A`` (every ``s_iᵀy_i > 0``)."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, dtype=DT, generator=gen)
    A = M @ M.T + dim * torch.eye(dim, dtype=DT)
    s = torch.randn(k, dim, dtype=DT, generator=gen)
    return s, s @ A


def integer_pairs():
    """Pairs with small integer entries: every product is exact in float32 and float64.

    ``R = triu(S Yᵀ)`` has diagonal 27, 15, 32: its inverse is not exact in float32.
    """
    A = torch.tensor(
        [[4, 1, 0, 0, 1], [1, 5, 1, 0, 0], [0, 1, 3, 1, 0], [0, 0, 1, 4, 1], [1, 0, 0, 1, 5]],
        dtype=DT,
    )
    s = torch.tensor([[1, 1, 2, -1, 0], [0, 1, -1, 1, 1], [2, -1, 0, 1, 1]], dtype=DT)
    return s, s @ A, A


def dense_bfgs(s, y, gamma):
    """H ← (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ from H0 = γ I, oldest pair first (float64)."""
    eye = torch.eye(s.shape[1], dtype=DT)
    H = gamma * eye
    for si, yi in zip(s.to(DT), y.to(DT), strict=True):
        rho = 1.0 / (si @ yi)
        H = (eye - rho * torch.outer(si, yi)) @ H @ (eye - rho * torch.outer(yi, si))
        H = H + rho * torch.outer(si, si)
    return H


def compact_dense(s, y, gamma, sty_upper=None, yty=None):
    """Byrd-Nocedal-Schnabel: H = γI + [S Y] [[R⁻ᵀ(Δ + γYᵀY)R⁻¹, -γR⁻ᵀ], [-γR⁻¹, 0]] [S Y]ᵀ.

    ``S, Y`` are ``D x k`` (columns = pairs); ``R`` and ``YᵀY`` are taken as given when supplied.
    """
    S, Y = s.T, y.T
    R = torch.triu(S.T @ Y) if sty_upper is None else sty_upper
    Q = Y.T @ Y if yty is None else yty
    Rinv = torch.linalg.inv(R)
    k = R.shape[0]
    W = torch.zeros(2 * k, 2 * k, dtype=DT)
    W[:k, :k] = Rinv.T @ (torch.diag(torch.diagonal(R)) + gamma * Q) @ Rinv
    W[:k, k:] = -gamma * Rinv.T
    W[k:, :k] = -gamma * Rinv
    SY = torch.cat((S, Y), dim=1)
    return gamma * torch.eye(S.shape[0], dtype=DT) + SY @ W @ SY.T


def perturbed_caches(s, y):
    """A ``triu(S Yᵀ)`` and a ``Y Yᵀ`` that are NOT the products of ``s, y`` (upper, symmetric)."""
    k = s.shape[0]
    R = torch.triu(s @ y.T)
    R = R * (1.0 + 0.25 * torch.triu(torch.ones(k, k, dtype=DT)))  # diagonal stays positive
    Q = y @ y.T + 3.0 * torch.eye(k, dtype=DT)
    return R, Q


def quadratic(A, b):
    def fun(z):
        return 0.5 * z @ A @ z - b @ z, A @ z - b

    return fun


# ---------------------------------------------------------------- LBFGSInverse


def test_default_h0_is_identity_and_single_pair_matrix():
    """``LBFGSInverse(s, y)`` starts from H0 = I; one pair gives one BFGS update (not H0)."""
    s, y = spd_pairs()
    torch.testing.assert_close(
        LBFGSInverse(s, y).dense(), dense_bfgs(s, y, 1.0), rtol=1e-12, atol=1e-12
    )
    one = LBFGSInverse(s[:1], y[:1], 0.4)
    torch.testing.assert_close(one.dense(), dense_bfgs(s[:1], y[:1], 0.4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.dense() @ y[0], s[0], rtol=1e-12, atol=1e-12)  # secant


def test_two_loop_keeps_a_batch_of_one():
    """``(B, D)`` in, ``(B, D)`` out, also for B = 1 (only a ``(D,)`` input is squeezed)."""
    s, y = spd_pairs()
    H = LBFGSInverse(s, y, 0.7)
    v = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    out = H.two_loop(v)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0], dense_bfgs(s, y, 0.7) @ v[0], rtol=1e-12, atol=1e-12)
    assert H.two_loop(v[0]).shape == (6,)


def test_supplied_products_are_used_not_recomputed():
    """``sty_upper``/``yty`` are the products the caller maintained (``recomputed when None``).

    Probe: products that are not those of ``s, y``; ``H`` must be the compact form built from
    the supplied ones (and that differs from the BFGS matrix of ``s, y``, so the probe can fail).
    """
    s, y = spd_pairs()
    R, Q = perturbed_caches(s, y)
    ref = compact_dense(s, y, 0.6, R, Q)
    assert float((ref - dense_bfgs(s, y, 0.6)).abs().max()) > 1e-2
    # the reference reproduces BFGS with the true products
    torch.testing.assert_close(compact_dense(s, y, 0.6), dense_bfgs(s, y, 0.6))
    for only in ("sty_upper", "yty"):  # one cache given, the other recomputed
        kw = {"sty_upper": R} if only == "sty_upper" else {"yty": Q}
        H = LBFGSInverse(s, y, 0.6, **kw)
        expect = compact_dense(s, y, 0.6, **kw)
        torch.testing.assert_close(H.dense(), expect, rtol=1e-12, atol=1e-12)
    H = LBFGSInverse(s, y, 0.6, sty_upper=R, yty=Q)
    torch.testing.assert_close(H.dense(), ref, rtol=1e-12, atol=1e-12)
    v = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(H.matvec(v), ref @ v, rtol=1e-12, atol=1e-12)
    memory = LBFGSMemory(s, y, None, 0.6, sty_upper=R, yty=Q)
    torch.testing.assert_close(memory.inverse().dense(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(memory.curvatures(), torch.diagonal(R))
    for only in ("sty_upper", "yty"):
        kw = {"sty_upper": R} if only == "sty_upper" else {"yty": Q}
        one = LBFGSMemory(s, y, None, 0.6, **kw).inverse()
        torch.testing.assert_close(
            one.dense(), compact_dense(s, y, 0.6, **kw), rtol=1e-12, atol=1e-12
        )


def test_caches_are_cast_to_the_pairs_dtype():
    """float32 caches with float64 pairs: the estimate is computed in float64."""
    s, y, _ = integer_pairs()  # products exact in float32: same operator
    R, Q = torch.triu(s @ y.T), y @ y.T
    H = LBFGSInverse(s, y, 0.5, sty_upper=R.float(), yty=Q.float())
    assert H.dense().dtype == DT
    torch.testing.assert_close(H.dense(), dense_bfgs(s, y, 0.5), rtol=1e-12, atol=1e-12)
    for kw in ({"sty_upper": R.float()}, {"yty": Q.float()}):
        one = LBFGSInverse(s, y, 0.5, **kw)
        torch.testing.assert_close(one.dense(), dense_bfgs(s, y, 0.5), rtol=1e-12, atol=1e-12)


def test_inverse_memory_round_trip():
    """``H.memory()``: the same pairs and γ, all marked regular; it rebuilds the same H."""
    s, y = spd_pairs()
    H = LBFGSInverse(s, y, 0.3)
    memory = H.memory()
    assert isinstance(memory, LBFGSMemory)
    assert torch.equal(memory.s, s) and torch.equal(memory.y, y)
    assert memory.gamma == 0.3 and memory.kinds == ["regular"] * 4
    torch.testing.assert_close(memory.inverse().dense(), H.dense(), rtol=1e-13, atol=1e-13)


def test_empty_estimate_follows_the_device():
    """``H0 = γ I`` of an empty estimate is materialised on the pairs' device."""
    zeros = torch.zeros(0, 3, dtype=DT, device=META)
    H = LBFGSInverse(zeros, zeros, 2.0)
    assert H.dense().device == META and H.dense().shape == (3, 3)


# ---------------------------------------------------------------- LBFGSMemory


def test_memory_validation_names_the_field():
    s, y = spd_pairs()
    with pytest.raises(ValueError, match="shape"):
        LBFGSMemory(s[0], y[0])  # 1-D, equal shapes: not (k, D)
    with pytest.raises(ValueError, match="shape"):
        LBFGSMemory(s, y[:, :-1])  # 2-D, different shapes
    with pytest.raises(ValueError, match="sty_upper"):
        LBFGSMemory(s, y, sty_upper=torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="yty"):
        LBFGSMemory(s, y, yty=torch.zeros(4, 5, dtype=DT))


def test_memory_to_casts_every_tensor_and_keeps_the_rest():
    """``to`` applies ``Tensor.to`` (positional or keyword arguments) to pairs and caches."""
    s, y = spd_pairs()
    R, Q = torch.triu(s @ y.T), y @ y.T
    kinds = ["regular", "opa", "regular", "opa"]
    memory = LBFGSMemory(s, y, kinds, 0.8, sty_upper=R, yty=Q)
    for moved in (memory.to(torch.float32), memory.to(dtype=torch.float32)):
        assert moved.kinds == kinds and moved.gamma == 0.8
        for name, ref in (("s", s), ("y", y), ("sty_upper", R), ("yty", Q)):
            t = getattr(moved, name)
            assert t is not None and t.dtype == torch.float32, name
            assert torch.equal(t, ref.float()), name
    assert memory.s.dtype == DT  # the original is untouched


def test_empty_memory_dtype_and_device():
    memory = LBFGSMemory.empty(4, dtype=DT)
    assert memory.s.dtype == memory.y.dtype == DT and memory.s.shape == (0, 4)
    on_meta = LBFGSMemory.empty(4, dtype=DT, device=META)
    assert on_meta.s.device == on_meta.y.device == META


def test_newest_regular_pair_and_step():
    """The newest pair of kind ``"regular"``, skipping OPA pairs; ``None`` if there is none."""
    s, y = spd_pairs(k=5)

    def newest(kinds):
        memory = LBFGSMemory(s[: len(kinds)], y[: len(kinds)], kinds)
        return memory.last_regular_pair(), memory.last_regular_step()

    cases = {
        ("regular", "opa", "regular"): 2,  # the newest pair itself
        ("regular", "opa", "opa"): 0,  # the oldest pair
        ("opa", "regular", "regular", "opa"): 2,
        ("regular", "regular", "regular", "opa"): 2,
        ("opa", "regular", "opa", "opa", "opa"): 1,
    }
    for kinds, i in cases.items():
        pair, step = newest(list(kinds))
        assert pair is not None and step is not None, kinds
        assert torch.equal(pair[0], s[i]) and torch.equal(pair[1], y[i]), kinds
        assert torch.equal(step, s[i]), kinds
    for kinds in (["opa", "opa"], []):
        assert newest(kinds) == (None, None)


# ---------------------------------------------------------------- warm start (workspace)


@pytest.mark.parametrize("memory_size", [4, 3])
def test_warm_start_keeps_the_supplied_products(memory_size):
    """A warm start loads the memory's caches as they are (sliced to the newest ``m`` pairs).

    The solver hands them back in ``state`` and builds ``inverse`` from them; the probe caches
    differ from the products of ``s, y`` (see ``test_supplied_products_are_used_not_recomputed``).
    """
    s, y = spd_pairs(k=4)
    R, Q = perturbed_caches(s, y)
    b = torch.ones(6, dtype=DT)
    solver = LBFGS(max_iter=0, tol=0.0, memory=memory_size, scale_gamma=True)
    for caches in ({"sty_upper": R, "yty": Q}, {"sty_upper": R}, {"yty": Q}):
        warm = LBFGSMemory(s, y, None, 0.6, **caches)
        res = solver(
            quadratic(torch.eye(6, dtype=DT), b), torch.zeros(6, dtype=DT), warm_start=warm
        )
        m = memory_size
        kept = {name: c[-m:, -m:] for name, c in caches.items()}
        assert res.stats.extra["n_skipped_pairs"] == 0 and len(res.state) == m
        ref = compact_dense(s[-m:], y[-m:], 0.6, **kept)
        torch.testing.assert_close(res.inverse.dense(), ref, rtol=1e-11, atol=1e-12)
        state_ref = {"sty_upper": torch.triu(s[-m:] @ y[-m:].T), "yty": y[-m:] @ y[-m:].T}
        state_ref.update(kept)
        for name, expect in state_ref.items():
            got = getattr(res.state, name)
            assert got is not None, name
            torch.testing.assert_close(got, expect, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(res.state.inverse().dense(), ref, rtol=1e-11, atol=1e-12)


def test_solver_state_carries_the_products_of_its_pairs():
    """``state.sty_upper = triu(S Yᵀ)`` and ``state.yty = Y Yᵀ`` after a cold solve."""
    s, y = spd_pairs(k=1)
    A = torch.diag(torch.linspace(1.0, 4.0, 6, dtype=DT))
    res = LBFGS(tol=1e-10, memory=3)(quadratic(A, y[0]), torch.zeros(6, dtype=DT))
    st = res.state
    assert len(st) == 3 and st.sty_upper is not None and st.yty is not None
    torch.testing.assert_close(st.sty_upper, torch.triu(st.s @ st.y.T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.yty, st.y @ st.y.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("caches", [False, True])
def test_float32_warm_start_in_a_float64_solve(caches):
    """A float32 memory seeds a float64 solve: everything is cast before any linear algebra.

    Integer pairs are exact in float32, so the first step must be ``-H g0`` with ``H`` the
    float64 BFGS matrix (1e-12; a float32 step anywhere would be off by ~1e-7).
    """
    s, y, A = integer_pairs()
    extra = {"sty_upper": torch.triu(s @ y.T), "yty": y @ y.T} if caches else {}
    warm = LBFGSMemory(s, y, None, 1.0, **extra).to(torch.float32)
    b = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=DT) / 3.0
    fun, calls = recorded(quadratic(A, b))
    z0 = torch.zeros(5, dtype=DT)
    res = LBFGS(max_iter=1, tol=0.0, memory=5, line_search="none")(fun, z0, warm_start=warm)
    assert res.stats.extra["n_skipped_pairs"] == 0 and res.value.dtype == DT
    g0 = A @ z0 - b
    torch.testing.assert_close(calls[1], z0 - dense_bfgs(s, y, 1.0) @ g0, rtol=1e-12, atol=1e-14)


def test_warm_start_curvature_rule_is_per_pair():
    """A pair is kept iff ``sᵀy > ε ‖s‖ ‖y‖`` with its own norms, whatever the other pairs.

    Pair 0 is large (norms 1e3); pair 1 has ``sᵀy = 1e-14 ≈ 45 ε ‖s‖‖y‖`` (kept), pair 2
    ``1e-17 < ε`` (dropped). A threshold with the norms of all pairs would drop pair 1 too.
    """
    e = torch.eye(5, dtype=DT)
    s = torch.stack((1e3 * e[2], e[0], e[3]))
    y = torch.stack((1e3 * e[2], e[1] + 1e-14 * e[0], e[4] + 1e-17 * e[3]))
    assert float(s[1] @ y[1]) > 40 * torch.finfo(DT).eps * float(s[1].norm() * y[1].norm())
    warm = LBFGSMemory(s, y, ["regular", "opa", "regular"])
    res = LBFGS(max_iter=0, tol=0.0)(quadratic(e, e[0]), torch.zeros(5, dtype=DT), warm_start=warm)
    assert res.stats.extra["n_skipped_pairs"] == 1
    assert res.state.kinds == ["regular", "opa"]
    assert torch.equal(res.state.s, s[:2]) and torch.equal(res.state.y, y[:2])


@pytest.mark.parametrize("gamma", [0.25, 0.0, -2.0])
def test_warm_start_h0_scale(gamma):
    """With ``scale_gamma`` the warm start's γ is H0 = γ I, unless it is not positive (then 1).

    A non-positive γ (a negative-curvature pair with ``curvature_check=False``) would not give
    an SPD H0. With an empty memory the first unit step is ``z1 = z0 - γ g0``.
    """
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    b = torch.tensor([1.0, -1.0, 2.0], dtype=DT)
    fun, calls = recorded(quadratic(A, b))
    z0 = torch.zeros(3, dtype=DT)
    warm = LBFGSMemory(torch.zeros(0, 3, dtype=DT), torch.zeros(0, 3, dtype=DT), [], gamma)
    solver = LBFGS(max_iter=1, tol=0.0, line_search="none", scale_gamma=True)
    res = solver(fun, z0, warm_start=warm)
    h0 = gamma if gamma > 0 else 1.0
    assert res.stats.nstep == 1 and len(calls) == 2
    torch.testing.assert_close(calls[1], z0 - h0 * (A @ z0 - b), rtol=1e-15, atol=0.0)
    start = LBFGS(max_iter=0, tol=0.0, scale_gamma=True)(fun, z0, warm_start=warm)
    assert start.state.gamma == h0


def test_restart_resets_the_committed_pair_count():
    """``n_committed`` counts pairs since the memory was last cleared (L-BFGS-B's ``iupdat``).

    r(z) = ½‖z‖², z0 = e1, warm start with the negative-curvature pair (e1, -e1) kept by
    ``curvature_check=False``: H = I - 2 e1 e1ᵀ, -H∇r = e1 is uphill, so the memory is cleared
    and a gradient step lands on z* = 0 with one new pair: n_committed = 1.
    """
    e = torch.eye(4, dtype=DT)
    warm = LBFGSMemory(e[:1].clone(), -e[:1].clone())
    solver = LBFGS(tol=1e-12, line_search="none", curvature_check=False)
    res = solver(quadratic(e, torch.zeros(4, dtype=DT)), e[0].clone(), warm_start=warm)
    assert bool(res.stats.converged) and res.stats.nstep == 1
    assert res.stats.extra["n_restarts"] == 1
    torch.testing.assert_close(res.value, torch.zeros(4, dtype=DT), rtol=0, atol=0)
    assert res.stats.extra["n_committed"] == 1 and len(res.state) == 1


def test_workspace_lives_on_the_device_of_the_solve():
    """The solver's workspace is allocated on the device it is given (``z0``'s)."""
    ws = _Workspace(5, 3, DT, META)
    memory, inverse = ws.export()
    assert memory.s.device == memory.y.device == META
    assert memory.sty_upper.device == memory.yty.device == META
    assert inverse.dense().device == META
    # one pair pushed as LBFGS does (next_row, project_next, commit): R⁻¹ is updated in place
    row = ws.next_row()
    row[0] = torch.ones(5, dtype=DT, device=META)
    row[1] = torch.ones(5, dtype=DT, device=META)
    col = ws.project_next(row[1])
    ws.commit("regular", col, 5.0, 5.0, False)
    v = torch.ones(5, dtype=DT, device=META)
    assert ws.k == 1 and ws.apply(v, ws.project(v)).device == META


# ---------------------------------------------------------------- settings


def test_a_single_line_search_evaluation_is_a_valid_setting():
    """``max_ls`` must be >= 1: 1 is allowed (each line search makes at most one evaluation)."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    res = LBFGS(max_ls=1, tol=1e-9)(quadratic(A, b), torch.zeros(3, dtype=DT))
    st = res.stats
    assert bool(st.converged)
    assert st.extra["n_line_search_evals"] <= st.nstep + st.extra["n_restarts"]
    torch.testing.assert_close(res.value, b / torch.diagonal(A), rtol=0, atol=1e-8)
    assert ScipyLBFGSB(max_ls=1).max_ls == 1
    for cls in (LBFGS, ScipyLBFGSB):
        with pytest.raises(ValueError, match="max_ls"):
            cls(max_ls=0)


@pytest.mark.gpu
@pytest.mark.parametrize("caches", [False, True])
def test_cpu_warm_start_of_a_cuda_solve(caches):
    """On a real accelerator: a CPU memory seeds a CUDA solve (every tensor moved first), and
    an estimate built from CUDA pairs is materialised on CUDA, with the CPU float64 numbers."""
    cuda = torch.device("cuda")
    s, y, A = integer_pairs()
    extra = {"sty_upper": torch.triu(s @ y.T), "yty": y @ y.T} if caches else {}
    warm = LBFGSMemory(s, y, None, 1.0, **extra)  # on the CPU
    b = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=DT) / 3.0
    fun, calls = recorded(quadratic(A.to(cuda), b.to(cuda)))
    z0 = torch.zeros(5, dtype=DT, device=cuda)
    res = LBFGS(max_iter=1, tol=0.0, memory=5, line_search="none")(fun, z0, warm_start=warm)
    assert res.value.device.type == "cuda" and res.stats.extra["n_skipped_pairs"] == 0
    expect = dense_bfgs(s, y, 1.0) @ b  # z1 = -H g0 with g0 = -b
    torch.testing.assert_close(calls[1].cpu(), expect, rtol=1e-12, atol=1e-14)
    moved = {name: c.to(cuda) for name, c in extra.items()}
    H = LBFGSInverse(s.to(cuda), y.to(cuda), 0.5, **moved)
    assert H.dense().device.type == "cuda"
    torch.testing.assert_close(H.dense().cpu(), dense_bfgs(s, y, 0.5), rtol=1e-12, atol=1e-12)
