"""Broyden / AdjointBroyden contracts the other tests leave open (surviving mutants).

* the field ranges checked at construction (each minimum is valid, just below it is not);
* Broyden's line search rejects a step that does not decrease ``‖g‖`` by the factor
  ``1 - c·α``, on scalar problems exact in binary floating point;
* AdjointBroyden: the index of the returned iterate and the estimate handed over with it,
  against a dense adjoint-Broyden replay; the noise-floor rule at its boundary; the counters;
  the unbatched call; the scale invariance of the OPA update.

Float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
from deq_problems import DT, Recorder, make_problem

from shine.solvers import AdjointBroyden, Broyden

EPS = torch.finfo(DT).eps  # 2**-52


# ----------------------------------------------------------------------------- field ranges

BROYDEN_MINIMA = {"max_iter": 0, "tol": 0.0, "rel_tol": 0.0, "memory": 1, "ls_max": 1}
ADJOINT_MINIMA = {
    "max_iter": 0,
    "tol": 0.0,
    "rel_tol": 0.0,
    "memory": 1,
    "opa_every": 1,
    "noise_floor": 0.0,
}


def _below(low):
    """The closest invalid value under an inclusive minimum (ints step by 1)."""
    return low - 1 if isinstance(low, int) else -1e-300


@pytest.mark.parametrize(
    ("cls", "minima"), [(Broyden, BROYDEN_MINIMA), (AdjointBroyden, ADJOINT_MINIMA)]
)
def test_each_documented_minimum_is_valid_and_the_value_below_is_rejected(cls, minima):
    # the minima are inclusive: max_iter=0 (return z0), tol=0 / rel_tol=0 (disabled), memory=1,
    # ls_max=1, opa_every=1 (OPA at every iteration) and noise_floor=0 ("updates always") are
    # meaningful settings; anything below fails at construction, naming the class and field
    cls()
    for key, low in minima.items():
        assert getattr(cls(**{key: low}), key) == low
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{key} must be >= {low}, got"):
            cls(**{key: _below(low)})
    # a fraction of the noise floor is valid too (the range is [0, inf), not [1, inf))
    if cls is AdjointBroyden:
        assert cls(noise_floor=0.5).noise_floor == 0.5


# ------------------------------------------------------------------- Broyden's line search


def test_line_search_rejects_steps_without_sufficient_decrease():
    """Acceptance test ``‖g(z - α q)‖ <= (1 - c·α)‖g(z)‖`` (c = 1/2), per sample.

    ``g_b(z) = -k_b z`` from ``z0 = 1`` with ``H0 = -I``: ``q = k_b``, trial points ``1 - α k_b``,
    ratios ``|1 - α k_b|`` to ``‖g(z0)‖ = k_b`` (all exact in binary):

    * ``k = 2.25``: α = 1 gives ratio 1.25 (the residual grows: rejected, a ``1 + c`` or
      ``2 - c`` bound would accept it); α = 1/2 gives 0.125 <= 0.75: accepted at ``-0.125``;
    * ``k = 4``: α = 1 gives 3, α = 1/2 gives exactly 1 (no decrease: rejected, since
      ``1 > 1 - 1/4``), α = 1/4 lands on the root.
    """
    k = torch.tensor([[2.25], [4.0]], dtype=DT)
    rec = Recorder(lambda z: -k * z)
    res = Broyden(max_iter=1, tol=0.0, line_search=True, ls_c=0.5)(rec, torch.ones(2, 1, dtype=DT))
    trials = torch.stack(rec.zs[1:])[:, :, 0]  # (evaluation, sample)
    # sample 0 keeps its accepted point while sample 1 backtracks further
    expected = torch.tensor([[-1.25, -3.0], [-0.125, -1.0], [-0.125, 0.0]], dtype=DT)
    torch.testing.assert_close(trials, expected, rtol=0, atol=0)
    assert res.stats.n_evals == 4
    torch.testing.assert_close(res.value, torch.tensor([[-0.125], [0.0]], dtype=DT))
    # the residuals recorded are those of the accepted points
    torch.testing.assert_close(
        res.stats.residual_trace, torch.tensor([[2.25, 4.0], [0.28125, 0.0]], dtype=DT)
    )


# ------------------------------------------------------------- AdjointBroyden: replay


def _two_speed_problem():
    """Two independent tanh layers ``g_b(z) = tanh(W_b z + x_b) - z`` (contraction 0.2 / 0.9)."""
    easy = make_problem(dim=6, batch=1, contraction=0.2, seed=3)
    hard = make_problem(dim=6, batch=1, contraction=0.9, seed=4)
    W = torch.stack([easy.f.W.detach(), hard.f.W.detach()])
    x = torch.cat([easy.x, hard.x])

    def g(z):
        return torch.tanh(torch.einsum("bij,bj->bi", W, z) + x) - z

    def jacobian(z):
        s = 1 - torch.tanh(torch.einsum("bij,bj->bi", W, z) + x) ** 2
        return s[:, :, None] * W - torch.eye(6, dtype=DT)

    return g, jacobian, x


def dense_adjoint_broyden(zs, gs, jacobian, h0=-1.0):
    """Dense adjoint Broyden (type C) inverses ``H_0, H_1, ...`` of one sample.

    ``H_{n+1} = H_n + a (σ - b)ᵀ / (bᵀσ)`` with ``σ = g(z_{n+1})``, ``a = H_n σ``,
    ``b = H_nᵀ J(z_{n+1})ᵀ σ`` (Sherman-Morrison form of ``σᵀ B_{n+1} = σᵀ J(z_{n+1})``).
    """
    D = zs[0].shape[-1]
    Hs = [h0 * torch.eye(D, dtype=DT)]
    for n in range(len(zs) - 1):
        H, sigma = Hs[-1], gs[n + 1]
        a = H @ sigma
        b = H.T @ (jacobian(zs[n + 1]).T @ sigma)
        Hs.append(H + torch.outer(a, sigma - b) / (b @ sigma))
    return Hs


@pytest.mark.parametrize("inverse_at", ["lowest", "before_lowest"])
def test_adjoint_broyden_returns_the_estimate_of_the_lowest_iterate(inverse_at):
    """``lowest_step`` is the index ``k`` of the returned iterate and ``inverse`` is ``H_k`` (or
    ``H_{k-1}``) of that iterate: checked against a dense replay of the recorded iterates.

    Sample 0 converges (tol) several iterations before sample 1: its returned estimate is not
    the last one of the solve, so the step index of every stored term matters.
    """
    g, jacobian, x = _two_speed_problem()
    rec = Recorder(g)
    res = AdjointBroyden(max_iter=40, tol=1e-9, memory=40, inverse_at=inverse_at)(
        rec, torch.zeros_like(x)
    )
    assert bool(res.stats.converged.all())
    zs, gs = torch.stack(rec.zs), torch.stack(rec.gs)  # every evaluation is an iterate
    trace = torch.linalg.vector_norm(gs, dim=-1)
    torch.testing.assert_close(res.stats.residual_trace, trace, rtol=0, atol=0)
    k = res.stats.lowest_step
    # the returned iterate is the first one under the tolerance (a converged sample is frozen)
    first_below = (trace <= 1e-9).to(torch.int8).argmax(dim=0)
    torch.testing.assert_close(k, first_below)
    torch.testing.assert_close(res.stats.residual, trace[k, torch.arange(2)])
    torch.testing.assert_close(res.value, zs[k, torch.arange(2)], rtol=0, atol=0)
    assert int(k[0]) + 2 < int(k[1]) == res.stats.nstep
    Hd = res.inverse.dense()
    for b in range(2):
        kb = int(k[b])
        jac_b = lambda z, b=b: jacobian(z.expand(2, -1))[b]  # noqa: E731 (row b depends on z_b)
        Hs = dense_adjoint_broyden(zs[: kb + 1, b], gs[: kb + 1, b], jac_b)
        ref = Hs[kb] if inverse_at == "lowest" else Hs[kb - 1]
        torch.testing.assert_close(Hd[b], ref, rtol=1e-7, atol=1e-10)
        # and every step of the sample was the quasi-Newton step z_{n+1} = z_n - H_n g(z_n)
        for n in range(kb):
            torch.testing.assert_close(
                zs[n + 1, b], zs[n, b] - Hs[n] @ gs[n, b], rtol=1e-9, atol=1e-12
            )


# ------------------------------------------------------------- AdjointBroyden: noise floor


def _linear_scalar():
    """``g(z) = -2 z + 1`` (``f(z) = g + z = 1 - z``), root 1/2, ``J = -2``.

    From ``z0 = 0`` with ``H0 = -1``: ``z1 = z0 + g(z0) = 1``, where ``g = -1`` and ``f = 0``.
    An adjoint update along ``σ = g(z1)`` makes ``H = J^{-1} = -1/2`` exactly, and the next step
    lands on the root. Without it, ``H0`` sends the iterate back to ``z2 = 0`` (a 2-cycle).
    """
    return lambda z: -2.0 * z + 1.0


def test_noise_floor_rule_at_its_boundary_and_the_skip_counter():
    """Update skipped iff ``‖g(z_{n+1})‖ <= noise_floor·ε·(‖f(z_{n+1})‖ + ‖z_{n+1}‖)``.

    ``noise_floor = 2**52`` makes ``noise_floor·ε = 1`` exactly: at ``z1 = 1`` the test reads
    ``1 <= 1·(0 + 1)``, true on the boundary, so the update is skipped; so is every later one
    (at ``z = 0``: ``1 <= 1·(1 + 0)``) and the iterate cycles 0, 1, 0, 1: every one of the 4
    iterations counts a skipped update, and none improves on ``z0`` (equal residuals).
    """
    res = AdjointBroyden(max_iter=4, tol=0.0, noise_floor=2.0**52)(
        _linear_scalar(), torch.zeros(1, 1, dtype=DT)
    )
    assert res.stats.nstep == 4
    assert res.stats.extra["noise_skipped_updates"] == 4.0
    torch.testing.assert_close(
        res.stats.residual_trace[:, 0], torch.ones(5, dtype=DT), rtol=0, atol=0
    )
    assert int(res.stats.lowest_step[0]) == 0 and float(res.value[0, 0]) == 0.0


def test_noise_floor_uses_the_norm_of_f_and_counts_an_exact_root():
    """``noise_floor·ε = 1/2``: at ``z1 = 1``, ``‖g‖ = 1 > (‖f‖ + ‖z‖)/2 = 1/2``: the update is
    made (with ``‖g - z‖`` in place of ``‖f‖ = ‖g + z‖`` it would read ``1 <= 3/2`` and be
    skipped), and ``z2 = 1/2`` is the root: ``g = 0`` is below any floor, its update is skipped
    and counted. Two iterations, one skipped update, the estimate ``J^{-1} = -1/2``."""
    res = AdjointBroyden(max_iter=10, tol=0.0, noise_floor=2.0**51, inverse_at="last")(
        _linear_scalar(), torch.zeros(1, 1, dtype=DT)
    )
    assert res.stats.nstep == 2 and res.stats.n_evals == 3
    assert res.stats.extra["noise_skipped_updates"] == 1.0
    torch.testing.assert_close(res.value, torch.tensor([[0.5]], dtype=DT), rtol=0, atol=0)
    torch.testing.assert_close(res.inverse.dense(), torch.tensor([[[-0.5]]], dtype=DT))


# ---------------------------------------------------- AdjointBroyden: counters, calls


def test_zero_iterations_and_a_converged_start_take_no_step():
    prob = make_problem(dim=6, batch=1)
    none = AdjointBroyden(max_iter=0)(prob.g, torch.zeros_like(prob.x))
    assert none.stats.nstep == 0 and none.stats.n_evals == 1
    start = AdjointBroyden(max_iter=10, tol=1e-8)(prob.g, prob.root())
    assert start.stats.nstep == 0 and start.stats.n_evals == 1
    assert start.stats.extra["vjps"] == 0.0


def test_unbatched_call_hands_g_and_the_stats_unbatched_shapes():
    prob = make_problem(dim=6, batch=1)

    def g1(z):
        assert z.shape == (6,), z.shape  # g sees the caller's (D,) state, never (1, D)
        return prob.g(z.unsqueeze(0)).squeeze(0)

    res = AdjointBroyden(max_iter=6, tol=0.0, memory=10)(g1, torch.zeros(6, dtype=DT))
    ref = AdjointBroyden(max_iter=6, tol=0.0, memory=10)(prob.g, torch.zeros_like(prob.x))
    assert res.value.shape == (6,)
    assert res.stats.residual.shape == () and res.stats.converged.shape == ()
    assert res.stats.lowest_step.shape == () and res.stats.residual_trace.shape == (7,)
    torch.testing.assert_close(res.stats.residual_trace, ref.stats.residual_trace[:, 0])


def test_opa_update_depends_only_on_the_direction_of_the_outer_gradient():
    """The OPA secant condition ``vᵀ B_+ = vᵀ J`` fixes only the direction of ``v = Hᵀ∇L``: an
    outer gradient scaled by ``1e150`` (or ``1e-150``) must give the same solve and estimate.
    (Its square overflows / underflows: the direction has to be normalised, not squared.)"""
    prob = make_problem(dim=6, batch=2, contraction=0.6, seed=2)
    target = torch.randn(prob.x.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    solver = AdjointBroyden(max_iter=5, tol=0.0, memory=10, opa_every=2, inverse_at="last")
    ref = solver(prob.g, torch.zeros_like(prob.x), outer_grad=lambda z: z - target)
    assert ref.stats.extra["opa_updates"] == 4.0
    for scale in (1e150, 1e-150):
        res = solver(
            prob.g, torch.zeros_like(prob.x), outer_grad=lambda z, s=scale: s * (z - target)
        )
        assert res.stats.extra["opa_updates"] == 4.0
        torch.testing.assert_close(res.value, ref.value, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(res.inverse.dense(), ref.inverse.dense(), rtol=1e-8, atol=1e-11)
