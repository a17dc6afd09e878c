"""Backward strategies of the paper, as small composable objects.

All solve ``uᵀ J_g(z*) = rhsᵀ`` (see :mod:`shine.backward.base`):

* :class:`IFT` - iterative solve with VJPs by an adjoint solver object (:class:`BroydenAdjoint`,
  or :class:`ConjugateGradientAdjoint` for symmetric ``J_g``): the "original" backward of DEQs /
  HOAG; with a small ``max_iter`` the "original limited backprop".
* :class:`JacobianFree` - ``J_g^{-1} ≈ H0`` (Fung et al. 2021): ``u = H0ᵀ rhs``.
* :class:`Shine` - ``J_g^{-1} ≈ H``, the forward quasi-Newton estimate: ``u = Hᵀ rhs`` (eq. 4).
* :class:`Refine` - a few iterations of an adjoint solver warm-started from another strategy;
  ``BroydenAdjoint(initial_matrix="forward")`` starts them from the forward estimate (transposed)
  ("refine", §2.1).
* :class:`Fallback` - per sample, another strategy where ``‖u‖`` is suspicious (§3).
* :class:`Diagnose` - any strategy, plus cosine / norm ratio to a reference solution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from shine.backward.base import (
    AdjointResult,
    AdjointStats,
    BackwardStrategy,
    VJPFn,
    cosine_and_ratio,
    initial_scale,
)
from shine.solvers.base import SolverResult, as_batch, batch_norm
from shine.solvers.broyden import Broyden
from shine.solvers.linear import ConjugateGradient
from shine.solvers.low_rank import LowRankInverse
from shine.validation import check_fields

logger = logging.getLogger(__name__)

Method = Literal["broyden", "cg"]


def solve_adjoint(
    vjp: VJPFn,
    rhs: Tensor,
    *,
    u0: Tensor | None,
    max_iter: int,
    tol: float,
    method: Method,
    h0: float,
    memory: int | None = None,
    init_inverse: LowRankInverse | None = None,
) -> AdjointResult:
    """Iteratively solve ``J_gᵀ u = rhs`` from ``u0`` (zero if ``None``).

    Args:
        vjp: ``u -> J_gᵀ u``.
        rhs: right-hand side ``(B, D)`` or ``(D,)``.
        u0: initial guess.
        max_iter: iterations (each costs one VJP).
        tol: stop a sample when ``‖J_gᵀu - rhs‖ <= tol·‖rhs‖``.
        method: ``"broyden"`` (any ``J_g``) or ``"cg"`` (symmetric positive definite ``J_g``).
        h0: initial matrix scale of the Broyden solve (``J_g^{-T} ≈ h0·I``).
        memory: Broyden memory (default ``max_iter``).
        init_inverse: initial Broyden matrix ``≈ J_g^{-T}`` (overrides ``h0``).
    """
    u_start = torch.zeros_like(rhs) if u0 is None else u0.detach()
    if max_iter <= 0:
        return AdjointResult(u_start, AdjointStats())
    rhs_norm = torch.linalg.vector_norm(rhs, dim=-1)
    if method == "broyden":
        solver = Broyden(
            max_iter=max_iter,
            tol=tol * rhs_norm,
            memory=memory or max_iter,
            h0=h0,
            inverse_at="last",
        )
        res = solver(lambda u: vjp(u) - rhs, u_start, init_inverse=init_inverse)
        n_vjps = res.stats.n_evals
    elif method == "cg":
        if init_inverse is not None:
            raise ValueError(
                "a quasi-Newton initial matrix can only seed a Broyden backward solve; "
                "use method='broyden' or init_inverse=None"
            )
        res = ConjugateGradient(max_iter=max_iter, tol=tol)(vjp, rhs, x0=u_start)
        n_vjps = res.stats.n_evals
    else:
        raise ValueError(f"unknown backward method {method!r}; valid: 'broyden', 'cg'")
    rel = res.stats.residual / rhs_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    return AdjointResult(
        res.value, AdjointStats(n_vjps=n_vjps, nstep=res.stats.nstep, residual=rel)
    )


@dataclass(frozen=True)
class JacobianFree:
    """Jacobian-Free backward (Fung et al. 2021): ``J_g^{-1} ≈ H0 = c·I``, ``u = c·rhs``.

    Args:
        scale: ``c``; ``None`` takes the forward solver's initial matrix (``-1`` for DEQ
            residuals ``f(z) - z``, i.e. ``u = ∂L/∂z*``; ``+1`` for L-BFGS on an inner
            objective, i.e. the identity in place of the inverse Hessian).
    """

    scale: float | None = None

    def __post_init__(self) -> None:
        """Validate the fields (types, ranges).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field out of range (the field and its range are named).
        """
        check_fields(self)

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Return ``c·rhs`` (no VJP)."""
        c = initial_scale(fwd) if self.scale is None else self.scale
        return AdjointResult(c * rhs, AdjointStats())


