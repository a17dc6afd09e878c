"""Fixed-point iteration and Anderson acceleration for batched root problems ``g(z) = 0``.

Both iterate the map ``F(z) = z + step·g(z)``; for a DEQ residual ``g(z) = f(z) - z`` and
``step = 1`` this is the forward iteration ``z ← f(z)``. They hand over no inverse estimate
(``SolverResult.inverse is None``): use Jacobian-Free or an iterative backward with them.

Per-sample bookkeeping (tolerances, lowest-residual iterate, convergence mask, residual trace) is
done by :class:`shine.solvers._tracking.BestIterateTracker`; a sample that has converged is
frozen (its iterate no longer changes) while the others continue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from shine.solvers._tracking import BestIterateTracker
from shine.solvers.base import ResidualFn, SolverResult, as_batch
from shine.validation import check_fields

logger = logging.getLogger(__name__)


def _batched_residual(g: ResidualFn, unbatched: bool) -> ResidualFn:
    """Wrap ``g`` so that it maps ``(B, D) -> (B, D)`` (squeezing for an unbatched ``g``)."""
    if unbatched:
        return lambda z: g(z.squeeze(0)).detach().reshape(z.shape)
    return lambda z: g(z).detach()


@dataclass(frozen=True)
class FixedPoint:
    """Damped fixed-point iteration ``z_{n+1} = z_n + step·g(z_n)`` on a batch.

    Stops when every sample has ``‖g(z_n)‖₂ <= max(tol, rel_tol·‖g(z_0)‖₂)`` at some iterate, or
    after ``max_iter`` iterations; returns the lowest-residual iterate of each sample.

    Attributes:
        max_iter: maximum number of iterations (evaluations of ``g`` after the first).
        tol: absolute tolerance on the per-sample residual norm.
        rel_tol: tolerance relative to each sample's initial residual norm.
        step: step size (damping); 1 gives ``z ← f(z)`` for ``g = f - id``.
    """

    max_iter: int = 50
    tol: float = 1e-6
    rel_tol: float = 0.0
    step: float = 1.0

    def __post_init__(self) -> None:
        """Validate the parameters.

        Raises:
            ValueError: on negative iteration counts or tolerances.
        """
        check_fields(self, minimum={"max_iter": 0, "tol": 0.0, "rel_tol": 0.0})

    def __call__(self, g: ResidualFn, z0: Tensor) -> SolverResult:
        """Solve ``g(z) = 0`` from ``z0``.

        Args:
            g: residual ``(B, D) -> (B, D)`` (or ``(D,) -> (D,)`` for an unbatched ``z0``).
            z0: initial iterate, ``(B, D)`` or ``(D,)``.

        Returns:
            :class:`~shine.solvers.base.SolverResult` with the lowest-residual iterate per
            sample (shape of ``z0``), ``inverse = None`` and per-sample statistics
            (``residual_trace`` ``(nstep + 1, B)``, ``lowest_step`` ``(B,)``).
        """
        z, unbatched = as_batch(z0.detach())
        gfun = _batched_residual(g, unbatched)
        z = z.clone()
        gz = gfun(z)
        tracker = BestIterateTracker(z, gz, tol=self.tol, rel_tol=self.rel_tol)
        nstep = 0
        while nstep < self.max_iter and not bool(tracker.converged.all()):
            active = ~tracker.converged
            z = torch.where(active[:, None], z + self.step * gz, z)
            gz = gfun(z)
            nstep += 1
            tracker.update(z, gz, step=nstep)
        stats = tracker.stats(nstep=nstep, n_evals=nstep + 1, unbatched=unbatched)
        value = tracker.best_z.squeeze(0) if unbatched else tracker.best_z
        return SolverResult(value=value, stats=stats)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II, Walker & Ni 2011) of ``F(z) = z + g(z)``, per sample.

    With the last ``m_n = min(n + 1, memory)`` iterates ``z_i`` and residuals ``g_i = g(z_i)``
    of a sample, the mixing weights solve the regularised least-squares problem
    ``min_α ‖Σ α_i g_i‖² + λ_n ‖α‖²`` s.t. ``Σ α_i = 1``, i.e. ``α ∝ (G Gᵀ + λ_n I)^{-1} 1``
    (batched :func:`torch.linalg.solve_ex`), and ``z_{n+1} = Σ α_i (z_i + β g_i)``. The
    regularisation is relative to the scale of the residuals, ``λ_n = lam · tr(G Gᵀ)/m_n``, so
    that it does not dominate near convergence; the first step is ``z_1 = z_0 + β g_0``.

    Stopping and returned iterate as in :class:`FixedPoint`.

    Attributes:
        max_iter: maximum number of iterations.
        tol: absolute tolerance on the per-sample residual norm.
        rel_tol: tolerance relative to each sample's initial residual norm.
        memory: number of past iterates mixed (``m``).
        beta: mixing (damping) parameter ``β``.
        lam: relative Tikhonov regularisation of the least-squares system.
    """

    max_iter: int = 50
    tol: float = 1e-6
    rel_tol: float = 0.0
    memory: int = 5
    beta: float = 1.0
    lam: float = 1e-4

    def __post_init__(self) -> None:
        """Validate the parameters.

        Raises:
            ValueError: on invalid parameters.
        """
        check_fields(
            self, minimum={"max_iter": 0, "tol": 0.0, "rel_tol": 0.0, "memory": 1, "lam": 0.0}
        )

    def __call__(self, g: ResidualFn, z0: Tensor) -> SolverResult:
        """Solve ``g(z) = 0`` from ``z0``.

        Args:
            g: residual ``(B, D) -> (B, D)`` (or ``(D,) -> (D,)`` for an unbatched ``z0``).
            z0: initial iterate, ``(B, D)`` or ``(D,)``.

        Returns:
            :class:`~shine.solvers.base.SolverResult` as for :class:`FixedPoint`, with
            ``stats.extra["n_fallback_steps"]``: sample-steps where the least-squares solve was
            not finite (or singular, possible with ``lam = 0``) and a plain step was taken
            instead.
        """
        z, unbatched = as_batch(z0.detach())
        gfun = _batched_residual(g, unbatched)
        bsz, dim = z.shape
        m = self.memory
        xs = z.new_zeros(bsz, m, dim)
        gs = z.new_zeros(bsz, m, dim)
        z = z.clone()
        gz = gfun(z)
        xs[:, 0], gs[:, 0] = z, gz
        tracker = BestIterateTracker(z, gz, tol=self.tol, rel_tol=self.rel_tol)
        eye = torch.eye(m, dtype=z.dtype, device=z.device)
        n_fallback = 0
        nstep = 0
        while nstep < self.max_iter and not bool(tracker.converged.all()):
            active = ~tracker.converged
            n_hist = min(nstep + 1, m)
            if n_hist == 1:
                z_new = z + self.beta * gz
            else:
                gh, xh = gs[:, :n_hist], xs[:, :n_hist]
                gram = gh @ gh.mT  # (B, n, n)
                # (G Gᵀ + λ_n I) α ∝ 1 in the scale-free form (G Gᵀ/s + lam I) α ∝ 1,
                # s = tr(G Gᵀ)/m_n: the same α after normalisation, with no absolute floor on
                # the regularisation (tiny only avoids 0/0 for an all-zero history)
                scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(z.dtype).tiny)
                gram = gram / scale[:, None, None] + self.lam * eye[:n_hist, :n_hist]
                ones = z.new_ones(bsz, n_hist, 1)
                # solve_ex: a singular system (lam = 0) marks its sample bad instead of raising
                alpha, info = torch.linalg.solve_ex(gram, ones)
                alpha = alpha.squeeze(-1)
                alpha = alpha / alpha.sum(-1, keepdim=True)
                bad = ~torch.isfinite(alpha).all(-1) | (info != 0)
                if bool(bad.any()):
                    newest = nstep % m
                    alpha[bad] = torch.nn.functional.one_hot(
                        torch.tensor(newest, device=z.device), n_hist
                    ).to(alpha)
                    n_fallback += int((bad & active).sum())
                z_new = (alpha[:, None, :] @ (xh + self.beta * gh)).squeeze(1)
            z = torch.where(active[:, None], z_new, z)
            gz = gfun(z)
            nstep += 1
            slot = nstep % m
            xs[:, slot], gs[:, slot] = z, gz
            tracker.update(z, gz, step=nstep)
        stats = tracker.stats(nstep=nstep, n_evals=nstep + 1, unbatched=unbatched)
        stats.extra["n_fallback_steps"] = float(n_fallback)
        value = tracker.best_z.squeeze(0) if unbatched else tracker.best_z
        return SolverResult(value=value, stats=stats)
