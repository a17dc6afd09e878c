"""Bi-level optimisation: inner problems of hyper-parameter optimisation (paper §3.1).

* :class:`L2LogisticRegression`: ℓ2-regularised logistic regression, the inner problem of the
  paper's eq. (2), with gradients, Hessian-vector products and the cross derivative.
"""

from shine.bilevel.problems import L2LogisticRegression

__all__ = ["L2LogisticRegression"]