@dataclass(frozen=True)
class Shine:
    """SHINE: reuse the forward quasi-Newton estimate, ``u = Hᵀ rhs`` (paper eq. 4).

    Costs two batched low-rank contractions (Broyden) or one two-loop recursion (L-BFGS).
    """

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Return ``fwd.inverse.rmatvec(rhs)``.

        Raises:
            ValueError: if the forward solver produced no inverse estimate.
        """
        if fwd.inverse is None:
            raise ValueError(
                "Shine needs the inverse estimate of a quasi-Newton forward solver (Broyden, "
                "AdjointBroyden, LBFGS); the forward solver returned none. Use JacobianFree or "
                "IFT with this solver."
            )
        return AdjointResult(fwd.inverse.rmatvec(rhs), AdjointStats())


class AdjointSolver(Protocol):
    """An iterative solver of the adjoint system ``J_g(z*)ᵀ u = rhs``.

    The inner solver of :class:`IFT` and :class:`Refine`.
    """

    def __call__(
        self,
        vjp: VJPFn,
        rhs: Tensor,
        fwd: SolverResult,
        *,
        u0: Tensor | None,
        max_iter: int,
        tol: float,
    ) -> AdjointResult:
        """Run at most ``max_iter`` iterations (VJPs) from ``u0`` (zero if ``None``).

        A sample stops when ``‖J_gᵀu - rhs‖ <= tol·‖rhs‖``; ``fwd`` is the forward solve's
        result (its inverse estimate and initial scale).
        """
        ...


#: initial matrix of a Broyden adjoint solve; see :class:`BroydenAdjoint`
InitialMatrix = Literal["h0", "forward", "forward_as_is"]


@dataclass(frozen=True)
class BroydenAdjoint:
    """Broyden's method on ``J_gᵀ u = rhs`` (any ``J_g``; the DEQ backward of MDEQ).

    Args:
        memory: Broyden memory (default: the number of iterations).
        initial_matrix: ``"h0"``: ``c·I`` with ``c`` the forward solver's initial scale;
            ``"forward"``: the forward Broyden estimate transposed, ``Hᵀ ≈ J_g^{-T}`` (the
            correct estimate of the adjoint system's inverse Jacobian: SHINE refine, §2.1);
            ``"forward_as_is"``: ``H`` untransposed, as the authors' released code (ablation).
            The last two need a Broyden-type forward estimate (:class:`LowRankInverse`).
    """

    memory: int | None = None
    initial_matrix: InitialMatrix = "h0"

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on an unknown ``initial_matrix`` or a memory below 1.
        """
        check_fields(self, minimum={"memory": 1})

    def __call__(
        self,
        vjp: VJPFn,
        rhs: Tensor,
        fwd: SolverResult,
        *,
        u0: Tensor | None,
        max_iter: int,
        tol: float,
    ) -> AdjointResult:
        """Solve ``J_gᵀ u = rhs``; see the class docstring.

        Raises:
            ValueError: ``initial_matrix`` reuses the forward estimate and there is none of
                Broyden type.
        """
        init_inverse = None
        if self.initial_matrix != "h0":
            if not isinstance(fwd.inverse, LowRankInverse):
                raise ValueError(
                    f"BroydenAdjoint(initial_matrix={self.initial_matrix!r}) needs a "
                    f"Broyden-type forward estimate (got {type(fwd.inverse).__name__}); "
                    "use initial_matrix='h0'"
                )
            est = fwd.inverse
            init_inverse = est.transpose() if self.initial_matrix == "forward" else est
        return solve_adjoint(
            vjp,
            rhs,
            u0=u0,
            max_iter=max_iter,
            tol=tol,
            method="broyden",
            h0=initial_scale(fwd),
            memory=self.memory,
            init_inverse=init_inverse,
        )


@dataclass(frozen=True)
class ConjugateGradientAdjoint:
    """Conjugate gradient on ``J_gᵀ u = rhs`` for a symmetric positive definite ``J_g``.

    The inner Hessian of a bi-level problem: HOAG's backward.
    """

    def __call__(
        self,
        vjp: VJPFn,
        rhs: Tensor,
        fwd: SolverResult,
        *,
        u0: Tensor | None,
        max_iter: int,
        tol: float,
    ) -> AdjointResult:
        """Solve ``J_gᵀ u = rhs`` by CG; ``fwd`` is not used."""
        return solve_adjoint(
            vjp, rhs, u0=u0, max_iter=max_iter, tol=tol, method="cg", h0=initial_scale(fwd)
        )


@dataclass(frozen=True)
class IFT:
    """Iterative solve of the adjoint system (the "original" implicit backward).

    Args:
        max_iter: iterations (VJPs); a small value gives the paper's "original limited backprop".
        tol: relative tolerance ``‖J_gᵀu - rhs‖ <= tol·‖rhs‖`` per sample.
        solver: the adjoint solver: :class:`BroydenAdjoint` (DEQs, as in MDEQ; from ``H0 = c·I``
            with ``c`` the forward solver's initial scale) or :class:`ConjugateGradientAdjoint`
            (symmetric Hessians, as in HOAG).

    The solve starts from ``u0`` when given (warm restart across outer iterations), else from
    zero.
    """

    max_iter: int = 20
    tol: float = 1e-6
    solver: AdjointSolver = field(default_factory=BroydenAdjoint)

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on a negative ``max_iter`` or ``tol``.
        """
        check_fields(self, minimum={"max_iter": 0, "tol": 0.0})

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Solve ``J_gᵀ u = rhs`` iteratively."""
        return self.solver(vjp, rhs, fwd, u0=u0, max_iter=self.max_iter, tol=self.tol)


@dataclass(frozen=True)
class Refine:
    """``n_steps`` iterations of an adjoint solver, started from ``init``'s answer.

    Args:
        init: strategy giving the starting point (``Shine()`` or ``JacobianFree()``).
        n_steps: iterations (VJPs); ``0`` returns ``init``'s answer unchanged.
        solver: the adjoint solver; the default, ``BroydenAdjoint(initial_matrix="forward")``,
            also starts from the forward estimate (SHINE refine); ``BroydenAdjoint()`` from
            ``H0`` (Jacobian-Free refine); ``ConjugateGradientAdjoint()`` for HOAG-style refine.
        tol: relative tolerance to stop early (0 runs all ``n_steps``).
    """

    init: BackwardStrategy = field(default_factory=Shine)
    n_steps: int = 5
    solver: AdjointSolver = field(default_factory=lambda: BroydenAdjoint(initial_matrix="forward"))
    tol: float = 0.0

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on a negative ``n_steps`` or ``tol``.
        """
        check_fields(self, minimum={"n_steps": 0, "tol": 0.0})

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Refine ``init``'s solution with ``n_steps`` iterations."""
        start = self.init(vjp, rhs, fwd, u0=u0)
        if self.n_steps <= 0:
            return start
        out = self.solver(vjp, rhs, fwd, u0=start.value, max_iter=self.n_steps, tol=self.tol)
        out.stats.n_vjps += start.stats.n_vjps
        return out


@dataclass(frozen=True)
class Fallback:
    """Per sample, replace ``primary``'s answer by ``fallback``'s when its norm is suspicious.

    A sample falls back when ``‖u_primary‖ > ratio·‖u_JF‖`` or ``u_primary`` is not finite,
    with ``u_JF = h0·rhs`` the Jacobian-Free answer (``h0`` the scale of the forward solver's
    initial matrix ``H0 = h0·I``; ``-1`` for a DEQ): the paper's test, which compares the SHINE
    direction with the Jacobian-Free one, whatever ``h0``.

    Args:
        primary: the strategy used by default (``Shine()``).
        fallback: the strategy used for flagged samples (``JacobianFree()``); only evaluated
            when at least one sample is flagged.
        ratio: threshold; 1.3 in the paper, 1.8 in the authors' released code.
    """

    primary: BackwardStrategy = field(default_factory=Shine)
    fallback: BackwardStrategy = field(default_factory=JacobianFree)
    ratio: float = 1.3

    def __post_init__(self) -> None:
        """Validate the fields (types, ranges).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field out of range (the field and its range are named).
        """
        check_fields(self, minimum={"ratio": 0.0})

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Return the per-sample mix of ``primary`` and ``fallback``; stats carry the mask."""
        first = self.primary(vjp, rhs, fwd, u0=u0)
        ub, unbatched = as_batch(first.value)
        rb, _ = as_batch(rhs)
        jf_norm = abs(initial_scale(fwd)) * batch_norm(rb)  # ‖u_JF‖ = |h0|·‖rhs‖
        mask = ~(batch_norm(ub) <= self.ratio * jf_norm)  # NaN norms fall back too
        stats = AdjointStats(n_vjps=first.stats.n_vjps, nstep=first.stats.nstep)
        value = first.value
        if bool(mask.any()):
            other = self.fallback(vjp, rhs, fwd, u0=u0)
            ob, _ = as_batch(other.value)
            mixed = torch.where(mask[:, None], ob, ub)
            value = mixed.squeeze(0) if unbatched else mixed
            stats.n_vjps += other.stats.n_vjps
            stats.nstep = max(stats.nstep, other.stats.nstep)
            logger.debug("Fallback used for %d of %d samples", int(mask.sum()), mask.numel())
        stats.fallback_mask = mask.squeeze(0) if unbatched else mask
        return AdjointResult(value, stats)


@dataclass(frozen=True)
class Diagnose:
    """Run ``strategy`` and report its agreement with a ``reference`` solution.

    The returned ``u`` is ``strategy``'s; ``stats.extra`` gains ``cos_to_reference`` and
    ``ratio_to_reference`` (means over the batch of the cosine and of ``‖u‖/‖u_ref‖``). The
    reference costs its own VJPs: use it for diagnostics, not for timing.
    """

    strategy: BackwardStrategy = field(default_factory=Shine)
    reference: BackwardStrategy = field(default_factory=lambda: IFT(max_iter=100, tol=1e-10))

    def __call__(
        self, vjp: VJPFn, rhs: Tensor, fwd: SolverResult, *, u0: Tensor | None = None
    ) -> AdjointResult:
        """Return ``strategy``'s result with agreement statistics."""
        out = self.strategy(vjp, rhs, fwd, u0=u0)
        ref = self.reference(vjp, rhs, fwd, u0=None)
        cos, ratio = cosine_and_ratio(out.value, ref.value)
        out.stats.extra["cos_to_reference"] = float(cos.mean())
        out.stats.extra["ratio_to_reference"] = float(ratio.mean())
        return out


__all__ = [
    "IFT",
    "AdjointSolver",
    "BroydenAdjoint",
    "ConjugateGradientAdjoint",
    "Diagnose",
    "Fallback",
    "JacobianFree",
    "Refine",
    "Shine",
    "solve_adjoint",
]
