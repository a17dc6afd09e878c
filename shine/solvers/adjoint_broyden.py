"""Adjoint Broyden method (Schlenkrich, Griewank & Walther 2010) with Outer-Problem Awareness.

Solves ``g(z) = 0`` on a batch ``z: (B, D)``. The adjoint update of type "C" uses the residual
``σ = g(z_{n+1})`` as direction and one vector-Jacobian product ``J_g(z_{n+1})ᵀσ`` per step:

    B_{n+1} = B_n + σ σᵀ (J_g(z_{n+1}) - B_n) / (σᵀσ),      i.e.  σᵀ B_{n+1} = σᵀ J_g(z_{n+1}),

kept in inverse form ``H = B^{-1} = h0·I + U Vᵀ`` by Sherman–Morrison:

    a = H σ,   b = Hᵀ J_gᵀ σ,   H_{n+1} = H_n + a (σ - b)ᵀ / (bᵀ σ).

OPA (paper §2.3, eq. 7-8): every ``M`` iterations an extra update is made at the current iterate
along ``v_nᵀ = ∇L(z_n)ᵀ H_n`` (``v_n = H_nᵀ ∇L(z_n)``), so that ``v_nᵀ B_{n+1} = v_nᵀ J_g(z_n)``.
Theorem 4 of the paper: the SHINE direction ``∇L(z_n)ᵀ H_n`` then converges to
``∇L(z*)ᵀ J_g(z*)^{-1}``. The authors' released code used ``H_n ∇L(z_n)`` instead (without the
transpose); ``opa_orientation="as_is"`` reproduces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shine.solvers._tracking import BestIterateTracker
from shine.solvers.base import ResidualFn, SolverResult, as_batch, batch_norm
from shine.solvers.broyden import InverseAt, _safe_division, check_residual, select_estimate
from shine.solvers.low_rank import LowRankInverse, LowRankMemory, MemoryPolicy
from shine.validation import check_fields

logger = logging.getLogger(__name__)


def adjoint_update(
    H: LowRankInverse, sigma: Tensor, jac_t_sigma: Tensor, ok: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-one factors of the adjoint Broyden inverse update along ``σ``.

    Args:
        H: current estimate ``H ≈ J^{-1}``.
        sigma: update direction ``σ``, ``(B, D)``.
        jac_t_sigma: ``J(z)ᵀ σ``, ``(B, D)`` (one VJP).
        ok: ``(B,)`` samples allowed to update.

    Returns:
        ``(u, v, done)`` with ``H + u vᵀ`` satisfying ``(H + u vᵀ)ᵀ Jᵀσ = σ``; rows of samples
        that could not be updated (tiny or non-finite ``bᵀσ``) are zero, ``done`` marks the others.
    """
    a = H.matvec(sigma)
    b = H.rmatvec(jac_t_sigma)
    v, done = _safe_division(sigma - b, (b * sigma).sum(-1), ok)
    u = torch.where(done[:, None], a, torch.zeros_like(a))
    return u, v, done


