"""Backward strategies: approximate solutions of the adjoint system ``uᵀ J_g(z*) = rhsᵀ``.

See :mod:`shine.backward.base` for the interface and :mod:`shine.backward.strategies` for the
strategies of the paper (IFT, Jacobian-Free, SHINE, refine, fallback).
"""

from shine.backward.base import (
    AdjointResult,
    AdjointStats,
    BackwardStrategy,
    VJPFn,
    cosine_and_ratio,
    initial_scale,
)
from shine.backward.strategies import (
    IFT,
    AdjointSolver,
    BroydenAdjoint,
    ConjugateGradientAdjoint,
    Diagnose,
    Fallback,
    JacobianFree,
    Refine,
    Shine,
    solve_adjoint,
)

__all__ = [
    "IFT",
    "AdjointResult",
    "AdjointSolver",
    "AdjointStats",
    "BackwardStrategy",
    "BroydenAdjoint",
    "ConjugateGradientAdjoint",
    "Diagnose",
    "Fallback",
    "JacobianFree",
    "Refine",
    "Shine",
    "VJPFn",
    "cosine_and_ratio",
    "initial_scale",
    "solve_adjoint",
]
