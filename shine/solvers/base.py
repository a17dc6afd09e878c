"""Common types of the solvers: results, statistics and inverse estimates.

A *root solver* finds ``z*`` with ``g(z*) = 0`` for a residual ``g: R^D -> R^D`` applied to a
batch of independent problems (tensors of shape ``(B, D)``; an unbatched ``(D,)`` tensor is
treated as a batch of one). A quasi-Newton solver additionally hands over its estimate
``H ≈ J_g(z*)^{-1}`` of the inverse Jacobian as an :class:`InverseEstimate`: this is the object
SHINE (Ramzi et al., ICLR 2022, eq. 4) reuses in the backward pass.

A *minimizer* (L-BFGS) solves ``min_z r(z)``, i.e. the root problem ``g = ∇r = 0``; its inverse
estimate approximates the inverse Hessian ``(∇²r)^{-1} = J_g^{-1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: A residual function ``g``: ``(B, D) -> (B, D)``.
ResidualFn = Callable[[Tensor], Tensor]
#: An objective with gradient: ``z (D,) -> (r(z) scalar, ∇r(z) (D,))``.
ObjectiveFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@runtime_checkable
class InverseEstimate(Protocol):
    """A batched linear operator ``H ≈ J_g(z*)^{-1}``.

    ``H`` is one ``D x D`` matrix per sample, never formed. Vectors have the shape of the solver
    state: ``(B, D)`` (one vector per sample) or ``(D,)`` for unbatched solvers.
    """

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` (per sample)."""
        ...

    def rmatvec(self, v: Tensor) -> Tensor:
        """Return ``Hᵀ v``, i.e. the row vector ``vᵀ H`` written as a column (per sample)."""
        ...

    def transpose(self) -> InverseEstimate:
        """Return the operator ``Hᵀ`` (a view sharing storage, no copy)."""
        ...

    @property
    def rank(self) -> int:
        """Number of low-rank terms added to the initial matrix ``H0``."""
        ...


@dataclass(frozen=True)
class ScaledIdentity:
    """The operator ``H = scale · I``: the initial matrix of a quasi-Newton method.

    ``ScaledIdentity(-1.0)`` is the Jacobian-Free inverse of a DEQ residual ``g = f(z) - z``
    (``J_g ≈ -I``); ``ScaledIdentity(1.0)`` the one of an optimisation problem (Hessian ≈ I).
    """

    scale: float = -1.0

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``scale · v``."""
        return self.scale * v

    def rmatvec(self, v: Tensor) -> Tensor:
        """Return ``scale · v`` (the operator is symmetric)."""
        return self.scale * v

    def transpose(self) -> ScaledIdentity:
        """Return ``self`` (symmetric)."""
        return self

    @property
    def rank(self) -> int:
        """Always 0."""
        return 0


@dataclass
class SolverStats:
    """Statistics of one solve.

    Attributes:
        nstep: iterations performed (the same for the whole batch).
        n_evals: evaluations of the residual (or objective and gradient).
        residual_trace: residual norm of every iterate, ``(nstep + 1, B)`` (``(nstep + 1,)``
            for unbatched problems); entry ``n`` belongs to ``z_n``.
        residual: residual norm of the returned iterate, ``(B,)`` (or a scalar tensor).
        converged: whether the returned iterate met the tolerance, ``(B,)`` bool (or scalar).
        lowest_step: index ``n`` of the returned iterate ``z_n``, ``(B,)`` long (or scalar).
        extra: solver-specific counters (line-search evaluations, skipped updates, ...).
    """

    nstep: int
    n_evals: int
    residual_trace: Tensor
    residual: Tensor
    converged: Tensor
    lowest_step: Tensor
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Scalars for logging: steps, evaluations, max/mean residual, converged fraction."""
        res = self.residual.detach().double()
        out = {
            f"{prefix}nstep": float(self.nstep),
            f"{prefix}n_evals": float(self.n_evals),
            f"{prefix}residual_max": float(res.max()),
            f"{prefix}residual_mean": float(res.mean()),
            f"{prefix}converged_frac": float(self.converged.double().mean()),
        }
        out.update({f"{prefix}{k}": float(v) for k, v in self.extra.items()})
        return out


@dataclass
class SolverResult:
    """What a solver returns.

    Attributes:
        value: the solution ``z*``, same shape as the initial point.
        stats: :class:`SolverStats` of the solve.
        inverse: the quasi-Newton inverse estimate ``H ≈ J_g(z*)^{-1}`` at the returned iterate,
            or ``None`` for solvers without one (fixed point, Anderson, CG).
        state: solver-specific state for a warm restart (e.g. the L-BFGS memory), or ``None``.
    """

    value: Tensor
    stats: SolverStats
    inverse: InverseEstimate | None = None
    state: Any = None


class RootSolver(Protocol):
    """A solver of ``g(z) = 0`` on a batch: ``solver(g, z0) -> SolverResult``.

    Attributes:
        max_iter: the iteration budget (``0`` returns ``z0``).
    """

    max_iter: int

    def __call__(self, g: ResidualFn, z0: Tensor, **kwargs: Any) -> SolverResult:
        """Solve ``g(z) = 0`` from ``z0`` of shape ``(B, D)`` or ``(D,)``."""
        ...


def as_batch(z: Tensor) -> tuple[Tensor, bool]:
    """View a ``(D,)`` tensor as ``(1, D)``; return the view and whether it was unbatched.

    Raises:
        ValueError: if ``z`` is neither 1-D nor 2-D.
    """
    if z.dim() == 1:
        return z.unsqueeze(0), True
    if z.dim() == 2:
        return z, False
    raise ValueError(
        f"solver state must have shape (B, D) or (D,), got {tuple(z.shape)}; "
        "flatten multi-dimensional states first (see shine.deq.flatten)"
    )


def batch_norm(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm of ``v`` with shape ``(B, D)``, returned as ``(B,)``."""
    return torch.linalg.vector_norm(v, dim=-1)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products ``aᵀb`` of ``a, b: (B, D)``, returned as ``(B,)``."""
    return torch.linalg.vecdot(a, b)
