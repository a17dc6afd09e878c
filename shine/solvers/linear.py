"""Batched conjugate gradient for symmetric positive-definite linear systems.

Solves ``A x = b`` for every sample of a batch, ``A`` given only through products ``A v``
(e.g. Hessian-vector products of the inner problem in HOAG, or ``J_gᵀ`` products in a backward
pass when ``J_g`` is symmetric positive definite).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shine.solvers.base import SolverResult, SolverStats, as_batch, batch_norm
from shine.validation import check_fields

logger = logging.getLogger(__name__)

#: ``v -> A v`` with ``v`` of the shape of ``b`` (``(B, D)`` or ``(D,)``).
MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient (Hestenes & Stiefel) on a batch of SPD systems ``A x = b``.

    Every sample ``b_i`` (a row of ``b``) is an independent system with its own step sizes; a
    sample stops when ``‖b_i - A x_i‖₂ <= tol·‖b_i‖₂`` (recursively updated residual), when it
    meets non-positive curvature ``pᵀA p <= 0`` (``A`` not positive definite along ``p``; the
    sample keeps its current iterate and is counted in ``stats.extra``), or after ``max_iter``
    iterations. Samples with ``b_i = 0`` return ``x_i = 0``.

    Attributes:
        max_iter: maximum number of iterations (products with ``A``).
        tol: relative tolerance on the residual norm, per sample.
    """

    max_iter: int = 100
    tol: float = 1e-6

    def __post_init__(self) -> None:
        """Validate the parameters.

        Raises:
            ValueError: on a negative ``max_iter`` or ``tol``.
        """
        check_fields(self, minimum={"max_iter": 0, "tol": 0.0})

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolverResult:
        """Solve ``A x = b``.

        Args:
            matvec: ``v -> A v``; receives tensors of the shape of ``b`` (``(B, D)``, or
                ``(D,)`` for an unbatched ``b``), ``A`` symmetric positive definite per sample.
            b: right-hand sides, ``(B, D)`` or ``(D,)``.
            x0: initial guess (warm start), shape of ``b``; zero when ``None``.

        Returns:
            :class:`~shine.solvers.base.SolverResult` with ``value = x`` (shape of ``b``),
            ``inverse = None`` and ``stats``: ``nstep`` iterations, ``n_evals`` products with
            ``A`` (one more than ``nstep`` with a warm start), ``residual_trace``
            ``(nstep + 1, B)`` of ``‖b - A x_n‖`` per sample, ``residual`` ``(B,)`` (absolute),
            ``converged`` ``(B,)``, ``lowest_step`` ``(B,)`` = the iteration at which each
            sample stopped, ``extra["n_nonpositive_curvature"]`` = number of samples stopped by
            non-positive curvature.
        """
        bb, unbatched = as_batch(b.detach())

        def apply(v: Tensor) -> Tensor:
            out = matvec(v.squeeze(0) if unbatched else v)
            return out.detach().reshape(v.shape)

        b_norm = batch_norm(bb)
        threshold = self.tol * b_norm
        zero_rhs = b_norm == 0
        n_evals = 0
        if x0 is None:
            x = torch.zeros_like(bb)
            r = bb.clone()
        else:
            x = as_batch(x0.detach())[0].to(bb).clone()
            x[zero_rhs] = 0.0
            r = bb - apply(x)
            n_evals += 1
        r[zero_rhs] = 0.0
        rs = (r * r).sum(-1)
        res = rs.sqrt()
        trace = [res]
        converged = res <= threshold
        nonpos = torch.zeros_like(converged)
        active = ~converged
        stop_step = torch.zeros(bb.shape[0], dtype=torch.long, device=bb.device)
        p = r.clone()
        nstep = 0
        while nstep < self.max_iter and bool(active.any()):
            ap = apply(p)
            n_evals += 1
            nstep += 1
            pap = (p * ap).sum(-1)
            bad = active & ~(pap > 0)  # also catches NaN
            if bool(bad.any()):
                logger.debug("CG: non-positive curvature for %d sample(s)", int(bad.sum()))
                nonpos |= bad
                active = active & ~bad
            alpha = torch.where(active, rs / torch.where(active, pap, 1.0), 0.0)
            x.addcmul_(alpha[:, None], p)
            r.addcmul_(alpha[:, None], ap, value=-1.0)
            rs_new = (r * r).sum(-1)
            beta = torch.where(active & (rs > 0), rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
            p = torch.addcmul(r, beta[:, None], p)
            rs = rs_new
            res = rs.sqrt()
            trace.append(res)
            newly = active & (res <= threshold)
            converged |= newly
            stop_step = torch.where(active, torch.full_like(stop_step, nstep), stop_step)
            active = active & ~newly
        stats = SolverStats(
            nstep=nstep,
            n_evals=n_evals,
            residual_trace=torch.stack(trace),
            residual=res,
            converged=converged,
            lowest_step=stop_step,
            extra={"n_nonpositive_curvature": float(nonpos.sum())},
        )
        if unbatched:
            stats.residual_trace = stats.residual_trace[:, 0]
            stats.residual = res[0]
            stats.converged = converged[0]
            stats.lowest_step = stop_step[0]
            x = x.squeeze(0)
        return SolverResult(value=x, stats=stats)
