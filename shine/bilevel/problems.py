"""Named inner problems of the bi-level experiments, built from :mod:`shine.bilevel.losses`.

:class:`L2LogisticRegression` is the inner problem of the paper's eq. (2) (after Pedregosa 2016):
ℓ2-regularised logistic regression with the log-regularisation ``λ`` as hyper-parameter,

    h(w, λ) = Σ_i log(1 + exp(-y_i x_iᵀw)) + ½ e^λ ‖w‖²,      y_i ∈ {-1, +1}, no intercept;

:class:`L2NonlinearLeastSquares` the regularised nonlinear least squares of eq. (12). Both offer
what HOAG / SHINE need (value and gradient, Hessian-vector products, the dense Hessian for
diagnostics, the cross derivative ``∂_λ∇_w h = e^λ w``) plus the unregularised loss of their data
(``loss``, ``loss_grad``), which is the outer loss on another data set.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from shine.bilevel.losses import L2Regularized, LinearModelLoss, LogisticLoss, SigmoidSquaredLoss


class _NamedProblem(L2Regularized):
    """An :class:`L2Regularized` problem that also exposes its data loss and data."""

    data_loss: LinearModelLoss

    @property
    def X(self) -> Tensor:  # noqa: N802 - the usual name of a design matrix
        """Design matrix ``(n, p)``."""
        return self.data_loss.X

    @property
    def y(self) -> Tensor:
        """Labels ``(n,)`` in ``{-1, +1}``."""
        return self.data_loss.y

    @property
    def n_samples(self) -> int:
        """Number of rows ``n``."""
        return self.data_loss.n_samples

    @property
    def sparse(self) -> bool:
        """Whether ``X`` is sparse."""
        return self.data_loss.sparse

    def loss(self, w: Tensor) -> Tensor:
        """Unregularised loss of the data (the outer loss when built on another set)."""
        return self.data_loss.loss(w)

    def loss_grad(self, w: Tensor) -> Tensor:
        """Gradient of :meth:`loss`, ``(p,)``."""
        return self.data_loss.loss_grad(w)

    def __repr__(self) -> str:
        """Short description."""
        return f"{type(self).__name__}({self.data_loss!r})"


class L2LogisticRegression(_NamedProblem):
    """ℓ2-regularised logistic regression ``h(w, λ)`` (see the module docstring).

    Args:
        X: design matrix ``(n, p)``: a dense or sparse (CSR or COO) torch tensor, a numpy array
            or a scipy.sparse matrix. Its (floating) dtype and device are those of every
            computation; integer data is converted to float64.
        y: labels ``(n,)`` in ``{-1, +1}`` (tensor, array or sequence).
        groups: optional ``(p,)`` feature groups, one ``λ`` per group (see
            :class:`~shine.bilevel.losses.L2Regularized`).

    Raises:
        ValueError: if ``X`` is not 2-D, if the shapes disagree, or if a label is not ±1.
    """

    def __init__(self, X: Any, y: Any, groups: Tensor | None = None) -> None:
        super().__init__(LogisticLoss(X, y), groups)


class L2NonlinearLeastSquares(_NamedProblem):
    """Regularised nonlinear least squares ``½ Σ (t_i - σ(x_iᵀw))² + ½ e^λ ‖w‖²`` (eq. 12).

    Args:
        X: design matrix ``(n, p)``.
        y: labels ``(n,)`` in ``{-1, +1}``.
        targets: see :class:`~shine.bilevel.losses.SigmoidSquaredLoss`.
        groups: optional ``(p,)`` feature groups.
    """

    def __init__(
        self,
        X: Any,
        y: Any,
        targets: Literal["zero_one", "plus_minus_one"] = "zero_one",
        groups: Tensor | None = None,
    ) -> None:
        super().__init__(SigmoidSquaredLoss(X, y, targets), groups)
