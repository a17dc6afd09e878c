"""Inner problems of the bi-level (hyper-parameter optimisation) experiments.

:class:`L2LogisticRegression` is the inner problem of the paper's eq. (2) (after Pedregosa 2016):
ℓ2-regularised logistic regression with the log-regularisation ``λ`` as hyper-parameter,

    h(w, λ) = Σ_i log(1 + exp(-y_i x_iᵀw)) + ½ e^λ ‖w‖²,      y_i ∈ {-1, +1}, no intercept,

with everything needed by HOAG / SHINE: value and gradient (inner solver), Hessian-vector
products (conjugate-gradient backward), the dense Hessian (diagnostics) and the cross derivative
``∂_λ∇_w h = e^λ w`` (hypergradient). The unregularised loss is the outer loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: A log-regularisation: a Python number or a scalar tensor (kept differentiable).
LogLambda = float | Tensor

_INT32_MAX = 2**31 - 1


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor, with 32-bit indices when they fit (much faster products on CPU)."""
    if values.numel() <= _INT32_MAX and max(shape) <= _INT32_MAX:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return torch.sparse_csr_tensor(crow, col, values, size=shape)


def _to_torch(X: Any) -> Tensor:
    """Convert a design matrix to a dense or sparse (COO/CSR) torch tensor."""
    if isinstance(X, Tensor):
        return X
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a dependency
        sp = None
    if sp is not None and sp.issparse(X):
        coo = X.tocoo()
        dtype = coo.dtype if np.issubdtype(coo.dtype, np.floating) else np.float64
        indices = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
        values = torch.from_numpy(coo.data.astype(dtype))
        return torch.sparse_coo_tensor(indices, values, size=coo.shape).coalesce()
    return torch.as_tensor(np.asarray(X))


def _exp(log_lambda: LogLambda, like: Tensor) -> float | Tensor:
    """``e^λ`` as a float for a number, as a tensor (dtype/device of ``like``) for a tensor."""
    if isinstance(log_lambda, Tensor):
        if log_lambda.numel() != 1:
            raise ValueError(f"log_lambda must be a scalar, got shape {tuple(log_lambda.shape)}")
        return torch.exp(log_lambda.to(dtype=like.dtype, device=like.device).reshape(()))
    return math.exp(float(log_lambda))


