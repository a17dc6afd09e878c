"""Per-sample bookkeeping shared by the batched root solvers.

Tracks, for every sample of a batch ``(B, D)``, the residual norm of each iterate, the
lowest-residual iterate seen so far and whether the sample has met its tolerance
``‖g(z)‖ <= max(tol, rel_tol·‖g(z0)‖)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shine.solvers.base import SolverStats, batch_norm


class BestIterateTracker:
    """Lowest-residual iterate and convergence mask of each sample.

    Args:
        z0: initial iterate, ``(B, D)``.
        g0: its residual ``g(z0)``, ``(B, D)``.
        tol: absolute tolerance on ``‖g‖₂`` per sample (float or ``(B,)`` tensor).
        rel_tol: tolerance relative to ``‖g(z0)‖`` (0 disables it).
    """

    def __init__(self, z0: Tensor, g0: Tensor, tol: float | Tensor, rel_tol: float = 0.0) -> None:
        norm0 = batch_norm(g0)
        self.threshold = torch.as_tensor(tol, dtype=norm0.dtype, device=norm0.device).expand_as(
            norm0
        )
        if rel_tol > 0:
            self.threshold = torch.maximum(self.threshold, rel_tol * norm0)
        self.best_z = z0.clone()
        self.best_residual = torch.where(torch.isfinite(norm0), norm0, torch.inf)
        self.best_step = torch.zeros(norm0.shape, dtype=torch.long, device=norm0.device)
        self.converged = norm0 <= self.threshold
        self._trace = [norm0]

    def update(self, z: Tensor, gz: Tensor, step: int, norm: Tensor | None = None) -> Tensor:
        """Record iterate ``z_step`` with residual ``gz``; return its residual norms ``(B,)``.

        Samples that already converged keep their iterate (a converged sample is frozen). ``z``
        may be kept without a copy: the caller must not modify it in place afterwards.
        ``norm`` may pass ``‖gz‖`` per sample when the caller already computed it.
        """
        norm = batch_norm(gz) if norm is None else norm
        self._trace.append(norm)
        better = (norm < self.best_residual) & ~self.converged
        n_better = int(better.sum())  # one device sync for both cases
        if n_better == better.numel():
            self.best_z = z  # no copy: the solvers never modify an iterate in place
        elif n_better:
            self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_residual = torch.where(better, norm, self.best_residual)
        self.best_step = torch.where(better, torch.full_like(self.best_step, step), self.best_step)
        self.converged = self.converged | (self.best_residual <= self.threshold)
        return norm

    @property
    def trace(self) -> Tensor:
        """Residual norms of every recorded iterate, ``(n + 1, B)``."""
        return torch.stack(self._trace)

    def stats(self, nstep: int, n_evals: int, unbatched: bool = False) -> SolverStats:
        """Build :class:`SolverStats` (squeezing the batch dimension if ``unbatched``)."""
        trace, res, conv, step = self.trace, self.best_residual, self.converged, self.best_step
        if unbatched:
            trace, res, conv, step = trace[:, 0], res[0], conv[0], step[0]
        return SolverStats(
            nstep=nstep,
            n_evals=n_evals,
            residual_trace=trace,
            residual=res,
            converged=conv,
            lowest_step=step,
        )
