"""Data-fitting losses of linear models and their ℓ2-regularised inner problems.

The bi-level experiments of the paper (§3.1, appendix E.2) tune the regularisation of a linear
model ``w ∈ R^p`` on a design matrix ``X: (n, p)``. Every loss here has the form

    ℓ(w) = Σ_i φ_i(x_iᵀw),

so that ``∇ℓ = Xᵀ φ'(Xw)`` and ``∇²ℓ = Xᵀ diag(φ''(Xw)) X``, with the per-sample function

* :class:`LogisticLoss`: ``φ_i(m) = log(1 + exp(-y_i m))``, labels ``y_i ∈ {-1, +1}`` (eq. 2);
* :class:`SigmoidSquaredLoss`: ``φ_i(m) = ½ (t_i - σ(m))²``, the nonlinear least squares of
  eq. (12), non-convex (its Hessian may be indefinite).

:class:`L2Regularized` adds the penalty ``½ Σ_j e^{λ_{g(j)}} w_j²`` with one log-regularisation
``λ_g`` per feature group (a single scalar ``λ`` by default) and provides what HOAG and SHINE
need: the inner objective ``h(w, λ)`` with its gradient, Hessian-vector products and the
cross derivative ``∂_λ ∇_w h`` (as a vector-Jacobian product giving the hypergradient).

``X`` may be dense or sparse (torch CSR/COO, scipy.sparse); sparse matrices are stored in CSR
with 32-bit indices where possible (several times faster products on CPU) together with their
transpose.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: A log-regularisation: a Python number, a scalar tensor or a ``(G,)`` tensor (one per group).
LogLambda = float | Tensor

_INT32_MAX = 2**31 - 1


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor, with 32-bit indices when they fit (much faster products on CPU)."""
    if values.numel() <= _INT32_MAX and max(shape) <= _INT32_MAX:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def as_design_matrix(X: Any) -> Tensor:
    """Convert a design matrix to a floating dense tensor or a sparse COO tensor.

    Args:
        X: a torch tensor (dense, COO or CSR), a numpy array or a scipy.sparse matrix. Integer
            data becomes float64.

    Raises:
        ValueError: if ``X`` is not 2-D.
    """
    if not isinstance(X, Tensor):
        import scipy.sparse as sp

        if sp.issparse(X):
            coo = X.tocoo()
            dtype = coo.dtype if np.issubdtype(coo.dtype, np.floating) else np.float64
            indices = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
            values = torch.from_numpy(coo.data.astype(dtype))
            X = torch.sparse_coo_tensor(
                indices, values, size=coo.shape, check_invariants=False
            ).coalesce()
        else:
            X = torch.as_tensor(np.asarray(X))
    if X.dim() != 2:
        raise ValueError(f"X must be a matrix (n, p), got shape {tuple(X.shape)}")
    if not X.dtype.is_floating_point:
        X = X.to(torch.float64)
    return X


