"""FixedPoint and Anderson against independent references on small linear contractions.

``g_b(z) = A_b z + c_b - z`` with ``‖A_b‖₂ < 1``. Anderson is compared iterate by iterate with a
dense per-sample replay of type-II Anderson mixing written from its definition (keep the last
``m`` iterates and residuals in a list, solve ``(GGᵀ + λ_n I) α = 1`` with
``λ_n = lam·tr(GGᵀ)/m_n``, normalise ``Σα = 1``, mix ``Σ α_i (z_i + β g_i)``); the iteration
counts to a tolerance and the recorded statistics follow from the replayed residuals.
"""

from __future__ import annotations

import pytest
import torch

from shine.solvers import Anderson, FixedPoint

DT = torch.float64
B, D = 2, 4


def linear_problem(seed=0, radius=0.8):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(B, D, D, dtype=DT, generator=gen)
    A = radius * M / torch.linalg.matrix_norm(M, 2)[:, None, None]
    c = torch.randn(B, D, dtype=DT, generator=gen)
    z0 = torch.randn(B, D, dtype=DT, generator=gen)  # not 0: the first slot must hold z0
    return A, c, z0


class Recorder:
    """Batched residual ``g(Z) = A Z + c - Z`` that records every point it is evaluated at."""

    def __init__(self, A, c):
        self.A, self.c = A, c
        self.calls: list[torch.Tensor] = []

    def __call__(self, Z):
        self.calls.append(Z.clone())
        return torch.einsum("bij,bj->bi", self.A, Z) + self.c - Z

    def sample(self, b):
        return lambda z: self.A[b] @ z + self.c[b] - z


def anderson_reference(g, z0, memory, beta, lam, n_steps):
    """Dense Anderson mixing of one sample; returns the iterates z_0..z_n and residuals."""
    xs, gs = [z0], [g(z0)]
    iterates, residuals = [z0], [gs[0]]
    for _ in range(n_steps):
        k = len(xs)
        if k == 1:
            z = xs[0] + beta * gs[0]
        else:
            G = torch.stack(gs)
            gram = G @ G.T
            reg = lam * torch.trace(gram) / k
            alpha = torch.linalg.solve(
                gram + reg * torch.eye(k, dtype=DT), torch.ones(k, dtype=DT)
            )
            alpha = alpha / alpha.sum()
            z = sum(a * (x + beta * gx) for a, x, gx in zip(alpha, xs, gs, strict=True))
        xs.append(z)
        gs.append(g(z))
        xs, gs = xs[-memory:], gs[-memory:]
        iterates.append(z)
        residuals.append(gs[-1])
    return torch.stack(iterates), torch.stack(residuals)


SETTINGS = {"memory": 3, "beta": 0.8, "lam": 0.05}


