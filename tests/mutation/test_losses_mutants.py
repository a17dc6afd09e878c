"""Linear-model losses and their ℓ2-regularised inner problem: input conversion and contracts.

Written against the mutants of ``make mutation`` that survived the other tests
(tests/test_logistic_problem.py, tests/test_bilevel.py): design matrices with empty trailing
rows/columns, scipy inputs of other dtypes, array-like labels, the index width of the CSR
storage, feature groups given with another integer dtype, the shapes a scalar ``λ`` may take.
Every number is checked against a dense float64 reference written here.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from shine.bilevel.losses import (
    _INT32_MAX,
    L2Regularized,
    LogisticLoss,
    SigmoidSquaredLoss,
    _csr,
)

DT = torch.float64


def data(n=6, p=4, seed=0):
    """A small design whose last row and last column are zero, ±1 labels, a point ``w``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, dtype=DT, generator=gen)
    X = X * (torch.rand(n, p, dtype=DT, generator=gen) < 0.7)
    X[-1] = 0.0  # a sample without features: a trailing empty row
    X[:, -1] = 0.0  # a feature present in no sample: a trailing empty column
    y = torch.where(torch.rand(n, dtype=DT, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    w = torch.randn(p, dtype=DT, generator=gen)
    return X, y, w


def reference_grad(X, y, w, elam):
    """∇_w [Σ log(1 + exp(-y xᵀw)) + ½ Σ e^λ_j w_j²] by hand: -Xᵀ(y σ(-y Xw)) + e^λ ⊙ w."""
    return -X.T @ (y * torch.sigmoid(-y * (X @ w))) + elam * w


# ---------------------------------------------------------------------------- CSR storage
def test_csr_uses_32_bit_indices_exactly_when_they_fit():
    """The module's promise: CSR indices are int32 when every index fits, int64 otherwise.

    An int32 cast of a column index >= 2^31 would wrap it to a negative number (a wrong
    matrix), so a matrix with more than 2^31 - 1 columns must keep 64-bit indices.
    """
    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]], dtype=DT)
    a = dense.to_sparse_csr()
    small = _csr(a.crow_indices(), a.col_indices(), a.values(), (2, 3))
    assert small.crow_indices().dtype == torch.int32 and small.col_indices().dtype == torch.int32
    torch.testing.assert_close(small.to_dense(), dense, rtol=0, atol=0)

    crow = torch.tensor([0, 1, 1], dtype=torch.int64)
    one = torch.ones(1, dtype=DT)
    # the largest size that still fits: every index (at most 2^31 - 2) is an int32
    last = torch.tensor([_INT32_MAX - 1], dtype=torch.int64)
    edge = _csr(crow, last, one, (2, _INT32_MAX))
    assert edge.crow_indices().dtype == torch.int32 and edge.col_indices().dtype == torch.int32
    assert int(edge.col_indices()[0]) == _INT32_MAX - 1 and edge.shape == (2, _INT32_MAX)
    # one more column than int32 can index: the column index 2^31 + 4 is kept exactly
    far = torch.tensor([2**31 + 4], dtype=torch.int64)
    wide = _csr(crow, far, one, (2, 2**31 + 5))
    assert wide.crow_indices().dtype == torch.int64 and wide.col_indices().dtype == torch.int64
    assert int(wide.col_indices()[0]) == 2**31 + 4 and wide.shape == (2, 2**31 + 5)


@pytest.mark.parametrize("kind", ["torch_coo", "torch_csr", "scipy_coo", "scipy_csr"])
def test_sparse_design_with_empty_trailing_row_and_column_matches_dense(kind):
    """The shape of a sparse design comes from the matrix, not from its largest stored index.

    The last sample and the last feature of ``X`` hold no entry: the problem must still be
    ``(n, p)`` and every oracle equal the dense one (hand-written gradient as reference).
    """
    X, y, w = data()
    inputs = {
        "torch_coo": lambda: X.to_sparse(),
        "torch_csr": lambda: X.to_sparse_csr(),
        "scipy_coo": lambda: sp.coo_matrix(X.numpy()),
        "scipy_csr": lambda: sp.csr_matrix(X.numpy()),
    }
    sparse = L2Regularized(LogisticLoss(inputs[kind](), y))
    dense = L2Regularized(LogisticLoss(X, y))
    loss = sparse.data_loss
    assert loss.sparse and (loss.n_samples, loss.n_features) == (6, 4)
    lam = 0.3
    value, grad = sparse.value_and_grad(w, lam)
    torch.testing.assert_close(
        grad, reference_grad(X, y, w, math.exp(lam)), rtol=1e-13, atol=1e-14
    )
    torch.testing.assert_close(value, dense.value_and_grad(w, lam)[0], rtol=1e-13, atol=0)
    V = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sparse.hvp(w, lam, V), dense.hvp(w, lam, V), rtol=0, atol=1e-13)
    torch.testing.assert_close(sparse.hessian(w, lam), dense.hessian(w, lam), rtol=0, atol=1e-13)
    # the description names the storage exactly
    assert repr(loss) == "LogisticLoss(n=6, p=4, sparse, dtype=torch.float64)"
    assert repr(dense.data_loss) == "LogisticLoss(n=6, p=4, dense, dtype=torch.float64)"