def as_labels(y: Any, like: Tensor) -> Tensor:
    """Labels as a ``(n,)`` tensor with the dtype and device of ``like``."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    return y.to(dtype=like.dtype, device=like.device).reshape(-1)


def check_pm_one(y: Tensor) -> None:
    """Raise a ValueError that says how to fix labels that are not all ``-1`` or ``+1``."""
    bad = (y != 1) & (y != -1)
    if bool(bad.any()):
        found = sorted({float(v) for v in torch.unique(y).tolist()})[:5]
        raise ValueError(
            f"labels must be -1 or +1 (got values {found}); map {{0, 1}} labels with y = 2 * y - 1"
        )


class LinearModelLoss:
    """``ℓ(w) = Σ_i φ_i(x_iᵀw)`` for a design ``X: (n, p)``; subclasses define ``φ``.

    Args:
        X: design matrix ``(n, p)`` (dense or sparse, see :func:`as_design_matrix`); its dtype
            and device are those of every computation.
        y: per-sample targets ``(n,)``.

    Raises:
        ValueError: if shapes disagree.
    """

    def __init__(self, X: Any, y: Any) -> None:
        X = as_design_matrix(X)
        y = as_labels(y, X)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
        self.X = X
        self.y = y
        n, p = X.shape
        self.n_samples, self.n_features = int(n), int(p)
        self.sparse = X.layout != torch.strided
        if self.sparse:
            coo = X.to_sparse_coo().coalesce()  # (to_sparse_coo of a COO tensor is itself)
            a = coo.to_sparse_csr()
            at = coo.t().coalesce().to_sparse_csr()
            self._x = _csr(a.crow_indices(), a.col_indices(), a.values(), (n, p))
            self._xt = _csr(at.crow_indices(), at.col_indices(), at.values(), (p, n))
        else:
            self._x = X.contiguous()
            self._xt = self._x.mT

    # ---------------------------------------------------------------- per-sample function
    def phi(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(φ(m), φ'(m), φ''(m))`` elementwise for margins ``m = Xw``, each ``(n,)``."""
        raise NotImplementedError

    def phi_derivatives(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(φ'(m), φ''(m))``; override when it is cheaper than :meth:`phi`."""
        _, d1, d2 = self.phi(m)
        return d1, d2

    # ---------------------------------------------------------------- oracles
    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the problem."""
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        """Device of the problem."""
        return self.X.device

    def margins(self, w: Tensor) -> Tensor:
        """``X w``, shape ``(n,)``.

        Raises:
            ValueError: if ``w`` is not ``(p,)``.
        """
        if w.dim() != 1 or w.shape[0] != self.n_features:
            raise ValueError(f"w must have shape ({self.n_features},), got {tuple(w.shape)}")
        return self._x @ w

    def loss(self, w: Tensor) -> Tensor:
        """``ℓ(w)``, a scalar tensor."""
        return self.phi(self.margins(w))[0].sum()

    def loss_grad(self, w: Tensor) -> Tensor:
        """``∇ℓ(w) = Xᵀ φ'(Xw)``, shape ``(p,)``."""
        return self._xt @ self.phi_derivatives(self.margins(w))[0]

    def loss_value_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(ℓ(w), ∇ℓ(w))`` with a single pass over ``X`` for the margins."""
        value, d1, _ = self.phi(self.margins(w))
        return value.sum(), self._xt @ d1

    def curvature(self, w: Tensor) -> Tensor:
        """``φ''(Xw)``, the diagonal of the Hessian's middle factor, shape ``(n,)``."""
        return self.phi_derivatives(self.margins(w))[1]

    def loss_hvp(self, w: Tensor, v: Tensor, curvature: Tensor | None = None) -> Tensor:
        """``∇²ℓ(w) v = Xᵀ (φ'' ⊙ X v)`` for ``v: (p,)`` or ``(B, p)`` (one product per row).

        Args:
            w: where the Hessian is taken, ``(p,)``.
            v: direction(s).
            curvature: precomputed :meth:`curvature` at ``w`` (saves a pass over ``X``).
        """
        d = self.curvature(w) if curvature is None else curvature
        if v.dim() == 1:
            return self._xt @ (d * (self._x @ v))
        if v.dim() == 2:
            return (self._xt @ (d[:, None] * (self._x @ v.mT))).mT
        raise ValueError(f"v must have shape (p,) or (B, p), got {tuple(v.shape)}")

    def loss_hessian(self, w: Tensor) -> Tensor:
        """Dense ``∇²ℓ(w) = Xᵀ diag(φ'') X``, ``(p, p)`` (small ``p`` only)."""
        x = self._x.to_dense()  # (a strided tensor is its own to_dense)
        return x.mT @ (self.curvature(w)[:, None] * x)

    def __repr__(self) -> str:
        """Short description."""
        kind = "sparse" if self.sparse else "dense"
        return (
            f"{type(self).__name__}(n={self.n_samples}, p={self.n_features}, {kind}, "
            f"dtype={self.dtype})"
        )


class LogisticLoss(LinearModelLoss):
    """Logistic loss ``Σ_i log(1 + exp(-y_i x_iᵀw))``, labels ``y_i ∈ {-1, +1}``, no intercept.

    Computed with ``softplus``/``sigmoid`` of the margins (no overflow).

    Raises:
        ValueError: if a label is not ±1.
    """

    def __init__(self, X: Any, y: Any) -> None:
        super().__init__(X, y)
        check_pm_one(self.y)

    def phi(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``φ = softplus(-y m)``, ``φ' = -y σ(-y m)``, ``φ'' = σ(m) σ(-m)``."""
        nm = -self.y * m
        s = torch.sigmoid(nm)
        return F.softplus(nm), -self.y * s, s * (1.0 - s)

    def phi_derivatives(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(φ', φ'')`` without the softplus."""
        s = torch.sigmoid(-self.y * m)
        return -self.y * s, s * (1.0 - s)


class SigmoidSquaredLoss(LinearModelLoss):
    """Nonlinear least squares ``½ Σ_i (t_i - σ(x_iᵀw))²`` (paper eq. 12).

    Args:
        X: design matrix ``(n, p)``.
        y: labels ``(n,)`` in ``{-1, +1}``.
        targets: ``"zero_one"`` regresses ``σ(xᵀw) ∈ (0, 1)`` on ``t = (1 + y)/2`` (the
            consistent choice); ``"plus_minus_one"`` on ``t = y`` itself, as the authors' code
            did (``hoag/nonlinear_least_squares.py``, branch ``nls`` of their HOAG fork; the
            optimum then pushes every margin to ±∞ for the negative class).

    The Hessian ``Xᵀ diag(σ'² - (t - σ) σ'') X`` with ``σ' = σ(1-σ)``, ``σ'' = σ'(1-2σ)`` may be
    indefinite: HOAG's conjugate gradient and L-BFGS's curvature check must cope with it.

    Raises:
        ValueError: on labels that are not ±1 or an unknown ``targets``.
    """

    def __init__(
        self, X: Any, y: Any, targets: Literal["zero_one", "plus_minus_one"] = "zero_one"
    ) -> None:
        super().__init__(X, y)
        check_pm_one(self.y)
        if targets == "zero_one":
            self.targets = 0.5 * (1.0 + self.y)
        elif targets == "plus_minus_one":
            self.targets = self.y
        else:
            raise ValueError(f"targets must be 'zero_one' or 'plus_minus_one', got {targets!r}")
        self.target_kind = targets

    def phi(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``φ = ½ r²`` with ``r = t - σ(m)``; ``φ' = -r σ'``; ``φ'' = σ'² - r σ'(1 - 2σ)``."""
        s = torch.sigmoid(m)
        ds = s * (1.0 - s)
        r = self.targets - s
        return 0.5 * r * r, -r * ds, ds * ds - r * ds * (1.0 - 2.0 * s)


def _exp(log_lambda: LogLambda, like: Tensor) -> float | Tensor:
    """``e^λ``: a float for a number, a tensor (dtype/device of ``like``) for a tensor."""
    if isinstance(log_lambda, Tensor):
        return torch.exp(log_lambda.to(dtype=like.dtype, device=like.device))
    return math.exp(float(log_lambda))


class L2Regularized:
    """The inner problem ``h(w, λ) = ℓ(w) + ½ Σ_j e^{λ_{g(j)}} w_j²`` of a bi-level problem.

    The hyper-parameter is the log-regularisation: a scalar ``λ`` (``groups=None``) or one
    ``λ_g`` per feature group. Its root problem ``∇_w h(w*, λ) = 0`` has Jacobian the Hessian
    ``∇²_w h``, symmetric, so the adjoint system of the hypergradient is a Hessian solve:

        dL/dλ = -(∂_λ ∇_w h)ᵀ q,   ∇²_w h(w*) q = ∇L(w*)      (paper eq. 3).

    Args:
        loss: the data-fitting term ``ℓ`` (a :class:`LinearModelLoss`).
        groups: optional ``(p,)`` integer tensor, ``groups[j]`` = the group of feature ``j`` in
            ``0..G-1``; ``λ`` then has shape ``(G,)``.

    Raises:
        ValueError: if ``groups`` has the wrong shape or values.
    """

    def __init__(self, loss: LinearModelLoss, groups: Tensor | None = None) -> None:
        self.data_loss = loss
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.long, device=loss.device).reshape(-1)
            if groups.shape[0] != loss.n_features:
                raise ValueError(
                    f"groups must have one entry per feature ({loss.n_features}), "
                    f"got {groups.shape[0]}"
                )
            if groups.numel() and int(groups.min()) < 0:
                raise ValueError("group indices must be >= 0")
        self.groups = groups
        self.n_groups = 1 if groups is None else int(groups.max()) + 1 if groups.numel() else 0

    # ---------------------------------------------------------------- shapes
    @property
    def n_features(self) -> int:
        """Dimension ``p`` of ``w``."""
        return self.data_loss.n_features

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the problem."""
        return self.data_loss.dtype

    @property
    def device(self) -> torch.device:
        """Device of the problem."""
        return self.data_loss.device

    def initial_log_lambda(self, value: float = 0.0) -> Tensor:
        """A log-regularisation filled with ``value``: shape ``()`` or ``(G,)``."""
        shape = () if self.groups is None else (self.n_groups,)
        return torch.full(shape, float(value), dtype=self.dtype, device=self.device)

    def _scale(self, log_lambda: LogLambda, w: Tensor) -> float | Tensor:
        """Per-feature regularisation ``e^{λ_{g(j)}}``: a float, scalar tensor or ``(p,)``."""
        elam = _exp(log_lambda, w)
        if self.groups is None:
            if isinstance(elam, Tensor) and elam.numel() != 1:
                raise ValueError(
                    f"log_lambda must be a scalar without groups, got shape {tuple(elam.shape)}"
                )
            return elam.reshape(()) if isinstance(elam, Tensor) else elam
        if not isinstance(elam, Tensor) or elam.shape != (self.n_groups,):
            raise ValueError(f"log_lambda must be a ({self.n_groups},) tensor (one per group)")
        return elam[self.groups]

    # ---------------------------------------------------------------- oracles
    def value_and_grad(self, w: Tensor, log_lambda: LogLambda) -> tuple[Tensor, Tensor]:
        """``(h(w, λ), ∇_w h = ∇ℓ(w) + e^λ ⊙ w)``: a scalar and a ``(p,)`` tensor."""
        value, grad = self.data_loss.loss_value_and_grad(w)
        scale = self._scale(log_lambda, w)
        return value + 0.5 * (scale * w * w).sum(), grad + scale * w

    def objective(self, log_lambda: LogLambda) -> Any:
        """The closure ``w -> value_and_grad(w, log_lambda)``, for :class:`shine.solvers.LBFGS`."""
        return lambda w: self.value_and_grad(w, log_lambda)

    def hvp(self, w: Tensor, log_lambda: LogLambda, v: Tensor) -> Tensor:
        """``∇²_w h · v = ∇²ℓ(w) v + e^λ ⊙ v`` for ``v: (p,)`` or ``(B, p)``."""
        return self.data_loss.loss_hvp(w, v) + self._scale(log_lambda, w) * v

    def hvp_at(self, w: Tensor, log_lambda: LogLambda) -> Any:
        """The operator ``v -> ∇²_w h(w, λ) v`` with the curvature at ``w`` computed once.

        The curvature (one pass over ``X``) is computed at the first product only: backward
        strategies that never multiply by the Hessian (SHINE, Jacobian-Free) do not pay for it.
        """
        scale = self._scale(log_lambda, w)
        cache: list[Tensor] = []

        def hvp(v: Tensor) -> Tensor:
            if not cache:
                cache.append(self.data_loss.curvature(w))
            return self.data_loss.loss_hvp(w, v, cache[0]) + scale * v

        return hvp

    def hessian(self, w: Tensor, log_lambda: LogLambda) -> Tensor:
        """Dense ``∇²_w h``, ``(p, p)`` (small ``p`` only)."""
        hess = self.data_loss.loss_hessian(w)
        scale = self._scale(log_lambda, w)
        diag = torch.as_tensor(scale, dtype=hess.dtype, device=hess.device).expand(self.n_features)
        return hess + torch.diag(diag)

    def shift_curvature_pairs(
        self, s: Tensor, y: Tensor, old_log_lambda: LogLambda, new_log_lambda: LogLambda
    ) -> Tensor:
        """Gradient differences of pairs ``(s, y)`` taken at ``λ_old``, moved to ``λ_new``.

        The penalty's gradient is linear in ``w``, so a pair ``y = ∇_w h(z + s, λ_old) -
        ∇_w h(z, λ_old)`` becomes exactly ``y + (e^{λ_new} - e^{λ_old}) ⊙ s`` at ``λ_new``:
        quasi-Newton pairs stay exact secant pairs of the new inner problem.

        Args:
            s: steps ``(k, p)``.
            y: gradient differences ``(k, p)`` at ``old_log_lambda``.
            old_log_lambda: ``λ`` at which ``y`` was measured.
            new_log_lambda: ``λ`` of the next inner problem.

        Returns:
            The shifted ``y``, ``(k, p)``.
        """
        delta = self._scale(new_log_lambda, s) - self._scale(old_log_lambda, s)
        return y + delta * s

    def cross_derivative(self, w: Tensor, log_lambda: LogLambda) -> Tensor:
        """``∂_λ ∇_w h(w, λ)``: ``e^λ w`` of shape ``(p,)`` for a scalar ``λ``, else ``(G, p)``."""
        scaled = self._scale(log_lambda, w) * w
        if self.groups is None:
            return scaled
        out = scaled.new_zeros(self.n_groups, self.n_features)
        out[self.groups, torch.arange(self.n_features, device=w.device)] = scaled
        return out

    def cross_vjp(self, w: Tensor, log_lambda: LogLambda, q: Tensor) -> Tensor:
        """``(∂_λ ∇_w h)ᵀ q``, shape of ``λ``: ``Σ_{j∈g} e^{λ_g} w_j q_j`` per group."""
        prod = self._scale(log_lambda, w) * w * q
        if self.groups is None:
            return prod.sum()
        return prod.new_zeros(self.n_groups).index_add_(0, self.groups, prod)

    def __repr__(self) -> str:
        """Short description."""
        return f"L2Regularized({self.data_loss!r}, groups={self.n_groups})"