def test_anderson_matches_dense_replay_iterate_by_iterate():
    """8 steps (memory 3, so the history wraps around), nothing converges (tol = 0)."""
    A, c, z0 = linear_problem()
    g = Recorder(A, c)
    res = Anderson(max_iter=8, tol=0.0, **SETTINGS)(g, z0)
    st = res.stats
    assert st.nstep == 8 and st.n_evals == 9 and len(g.calls) == 9
    assert not bool(st.converged.any()) and st.extra["n_fallback_steps"] == 0.0
    calls = torch.stack(g.calls)  # (9, B, D)
    for b in range(B):
        zs, gs = anderson_reference(g.sample(b), z0[b], n_steps=8, **SETTINGS)
        torch.testing.assert_close(calls[:, b], zs, rtol=1e-10, atol=1e-12)
        norms = gs.norm(dim=-1)
        torch.testing.assert_close(st.residual_trace[:, b], norms, rtol=1e-10, atol=1e-14)
        k = int(norms.argmin())
        assert int(st.lowest_step[b]) == k
        torch.testing.assert_close(res.value[b], zs[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("tol", "rel_tol"), [(1e-7, 0.0), (0.0, 1e-6)])
def test_anderson_iteration_count_to_tolerance(tol, rel_tol):
    """Each sample stops at its first iterate with ‖g‖ <= max(tol, rel_tol·‖g_0‖) (then frozen);
    the solver stops when the last one does."""
    A, c, z0 = linear_problem(seed=1)
    g = Recorder(A, c)
    res = Anderson(max_iter=60, tol=tol, rel_tol=rel_tol, **SETTINGS)(g, z0)
    first = []
    for b in range(B):
        zs, gs = anderson_reference(g.sample(b), z0[b], n_steps=60, **SETTINGS)
        norms = gs.norm(dim=-1)
        hit = (norms <= max(tol, rel_tol * float(norms[0]))).nonzero()
        first.append(int(hit[0]))
        torch.testing.assert_close(res.value[b], zs[first[-1]], rtol=1e-9, atol=1e-12)
    assert 3 < max(first) < 60
    assert bool(res.stats.converged.all())
    assert res.stats.nstep == max(first) and res.stats.lowest_step.tolist() == first


def test_fixed_point_relative_tolerance_count():
    """A = ½I: g_{n+1} = ½ g_n, so ‖g_n‖ <= 1e-3‖g_0‖ first at n = 10 (2⁻¹⁰ < 1e-3 < 2⁻⁹)."""
    _, c, z0 = linear_problem()
    A = 0.5 * torch.eye(D, dtype=DT).expand(B, D, D)
    res = FixedPoint(max_iter=50, tol=0.0, rel_tol=1e-3)(Recorder(A, c), z0)
    assert res.stats.nstep == 10 and bool(res.stats.converged.all())
    assert res.stats.lowest_step.tolist() == [10, 10]


def test_anderson_with_memory_one_is_the_damped_fixed_point_iteration():
    """m = 1 keeps no history to mix: z_{n+1} = z_n + β g(z_n), as FixedPoint(step=β)."""
    A, c, z0 = linear_problem()
    ga, gf = Recorder(A, c), Recorder(A, c)
    aa = Anderson(max_iter=6, tol=0.0, memory=1, beta=0.7)(ga, z0)
    fp = FixedPoint(max_iter=6, tol=0.0, step=0.7)(gf, z0)
    assert torch.equal(torch.stack(ga.calls), torch.stack(gf.calls))
    assert torch.equal(aa.value, fp.value) and aa.stats.nstep == fp.stats.nstep == 6


@pytest.mark.parametrize("cls", [FixedPoint, Anderson])
def test_zero_iterations_return_the_start(cls):
    """max_iter = 0 is valid: g is evaluated once at z0, which is returned."""
    A, c, z0 = linear_problem()
    g = Recorder(A, c)
    res = cls(max_iter=0)(g, z0)
    assert len(g.calls) == 1 and torch.equal(res.value, z0)
    assert res.stats.nstep == 0 and res.stats.n_evals == 1
    assert res.stats.residual_trace.shape == (1, B)


@pytest.mark.parametrize("cls", [FixedPoint, Anderson])
def test_batch_of_one_keeps_its_batch_dimension(cls):
    """Only an unbatched (D,) start is squeezed; a (1, D) batch stays (1, D)."""
    A, c, z0 = linear_problem()
    res = cls(max_iter=5)(Recorder(A[:1], c[:1]), z0[:1])
    assert res.value.shape == (1, D) and res.stats.residual.shape == (1,)


def test_non_finite_mixing_falls_back_to_a_plain_step_per_sample():
    """Sample 1 has a constant residual of size 1e155: its Gram matrix overflows to inf and the
    mixing weights are NaN at every step n >= 1, so it takes the plain step z_n + β g_n (the
    newest slot of the circular history, also after it wraps: memory 3, 7 steps); that is
    6 fallback sample-steps. Sample 0 must mix exactly as if it were alone."""
    A, c, z0 = linear_problem()
    big = 1e155

    class Overflowing(Recorder):
        def __call__(self, Z):
            out = super().__call__(Z)
            out[1] = big
            return out

    g = Overflowing(A, c)
    res = Anderson(max_iter=7, tol=0.0, **SETTINGS)(g, z0)
    assert res.stats.extra["n_fallback_steps"] == 6.0
    calls = torch.stack(g.calls)
    zs, _ = anderson_reference(g.sample(0), z0[0], n_steps=7, **SETTINGS)
    torch.testing.assert_close(calls[:, 0], zs, rtol=1e-10, atol=1e-12)
    plain = [z0[1]]
    for _ in range(7):
        plain.append(plain[-1] + SETTINGS["beta"] * big)
    torch.testing.assert_close(calls[:, 1], torch.stack(plain), rtol=1e-14, atol=0.0)
    assert torch.equal(res.value[1], z0[1])  # the residual never decreased


def test_float32_start_does_not_depend_on_the_default_dtype():
    """The solver works in the dtype of z0: a float32 run under a float64 default dtype stays
    float32 and agrees with the float64 run."""
    A, c, z0 = linear_problem()
    ref = Anderson(max_iter=10, tol=0.0, **SETTINGS)(Recorder(A, c), z0).value
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        res = Anderson(max_iter=10, tol=0.0, **SETTINGS)(
            Recorder(A.float(), c.float()), z0.float()
        )
    finally:
        torch.set_default_dtype(previous)
    assert res.value.dtype == torch.float32
    torch.testing.assert_close(res.value.double(), ref, rtol=1e-4, atol=1e-5)


def test_regularisation_stays_relative_down_to_small_residuals():
    """λ_n = lam·tr(GGᵀ)/m_n scales with the residuals, so the mixing near convergence is the
    same as far from it: the solver follows the dense replay to ‖g‖ <= 1e-11 (where ‖g‖² is
    far below eps), with the same iteration count. (An absolute floor eps on tr(GGᵀ)/m_n made
    the regularisation dominate once ‖g‖ < ~1e-8 and slowed the last steps down.)"""
    A, c, z0 = linear_problem(seed=1)
    g = Recorder(A, c)
    res = Anderson(max_iter=60, tol=1e-11, **SETTINGS)(g, z0)
    calls = torch.stack(g.calls)
    first = []
    for b in range(B):
        zs, gs = anderson_reference(g.sample(b), z0[b], n_steps=60, **SETTINGS)
        first.append(int((gs.norm(dim=-1) <= 1e-11).nonzero()[0]))
        torch.testing.assert_close(
            calls[: first[-1] + 1, b], zs[: first[-1] + 1], rtol=1e-9, atol=1e-13
        )
    assert res.stats.nstep == max(first) and res.stats.lowest_step.tolist() == first


def test_unregularised_mixing_with_a_sample_at_its_root():
    """lam = 0 is allowed. Sample 0 starts at its root (g = 0, an all-zero Gram matrix, singular
    without regularisation): it is converged and frozen, and the batch must still be solved;
    sample 1 converges to its root."""
    A, c, z0 = linear_problem()
    c[0], z0[0] = 0.0, 0.0
    res = Anderson(max_iter=60, tol=1e-10, memory=3, lam=0.0)(Recorder(A, c), z0)
    assert bool(res.stats.converged.all()) and int(res.stats.lowest_step[0]) == 0
    assert torch.equal(res.value[0], z0[0])
    root = torch.linalg.solve(torch.eye(D, dtype=DT) - A[1], c[1])
    torch.testing.assert_close(res.value[1], root, rtol=0.0, atol=1e-9)
    assert res.stats.extra["n_fallback_steps"] == 0.0  # the frozen sample is not counted