def test_scipy_designs_keep_a_floating_dtype_and_convert_any_integer_dtype():
    """scipy input: float32 data stays float32; integer data (even unsigned, which torch cannot
    coalesce) becomes float64, with the values of the dense matrix."""
    X, y, w = data()
    single = LogisticLoss(sp.csr_matrix(X.numpy().astype(np.float32)), y)
    assert single.dtype == torch.float32 and single.y.dtype == torch.float32
    torch.testing.assert_close(
        single.loss_grad(w.float()), LogisticLoss(X.float(), y).loss_grad(w.float())
    )
    counts = np.round(4 * np.abs(X.numpy())).astype(np.uint16)  # e.g. word counts
    prob = LogisticLoss(sp.csr_matrix(counts), y)
    assert prob.dtype == torch.float64
    ref = torch.from_numpy(counts.astype(np.float64))
    grad = -ref.T @ (y * torch.sigmoid(-y * (ref @ w)))
    torch.testing.assert_close(prob.loss_grad(w), grad, rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------- labels
class ArrayLike:
    """A minimal object of numpy's array protocol (what h5py datasets, xarray... provide)."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


def test_labels_from_array_likes_and_from_tensors_of_any_dtype():
    """Labels are read through numpy when they are not a tensor (any array-like), and used
    directly when they are one (also in a dtype numpy lacks, bfloat16)."""
    X, y, w = data()
    ref = LogisticLoss(X, y)
    from_array_like = LogisticLoss(X, ArrayLike(y.numpy()))
    from_bf16 = LogisticLoss(X, y.to(torch.bfloat16))  # ±1 are exact in bfloat16
    for loss in (from_array_like, from_bf16):
        assert loss.y.dtype == DT and torch.equal(loss.y, y)
        torch.testing.assert_close(loss.loss_grad(w), ref.loss_grad(w), rtol=0, atol=0)


def test_bad_labels_message_lists_the_first_five_distinct_values():
    """The error shows (at most) the five smallest distinct label values, sorted."""
    X = torch.zeros(7, 2, dtype=DT)
    y = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0], dtype=DT)
    expected = "got values [-3.0, -2.0, -1.0, 0.0, 1.0])"
    with pytest.raises(ValueError, match=re.escape(expected)):
        LogisticLoss(X, y)


# ---------------------------------------------------------------------------- per-sample φ
def test_logistic_phi_returns_the_second_derivative_of_softplus():
    """``phi(m)[2]`` is φ''(m) = σ(m)σ(-m) for φ(m) = log(1 + exp(-y m)) (autograd twice)."""
    X, y, _ = data()
    loss = LogisticLoss(X, y)
    m = torch.linspace(-4.0, 4.0, 6, dtype=DT)
    value, d1, d2 = loss.phi(m)
    mr = m.clone().requires_grad_()
    ref = F.softplus(-y * mr)
    (g,) = torch.autograd.grad(ref.sum(), mr, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), mr)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(d1, g.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(d2, h, rtol=1e-12, atol=0)
    torch.testing.assert_close(d2, torch.sigmoid(m) * torch.sigmoid(-m), rtol=1e-12, atol=0)
    # the cheaper phi_derivatives override agrees
    for a, b in zip(loss.phi_derivatives(m), (d1, d2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_sigmoid_squared_loss_records_its_target_convention():
    X, y, _ = data()
    zero_one = SigmoidSquaredLoss(X, y)
    assert zero_one.target_kind == "zero_one" and torch.equal(zero_one.targets, (1 + y) / 2)
    faithful = SigmoidSquaredLoss(X, y, targets="plus_minus_one")
    assert faithful.target_kind == "plus_minus_one" and torch.equal(faithful.targets, y)


# ---------------------------------------------------------------------------- ℓ2 penalty
def test_default_log_lambda_is_zero_and_one_group_without_groups():
    """Without groups, λ is one scalar (one group); the default λ = 0 gives e^λ = 1, i.e. the
    penalty ½‖w‖²."""
    X, y, w = data()
    inner = L2Regularized(LogisticLoss(X, y))
    lam = inner.initial_log_lambda()
    assert lam.shape == () and float(lam) == 0.0 and lam.dtype == DT
    assert inner.n_groups == 1 == lam.numel()
    assert repr(inner).endswith("groups=1)")
    value, grad = inner.value_and_grad(w, lam)
    ref_value = F.softplus(-y * (X @ w)).sum() + 0.5 * (w @ w)
    torch.testing.assert_close(value, ref_value, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, reference_grad(X, y, w, 1.0), rtol=1e-13, atol=1e-14)


def test_scalar_lambda_of_shape_1x1_is_a_scalar():
    """A one-element ``λ`` of any shape is the scalar λ: the gradient keeps the shape ``(p,)``."""
    X, y, w = data()
    inner = L2Regularized(LogisticLoss(X, y))
    lam = torch.full((1, 1), -0.7, dtype=DT)
    value, grad = inner.value_and_grad(w, lam)
    ref_value, ref_grad = inner.value_and_grad(w, -0.7)
    assert grad.shape == (4,) and value.shape == ()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-15, atol=0)
    torch.testing.assert_close(value, ref_value, rtol=1e-15, atol=0)
    cross = inner.cross_derivative(w, lam)
    assert cross.shape == (4,)
    torch.testing.assert_close(cross, math.exp(-0.7) * w, rtol=1e-15, atol=0)
    V = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert inner.hvp(w, lam, V).shape == (2, 4)


def test_float32_lambda_is_exponentiated_in_the_problem_dtype():
    """e^λ is taken in the problem's dtype: e^90 overflows float32 but not float64."""
    X, y, w = data()
    inner = L2Regularized(LogisticLoss(X, y))
    lam = torch.tensor(90.0, dtype=torch.float32)  # 90 is exact in float32
    _, grad = inner.value_and_grad(w, lam)
    assert grad.dtype == DT and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, reference_grad(X, y, w, math.exp(90.0)), rtol=1e-14, atol=0)


