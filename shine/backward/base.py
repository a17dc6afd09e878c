"""The backward-strategy interface: solve the adjoint system of the implicit function theorem.

For an inner root problem ``g_θ(z*) = 0`` and an outer loss ``L(z*)``, the implicit function
theorem (paper Theorem 1, eq. 3) gives

    dL/dθ = -∇L(z*)ᵀ J_g(z*)^{-1} ∂g/∂θ  =  uᵀ ∂g/∂θ,   where   uᵀ J_g(z*) = rhsᵀ,  rhs = -∇L(z*).

A backward strategy returns (an approximation of) ``u`` given

* ``vjp(u) = J_g(z*)ᵀ u`` (a vector-Jacobian product closure, shape of ``rhs``),
* the right-hand side ``rhs``: ``(B, D)`` (one system per sample) or ``(D,)``,
* the forward :class:`~shine.solvers.base.SolverResult` (and with it the quasi-Newton inverse
  estimate ``H ≈ J_g(z*)^{-1}`` that SHINE reuses).

For a DEQ ``g(z) = f(z) - z`` and ``rhs = -∂L/∂z*`` this is ``u = ∂L/∂z* (I - J_f)^{-1}``; for
bi-level problems ``g = ∇_z h`` and ``J_g`` is the inner Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from shine.solvers.base import ScaledIdentity, SolverResult, as_batch, batch_norm
from shine.solvers.low_rank import LowRankInverse

#: ``u -> J_g(z*)ᵀ u`` with ``u`` shaped like the right-hand side.
VJPFn = Callable[[Tensor], Tensor]


@dataclass
class AdjointStats:
    """Statistics of one backward solve.

    Attributes:
        n_vjps: vector-Jacobian products evaluated.
        nstep: iterations of an iterative solve (0 for direct strategies).
        residual: relative residual ``‖J_gᵀu - rhs‖ / ‖rhs‖`` per sample ``(B,)`` when it was
            computed by an iterative solve, else ``None``.
        fallback_mask: ``(B,)`` bool, samples that used the fallback strategy (``Fallback``).
        extra: other scalars (cosine to a reference solution, ...).
    """

    n_vjps: int = 0
    nstep: int = 0
    residual: Tensor | None = None
    fallback_mask: Tensor | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Scalars for logging (``nstep``, ``n_vjps``, residual, fallback fraction, extras)."""
        out = {f"{prefix}nstep": float(self.nstep), f"{prefix}n_vjps": float(self.n_vjps)}
        if self.residual is not None:
            out[f"{prefix}residual_max"] = float(self.residual.detach().max())
        if self.fallback_mask is not None:
            out[f"{prefix}fallback_frac"] = float(self.fallback_mask.double().mean())
        out.update({f"{prefix}{k}": float(v) for k, v in self.extra.items()})
        return out


@dataclass
class AdjointResult:
    """The solution ``u`` of ``uᵀ J_g = rhsᵀ`` (shape of ``rhs``) and its statistics."""

    value: Tensor
    stats: AdjointStats


class BackwardStrategy(Protocol):
    """Computes ``u ≈ J_g(z*)^{-T} rhs``; see the module docstring."""

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Solve the adjoint system.

        Args:
            vjp: ``u -> J_g(z*)ᵀ u``.
            rhs: right-hand side, ``(B, D)`` or ``(D,)``.
            fwd: result of the forward solve (its ``inverse`` is the quasi-Newton estimate).
            u0: optional warm start for iterative strategies (e.g. the previous outer
                iteration's solution in HOAG); ignored by direct strategies.
        """
        ...


def initial_scale(fwd: SolverResult) -> float:
    """Scale ``c`` of the initial quasi-Newton matrix ``H0 = c·I`` of the forward solver.

    ``h0`` of a Broyden-type estimate (``-1`` for DEQ residuals), ``1`` for an L-BFGS
    inverse-Hessian estimate (the identity of the paper's Jacobian-Free bi-level baseline), and
    ``-1`` (the DEQ convention ``J_g ≈ -I``) when the forward solver has no estimate.
    """
    inverse = fwd.inverse
    if inverse is None:
        return -1.0
    if isinstance(inverse, ScaledIdentity):
        return float(inverse.scale)
    if isinstance(inverse, LowRankInverse):  # Broyden, adjoint Broyden
        return float(inverse.h0)
    return 1.0  # an L-BFGS inverse-Hessian estimate (the Jacobian-Free baseline is I)


def cosine_and_ratio(u: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample cosine similarity and norm ratio ``‖u‖ / ‖ref‖`` (``(B,)`` each)."""
    ub, _ = as_batch(u)
    rb, _ = as_batch(ref)
    nu, nr = batch_norm(ub), batch_norm(rb)
    tiny = torch.finfo(ub.dtype).tiny
    cos = (ub * rb).sum(-1) / (nu * nr).clamp_min(tiny)
    return cos, nu / nr.clamp_min(tiny)