class L2LogisticRegression:
    """ℓ2-regularised logistic regression ``h(w, λ)`` (see the module docstring).

    Stores ``A = -diag(y) X`` (rows ``-y_i x_i``), so that ``A w`` are the negative margins and
    ``∇_w Σ softplus(a_iᵀw) = Aᵀσ(A w)``; for a sparse ``X`` both ``A`` and ``Aᵀ`` are kept in
    CSR format (32-bit indices when possible).

    Args:
        X: design matrix ``(n, p)``: a dense or sparse (CSR or COO) torch tensor, a numpy array
            or a scipy.sparse matrix. Its (floating) dtype and device are those of every
            computation; integer data is converted to float64.
        y: labels ``(n,)`` in ``{-1, +1}`` (tensor, array or sequence).

    Raises:
        ValueError: if ``X`` is not 2-D, if the shapes disagree, or if a label is not ±1.
    """

    def __init__(self, X: Any, y: Any) -> None:
        X = _to_torch(X)
        if X.dim() != 2:
            raise ValueError(f"X must be a matrix (n, p), got shape {tuple(X.shape)}")
        if not X.dtype.is_floating_point:
            X = X.to(torch.float64)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
        y = y.to(dtype=X.dtype, device=X.device).reshape(-1)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
        bad = (y != 1) & (y != -1)
        if bool(bad.any()):
            found = sorted({float(v) for v in torch.unique(y).tolist()})[:5]
            raise ValueError(
                f"labels must be -1 or +1 (got values {found}); map {{0, 1}} labels with "
                "y = 2 * y - 1"
            )
        self.X = X
        self.y = y
        n, p = X.shape
        self.n_samples, self.n_features = int(n), int(p)
        self.sparse = X.layout != torch.strided
        if self.sparse:
            coo = X.to_sparse_coo().coalesce() if X.layout != torch.sparse_coo else X.coalesce()
            idx, vals = coo.indices(), coo.values()
            vals = -vals * y[idx[0]]
            a = torch.sparse_coo_tensor(idx, vals, size=(n, p)).coalesce()
            a_csr = a.to_sparse_csr()
            at_csr = a.t().coalesce().to_sparse_csr()
            self._a = _csr(a_csr.crow_indices(), a_csr.col_indices(), a_csr.values(), (n, p))
            self._at = _csr(at_csr.crow_indices(), at_csr.col_indices(), at_csr.values(), (p, n))
        else:
            self._a = (-y[:, None] * X).contiguous()
            self._at = self._a.mT

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the problem."""
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        """Device of the problem."""
        return self.X.device

    def _neg_margins(self, w: Tensor) -> Tensor:
        """``A w = -y ⊙ (X w)``, shape ``(n,)``."""
        if w.dim() != 1 or w.shape[0] != self.n_features:
            raise ValueError(f"w must have shape ({self.n_features},), got {tuple(w.shape)}")
        return self._a @ w

    def loss(self, w: Tensor) -> Tensor:
        """Unregularised logistic loss ``Σ_i log(1 + exp(-y_i x_iᵀw))`` (the outer loss).

        Args:
            w: weights ``(p,)``.

        Returns:
            Scalar tensor.
        """
        return F.softplus(self._neg_margins(w)).sum()

    def loss_grad(self, w: Tensor) -> Tensor:
        """Gradient of :meth:`loss`: ``-Xᵀ(y ⊙ σ(-y ⊙ Xw))``, shape ``(p,)``."""
        return self._at @ torch.sigmoid(self._neg_margins(w))

    def value_and_grad(self, w: Tensor, log_lambda: LogLambda) -> tuple[Tensor, Tensor]:
        """Inner objective ``h(w, λ)`` and its gradient ``∇_w h = -Xᵀ(y ⊙ σ(-m)) + e^λ w``.

        Computed with ``softplus`` / ``sigmoid`` of the margins ``m = y ⊙ Xw`` (no overflow).

        Args:
            w: weights ``(p,)``.
            log_lambda: ``λ`` (float or scalar tensor; a tensor stays differentiable).

        Returns:
            ``(h, ∇_w h)``: a scalar tensor and a ``(p,)`` tensor.
        """
        nm = self._neg_margins(w)
        elam = _exp(log_lambda, w)
        value = F.softplus(nm).sum() + 0.5 * elam * torch.dot(w, w)
        sig = torch.sigmoid(nm)
        if isinstance(elam, float):
            grad = torch.addmv(w, self._at, sig, beta=elam)
        else:
            grad = self._at @ sig + elam * w
        return value, grad

    def objective(self, log_lambda: LogLambda) -> Any:
        """The closure ``w -> value_and_grad(w, log_lambda)``, for :class:`shine.solvers.LBFGS`."""
        return lambda w: self.value_and_grad(w, log_lambda)

    def hvp(self, w: Tensor, log_lambda: LogLambda, v: Tensor) -> Tensor:
        """Hessian-vector product ``∇²_w h · v = Xᵀ D X v + e^λ v``, ``D = diag(σ(m)(1 - σ(m)))``.

        Args:
            w: weights ``(p,)`` (where the Hessian is taken).
            log_lambda: ``λ``.
            v: ``(p,)``, or ``(B, p)`` for one product per row.

        Returns:
            Tensor of the shape of ``v``.
        """
        nm = self._neg_margins(w)
        d = torch.sigmoid(nm) * torch.sigmoid(-nm)
        elam = _exp(log_lambda, w)
        if v.dim() == 1:
            return self._at @ (d * (self._a @ v)) + elam * v
        if v.dim() == 2:
            return (self._at @ (d[:, None] * (self._a @ v.mT))).mT + elam * v
        raise ValueError(f"v must have shape (p,) or (B, p), got {tuple(v.shape)}")

    def hessian(self, w: Tensor, log_lambda: LogLambda) -> Tensor:
        """Dense Hessian ``∇²_w h = Xᵀ D X + e^λ I``, shape ``(p, p)`` (small ``p`` only)."""
        nm = self._neg_margins(w)
        d = torch.sigmoid(nm) * torch.sigmoid(-nm)
        a = self._a.to_dense() if self.sparse else self._a
        hess = a.mT @ (d[:, None] * a)
        eye = torch.eye(self.n_features, dtype=hess.dtype, device=hess.device)
        return hess + _exp(log_lambda, w) * eye

    def cross_derivative(self, w: Tensor, log_lambda: LogLambda) -> Tensor:
        """``∂_λ ∇_w h(w, λ) = e^λ w``, shape ``(p,)``."""
        return _exp(log_lambda, w) * w

    def __repr__(self) -> str:
        """Short description."""
        kind = "sparse" if self.sparse else "dense"
        return (
            f"L2LogisticRegression(n={self.n_samples}, p={self.n_features}, {kind}, "
            f"dtype={self.dtype})"
        )