def test_groups_of_another_integer_dtype_are_group_indices():
    """Groups given as uint8 (a compact dtype for group ids) are indices, not a boolean mask:
    the problem equals the one with int64 groups, against a hand-written penalty."""
    X, y, w = data()
    groups = np.array([0, 1, 1, 0], dtype=np.uint8)
    lam = torch.tensor([0.2, -0.5], dtype=DT)
    compact = L2Regularized(LogisticLoss(X, y), groups=groups)
    assert compact.groups.dtype == torch.long and compact.n_groups == 2
    elam = torch.exp(lam)[torch.tensor([0, 1, 1, 0])]
    _, grad = compact.value_and_grad(w, lam)
    torch.testing.assert_close(grad, reference_grad(X, y, w, elam), rtol=1e-13, atol=1e-14)
    q = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(2))
    prod = elam * w * q
    torch.testing.assert_close(
        compact.cross_vjp(w, lam, q), torch.stack([prod[[0, 3]].sum(), prod[[1, 2]].sum()])
    )
    dense_cross = torch.zeros(2, 4, dtype=DT)
    dense_cross[[0, 1, 1, 0], torch.arange(4)] = elam * w
    torch.testing.assert_close(compact.cross_derivative(w, lam), dense_cross, rtol=0, atol=0)


def test_group_validation_and_lambda_shapes():
    """Wrong groups or a λ of the wrong kind are refused with an explicit message."""
    X, y, w = data()
    loss = LogisticLoss(X, y)
    with pytest.raises(ValueError, match=r"one entry per feature \(4\), got 3"):
        L2Regularized(loss, groups=torch.tensor([0, 1, 0]))
    grouped = L2Regularized(loss, groups=torch.tensor([0, 1, 1, 0]))
    for bad in (0.5, torch.zeros((), dtype=DT), torch.zeros(3, dtype=DT)):
        with pytest.raises(ValueError, match=r"\(2,\) tensor \(one per group\)"):
            grouped.value_and_grad(w, bad)


def test_no_features_means_no_groups():
    """An empty design ``(n, 0)`` with an empty grouping has zero groups (λ of shape (0,)); the
    loss is then ``n·log 2`` (every margin is zero)."""
    X = torch.zeros(3, 0, dtype=DT)
    y = torch.tensor([1.0, -1.0, 1.0], dtype=DT)
    inner = L2Regularized(LogisticLoss(X, y), groups=torch.zeros(0, dtype=torch.long))
    assert inner.n_groups == 0 and inner.initial_log_lambda().shape == (0,)
    value, grad = inner.value_and_grad(torch.zeros(0, dtype=DT), inner.initial_log_lambda())
    torch.testing.assert_close(value, torch.tensor(3 * math.log(2.0), dtype=DT))
    assert grad.shape == (0,)
