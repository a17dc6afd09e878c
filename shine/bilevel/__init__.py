"""Bi-level optimisation: hyper-parameter optimisation of regularised linear models (paper §3.1).

* :mod:`shine.bilevel.losses`: logistic and nonlinear least-squares losses, the ℓ2-regularised
  inner problem with one log-regularisation per feature group.
* :class:`HOAG`: the outer loop of Pedregosa (2016) with a pluggable hypergradient (backward
  strategy): HOAG's conjugate gradient, SHINE, Jacobian-Free, refine; faithful and robust step
  rules.
* :class:`GridSearch`, :class:`RandomSearch`: the search baselines.
"""

from shine.bilevel.hoag import HOAG, BilevelProblem, Scheduled, ToleranceSchedule
from shine.bilevel.losses import (
    L2Regularized,
    LinearModelLoss,
    LogisticLoss,
    SigmoidSquaredLoss,
)
from shine.bilevel.problems import L2LogisticRegression, L2NonlinearLeastSquares
from shine.bilevel.search import GridSearch, RandomSearch

__all__ = [
    "HOAG",
    "BilevelProblem",
    "GridSearch",
    "L2LogisticRegression",
    "L2NonlinearLeastSquares",
    "L2Regularized",
    "LinearModelLoss",
    "LogisticLoss",
    "RandomSearch",
    "Scheduled",
    "SigmoidSquaredLoss",
    "ToleranceSchedule",
]
