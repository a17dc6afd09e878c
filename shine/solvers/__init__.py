"""Root solvers and minimizers that hand over their inverse-Jacobian estimate.

* :class:`Broyden`, :class:`AdjointBroyden` (with OPA): batched quasi-Newton root finding of
  ``g(z) = 0`` with a low-rank estimate ``H ≈ J_g^{-1}`` (:class:`LowRankInverse`).
* :class:`LBFGS` (with OPA): minimization, i.e. the root of ``∇r``, with an inverse-Hessian
  estimate (:class:`LBFGSInverse`); :class:`ScipyLBFGSB`: SciPy's L-BFGS-B driven as in the
  authors' HOAG (their Figure 1 solver), with the same estimate.
* :class:`ConjugateGradient`, :class:`FixedPoint`, :class:`Anderson`: baselines without estimate.
"""

from shine.solvers.adjoint_broyden import AdjointBroyden
from shine.solvers.base import (
    InverseEstimate,
    RootSolver,
    ScaledIdentity,
    SolverResult,
    SolverStats,
)
from shine.solvers.broyden import Broyden
from shine.solvers.fixed_point import Anderson, FixedPoint
from shine.solvers.lbfgs import LBFGS, LBFGSInverse, LBFGSMemory, lbfgsb_workspace_inverse
from shine.solvers.linear import ConjugateGradient
from shine.solvers.low_rank import LowRankInverse
from shine.solvers.scipy_lbfgsb import ScipyLBFGSB

__all__ = [
    "LBFGS",
    "AdjointBroyden",
    "Anderson",
    "Broyden",
    "ConjugateGradient",
    "FixedPoint",
    "InverseEstimate",
    "LBFGSInverse",
    "LBFGSMemory",
    "LowRankInverse",
    "RootSolver",
    "ScaledIdentity",
    "ScipyLBFGSB",
    "SolverResult",
    "SolverStats",
    "lbfgsb_workspace_inverse",
]