@dataclass(frozen=True)
class AdjointBroyden:
    """Adjoint Broyden root solver (type C) with optional OPA extra updates.

    Args:
        max_iter: maximal number of iterations.
        tol: absolute tolerance on the per-sample residual norm.
        rel_tol: relative tolerance w.r.t. the initial residual (0 disables it).
        memory: maximal number of rank-one terms per sample (OPA terms share the memory).
        h0: initial matrix ``H0 = h0·I`` (``-1`` for DEQ residuals ``f(z) - z``).
        opa_every: frequency ``M`` of the OPA extra updates (at iterations ``n = M, 2M, ...``);
            ``None`` disables OPA.
        opa_orientation: ``"transpose"``: ``v = Hᵀ ∇L`` (eq. 8); ``"as_is"``: ``v = H ∇L``
            (``H`` untransposed, as the authors' released code).
        memory_policy: policy once the memory is full (see ``LowRankMemory``).
        inverse_at: which estimate the result carries (see ``select_estimate``).
        noise_floor: a regular update along ``σ = g(z_{n+1})`` is skipped for the samples where
            ``‖σ‖ <= noise_floor·ε·(‖f(z_{n+1})‖ + ‖z_{n+1}‖)`` (``f = g + z``, ``ε`` the dtype's
            machine epsilon): such a residual is rounding noise, and the update, normalised by
            ``bᵀσ``, would be a full rank-one change of ``H`` along it, undoing what OPA
            gained (as L-BFGS skips pairs of non-positive curvature). ``0`` updates always.

    Call ``AdjointBroyden(...)(g, z0, outer_grad=None)``: ``g`` must be differentiable with
    autograd (every evaluation keeps its graph until the VJP of the step is taken, which is the
    extra memory and compute the paper mentions); ``outer_grad(z) -> ∇L(z)`` (same shape as
    ``z``) is required when ``opa_every`` is set. Gradients are computed with respect to ``z``
    only: parameters of ``g`` receive none.
    """

    max_iter: int = 30
    tol: float = 1e-6
    rel_tol: float = 0.0
    memory: int = 30
    h0: float = -1.0
    opa_every: int | None = None
    opa_orientation: Literal["transpose", "as_is"] = "transpose"
    memory_policy: MemoryPolicy = "fifo"
    inverse_at: InverseAt = "lowest"
    noise_floor: float = 10.0

    def __post_init__(self) -> None:
        """Validate the fields (types, ranges).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field out of range (the field and its range are named).
        """
        check_fields(
            self,
            minimum={
                "max_iter": 0,
                "tol": 0.0,
                "rel_tol": 0.0,
                "memory": 1,
                "opa_every": 1,
                "noise_floor": 0.0,
            },
        )

    def __call__(
        self,
        g: ResidualFn,
        z0: Tensor,
        outer_grad: Callable[[Tensor], Tensor] | None = None,
    ) -> SolverResult:
        """Solve ``g(z) = 0`` from ``z0`` (``(B, D)`` or ``(D,)``); see the class docstring."""
        if self.opa_every is not None and outer_grad is None:
            raise ValueError(
                "AdjointBroyden with opa_every set needs the outer gradient: call "
                "solver(g, z0, outer_grad=lambda z: dL/dz), or set opa_every=None"
            )
        z, unbatched = as_batch(z0.detach())
        gfun = (lambda x: g(x.squeeze(0)).unsqueeze(0)) if unbatched else g
        ogfun = outer_grad
        if unbatched and outer_grad is not None:
            ogfun = lambda x: outer_grad(x.squeeze(0)).unsqueeze(0)  # noqa: E731

        def evaluate(point: Tensor) -> tuple[Tensor, Tensor]:
            leaf = point.detach().requires_grad_(True)
            with torch.enable_grad():
                out = check_residual(gfun(leaf), leaf)
            return leaf, out

        leaf, g_graph = evaluate(z)
        gz = g_graph.detach()
        n_evals, n_vjps, n_opa, n_rejected, nstep, n_noise = 1, 0, 0, 0, 0, 0
        tracker = BestIterateTracker(z, gz, tol=self.tol, rel_tol=self.rel_tol)
        mem = LowRankMemory(z.shape[0], z.shape[1], self.memory, self.h0, self.memory_policy, z)
        Hg = self.h0 * gz
        keep_graph = self.opa_every is not None

        def vjp(vec: Tensor, retain: bool) -> Tensor:
            if not g_graph.requires_grad:  # g does not depend on z: J = 0
                return torch.zeros_like(vec)
            return torch.autograd.grad(g_graph, leaf, vec, retain_graph=retain)[0]

        for n in range(self.max_iter):
            active = ~tracker.converged
            if not bool(active.any()):
                break
            if self.opa_every is not None and n > 0 and n % self.opa_every == 0:
                # extra update at z_n along v_n = H_nᵀ ∇L(z_n) (paper eq. 7-8)
                w = ogfun(z).detach()
                mem.make_room()
                H = mem.estimate()
                sigma = H.rmatvec(w) if self.opa_orientation == "transpose" else H.matvec(w)
                sigma = sigma / batch_norm(sigma).clamp_min(torch.finfo(z.dtype).tiny)[:, None]
                # the graph at z_n is not used again (the step below evaluates z_{n+1}): freed
                u, v, done = adjoint_update(H, sigma, vjp(sigma, retain=False), active)
                n_vjps += 1
                n_opa += int(done.sum())
                mem.push(u, v, step=n, mask=done)
                Hg = mem.estimate().matvec(gz)
            p = torch.where(active[:, None], -Hg, torch.zeros_like(Hg))
            z_new = z + p
            leaf, g_graph = evaluate(z_new)
            g_new = g_graph.detach()
            n_evals += 1
            nstep = n + 1
            bad = active & ~torch.isfinite(g_new).all(dim=-1)
            if bool(bad.any()):
                n_rejected += int(bad.sum())
                mem.reset_samples(bad)
                z_new = torch.where(bad[:, None], z, z_new)
                g_new = torch.where(bad[:, None], gz, g_new)
            # residuals at rounding level carry no information about J: no update along them
            scale = batch_norm(g_new + z_new) + batch_norm(z_new)
            noise = batch_norm(g_new) <= self.noise_floor * torch.finfo(z.dtype).eps * scale
            n_noise += int((active & ~bad & noise).sum())
            update = active & ~bad & ~noise
            sigma = torch.where(update[:, None], g_new, torch.zeros_like(g_new))
            jts = vjp(sigma, retain=keep_graph)
            n_vjps += 1
            mem.make_room()
            H = mem.estimate()
            u, v, done = adjoint_update(H, sigma, jts, update)
            if mem.frozen:
                Hg = H.matvec(g_new)
            elif mem.push(u, v, step=n + 1, mask=done):
                Hg = mem.estimate().matvec(g_new)
            else:
                Hg = H.matvec(g_new) + u * (v * g_new).sum(-1, keepdim=True)
            z, gz = z_new, g_new
            tracker.update(z, gz, step=n + 1)
        inverse = select_estimate(mem, tracker, self.inverse_at)
        stats = tracker.stats(nstep=nstep, n_evals=n_evals, unbatched=unbatched)
        stats.extra.update(
            {
                "vjps": float(n_vjps),
                "opa_updates": float(n_opa),
                "rejected_steps": float(n_rejected),
                "noise_skipped_updates": float(n_noise),
            }
        )
        value = tracker.best_z.squeeze(0) if unbatched else tracker.best_z
        logger.debug("AdjointBroyden: %d steps, %d OPA updates", nstep, n_opa)
        return SolverResult(value=value, stats=stats, inverse=inverse)


__all__ = ["AdjointBroyden", "adjoint_update"]
