"""ℓ2-logistic regression inner problem: derivatives against autograd, dense vs sparse designs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from deq_problems import DT

from shine.bilevel.problems import L2LogisticRegression

N, P = 40, 9


def data(seed=0, density=0.35):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, P, dtype=DT, generator=gen)
    X = X * (torch.rand(N, P, dtype=DT, generator=gen) < density)  # sparse-ish
    y = torch.where(torch.rand(N, dtype=DT, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    w = torch.randn(P, dtype=DT, generator=gen)
    V = torch.randn(4, P, dtype=DT, generator=gen)
    return X, y, w, V


def reference_objective(X, y, w, log_lambda):
    """h(w, λ) written independently: Σ log(1 + exp(-y xᵀw)) + ½ e^λ ‖w‖²."""
    margins = y * (X @ w)
    return torch.log1p(torch.exp(-margins)).sum() + 0.5 * torch.exp(log_lambda) * (w @ w)


@pytest.mark.parametrize("log_lambda", [-1.0, 0.0, 2.3])
def test_value_and_grad_match_autograd(log_lambda):
    X, y, w, _ = data()
    prob = L2LogisticRegression(X, y)
    value, grad = prob.value_and_grad(w, log_lambda)
    wr = w.clone().requires_grad_()
    ref = reference_objective(X, y, wr, torch.tensor(log_lambda, dtype=DT))
    (ref_grad,) = torch.autograd.grad(ref, wr)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-13)
    # the outer loss is the unregularised part
    loss = reference_objective(X, y, wr, torch.tensor(-math.inf, dtype=DT))
    (loss_grad,) = torch.autograd.grad(loss, wr)
    torch.testing.assert_close(prob.loss(w), loss.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(prob.loss_grad(w), loss_grad, rtol=1e-12, atol=1e-13)
    # the closure for the inner solver
    v2, g2 = prob.objective(log_lambda)(w)
    assert torch.equal(v2, value) and torch.equal(g2, grad)


def test_hvp_matches_double_backward_and_dense_hessian():
    X, y, w, V = data()
    log_lambda = 0.4
    prob = L2LogisticRegression(X, y)
    wr = w.clone().requires_grad_()
    ref = reference_objective(X, y, wr, torch.tensor(log_lambda, dtype=DT))
    (g,) = torch.autograd.grad(ref, wr, create_graph=True)
    H = prob.hessian(w, log_lambda)
    ref_H = torch.stack([torch.autograd.grad(g[i], wr, retain_graph=True)[0] for i in range(P)])
    torch.testing.assert_close(H, ref_H, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-14)
    for v in V:
        (hv,) = torch.autograd.grad(g, wr, v, retain_graph=True)
        torch.testing.assert_close(prob.hvp(w, log_lambda, v), hv, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(prob.hvp(w, log_lambda, v), H @ v, rtol=1e-12, atol=1e-13)
    # batched: one product per row
    batched = prob.hvp(w, log_lambda, V)
    assert batched.shape == (4, P)
    torch.testing.assert_close(batched, V @ H, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(batched[2], prob.hvp(w, log_lambda, V[2]), rtol=1e-14, atol=0)
    # positive definite, with smallest eigenvalue at least e^λ
    assert float(torch.linalg.eigvalsh(H)[0]) >= math.exp(log_lambda) * (1 - 1e-12)


def test_cross_derivative_matches_finite_differences():
    X, y, w, _ = data()
    prob = L2LogisticRegression(X, y)
    lam, h = 0.3, 1e-5
    fd = (prob.value_and_grad(w, lam + h)[1] - prob.value_and_grad(w, lam - h)[1]) / (2 * h)
    cross = prob.cross_derivative(w, lam)
    torch.testing.assert_close(cross, fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(cross, math.exp(lam) * w)
    # with a tensor λ, everything stays differentiable in λ
    lam_t = torch.tensor(lam, dtype=DT, requires_grad=True)
    value, grad = prob.value_and_grad(w, lam_t)
    (dvalue,) = torch.autograd.grad(value, lam_t, retain_graph=True)
    torch.testing.assert_close(dvalue, 0.5 * math.exp(lam) * (w @ w))
    jac = torch.stack(
        [torch.autograd.grad(grad[i], lam_t, retain_graph=True)[0] for i in range(P)]
    )
    torch.testing.assert_close(jac, cross, rtol=1e-13, atol=0)
    torch.testing.assert_close(prob.cross_derivative(w, lam_t).detach(), cross)
    torch.testing.assert_close(
        prob.hvp(w, lam_t, w).detach(), prob.hvp(w, lam, w), rtol=1e-14, atol=0
    )


def sparse_variants(X):
    Xn = X.numpy()
    return {
        "scipy_csr": sp.csr_matrix(Xn),
        "scipy_coo": sp.coo_matrix(Xn),
        "torch_csr": X.to_sparse_csr(),
        "torch_coo": X.to_sparse(),
    }


@pytest.mark.parametrize("kind", ["scipy_csr", "scipy_coo", "torch_csr", "torch_coo"])
def test_sparse_design_matches_dense(kind):
    X, y, w, V = data()
    dense = L2LogisticRegression(X, y)
    sparse = L2LogisticRegression(sparse_variants(X)[kind], y.numpy())
    assert sparse.sparse and not dense.sparse
    assert sparse.dtype == DT and (sparse.n_samples, sparse.n_features) == (N, P)
    lam = 0.7
    for a, b in zip(sparse.value_and_grad(w, lam), dense.value_and_grad(w, lam), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sparse.loss(w), dense.loss(w), rtol=1e-13, atol=0)
    torch.testing.assert_close(sparse.loss_grad(w), dense.loss_grad(w), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        sparse.hvp(w, lam, V[0]), dense.hvp(w, lam, V[0]), atol=1e-13, rtol=0
    )
    torch.testing.assert_close(sparse.hvp(w, lam, V), dense.hvp(w, lam, V), atol=1e-13, rtol=0)
    torch.testing.assert_close(sparse.hessian(w, lam), dense.hessian(w, lam), atol=1e-13, rtol=0)
    torch.testing.assert_close(sparse.cross_derivative(w, lam), dense.cross_derivative(w, lam))
    assert "sparse" in repr(sparse) and "dense" in repr(dense)


def test_duplicate_sparse_entries_are_summed():
    X, y, w, _ = data()
    coo = sp.coo_matrix(X.numpy())
    # split every stored value into two duplicate entries
    dup = sp.coo_matrix(
        (
            np.concatenate([0.25 * coo.data, 0.75 * coo.data]),
            (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col])),
        ),
        shape=coo.shape,
    )
    a = L2LogisticRegression(dup, y).value_and_grad(w, 0.0)
    b = L2LogisticRegression(X, y).value_and_grad(w, 0.0)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_input_conversion():
    X, y, w, _ = data()
    Xi = np.round(3 * X.numpy()).astype(np.int64)  # integer data: computed in float64
    prob = L2LogisticRegression(Xi, y.numpy().astype(np.int64))
    assert prob.dtype == torch.float64
    ref = L2LogisticRegression(torch.from_numpy(Xi).to(DT), y)
    torch.testing.assert_close(prob.value_and_grad(w, 0.0), ref.value_and_grad(w, 0.0))
    single = L2LogisticRegression(X.float(), y.tolist())
    assert single.dtype == torch.float32 and single.y.dtype == torch.float32


def test_no_overflow_for_large_margins():
    X, y, w, _ = data()
    prob = L2LogisticRegression(X, y)
    big = 1e4 * w
    value, grad = prob.value_and_grad(big, 0.0)
    assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    assert bool(torch.isfinite(prob.hvp(big, 0.0, w)).all())
    margins = y * (X @ big)
    expected = torch.clamp(-margins, min=0).sum() + 0.5 * (big @ big)  # softplus(t) ≈ max(t, 0)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)


def test_validation():
    X, y, w, _ = data()
    with pytest.raises(ValueError, match=r"-1 or \+1"):
        L2LogisticRegression(X, (y + 1) / 2)  # {0, 1} labels
    with pytest.raises(ValueError, match=r"2 \* y - 1"):
        L2LogisticRegression(X, torch.zeros(N, dtype=DT))
    with pytest.raises(ValueError, match="labels"):
        L2LogisticRegression(X, y[:-1])
    with pytest.raises(ValueError, match="matrix"):
        L2LogisticRegression(X[0], y[:1])
    prob = L2LogisticRegression(X, y)
    with pytest.raises(ValueError, match="shape"):
        prob.value_and_grad(w[:-1], 0.0)
    with pytest.raises(ValueError, match="shape"):
        prob.hvp(w, 0.0, torch.zeros(2, 3, P, dtype=DT))
    with pytest.raises(ValueError, match="scalar"):
        prob.value_and_grad(w, torch.zeros(2, dtype=DT))
