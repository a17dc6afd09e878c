"""Tests for mutants that had been excused as equivalent but are observable.

Each test checks a documented property against a derivation independent of the code under test:

* the adjoint Broyden OPA update is homogeneous of degree 0 in its direction ``σ``;
* building a loss from a sparse design opts out of torch's sparse invariant checks explicitly,
  so torch does not warn that they are implicitly disabled.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from shine.bilevel.losses import LogisticLoss
from shine.solvers import AdjointBroyden

DT = torch.float64


def test_adjoint_broyden_opa_update_invariant_to_outer_gradient_scale():
    """OPA uses only the direction of ``v = Hᵀ∇L``: the adjoint update ``a (σ - b)ᵀ / (bᵀσ)``
    (``a = Hσ``, ``b = HᵀJᵀσ``) has the same value for ``σ`` and ``c·σ``, so scaling ``∇L`` by
    ``1e-120`` must change neither the number of OPA updates (one per iteration ``n = 1, 2, 3``
    with ``opa_every=1`` and ``max_iter=4``) nor the iterates or the estimate."""
    gen = torch.Generator().manual_seed(0)
    D = 4
    A = 2.0 * torch.eye(D, dtype=DT) + 0.3 * torch.randn(D, D, generator=gen, dtype=DT)
    b = torch.randn(D, generator=gen, dtype=DT)
    w = torch.randn(D, generator=gen, dtype=DT)

    def g(z):
        return A @ z - b

    solver = AdjointBroyden(max_iter=4, tol=0.0, opa_every=1, memory=10, noise_floor=0.0)
    out = [
        solver(g, torch.zeros(D, dtype=DT), outer_grad=lambda z, c=c: c * w) for c in (1.0, 1e-120)
    ]
    assert [r.stats.extra["opa_updates"] for r in out] == [3.0, 3.0]
    torch.testing.assert_close(out[1].value, out[0].value, rtol=1e-10, atol=0.0)
    probe = torch.randn(D, generator=gen, dtype=DT)
    torch.testing.assert_close(
        out[1].inverse.rmatvec(probe), out[0].inverse.rmatvec(probe), rtol=1e-10, atol=0.0
    )


def test_sparse_design_opts_out_of_invariant_checks_explicitly():
    """A loss built from a ``scipy.sparse`` design creates its COO and CSR tensors with an
    explicit ``check_invariants`` choice: torch warns ("Sparse invariant checks are implicitly
    disabled") whenever that argument is left to its default, and it must not here. The design
    is also the scipy one: the margins equal ``X @ w`` computed by scipy."""
    X = sp.random(6, 4, density=0.5, format="csr", random_state=0, dtype=np.float64)
    y = np.array([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = LogisticLoss(X, y)
    finally:
        torch.set_warn_always(previous)
    implicit = [w for w in caught if "implicitly disabled" in str(w.message)]
    assert implicit == []
    w = np.array([0.5, -1.0, 2.0, 0.25])
    margins = loss.margins(torch.from_numpy(w))
    np.testing.assert_allclose(margins.numpy(), X @ w, rtol=1e-14, atol=1e-14)
