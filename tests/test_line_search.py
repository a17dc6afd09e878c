"""Strong-Wolfe line search: accepted steps satisfy the conditions, failures are reported."""

from __future__ import annotations

import math

import pytest
import torch
from deq_problems import DT

from shine.solvers.line_search import TrialPoint, strong_wolfe, wolfe_line_search


class Counted:
    """``φ`` from a value and a derivative function; records the trial steps."""

    def __init__(self, f, df):
        self.f, self.df = f, df
        self.alphas: list[float] = []

    def __call__(self, alpha):
        self.alphas.append(alpha)
        return self.f(alpha), self.df(alpha), ("payload", alpha)


def wolfe_ok(f, df, alpha, c1, c2):
    armijo = f(alpha) <= f(0.0) + c1 * alpha * df(0.0)
    curvature = abs(df(alpha)) <= c2 * abs(df(0.0))
    return armijo, curvature


def quartic():
    # φ(α) = α⁴/4 - α: minimiser α* = 1, φ'(0) = -1
    return (lambda a: a**4 / 4 - a), (lambda a: a**3 - 1)


@pytest.mark.parametrize(
    ("alpha_init", "c1", "c2"),
    [(1.0, 1e-4, 0.9), (0.01, 1e-4, 0.9), (30.0, 1e-4, 0.9), (0.01, 0.1, 0.2), (5.0, 0.3, 0.4)],
)
def test_step_satisfies_strong_wolfe(alpha_init, c1, c2):
    f, df = quartic()
    phi = Counted(f, df)
    res = strong_wolfe(phi, f(0.0), df(0.0), alpha_init=alpha_init, c1=c1, c2=c2, max_ls=30)
    assert res.success and res.message == "ok"
    assert res.step > 0
    assert wolfe_ok(f, df, res.step, c1, c2) == (True, True)
    # the result carries φ, φ' and the payload of the accepted step; no re-evaluation needed
    assert res.value == f(res.step) and res.derivative == df(res.step)
    assert res.payload == ("payload", res.step)
    assert res.n_evals == len(phi.alphas) and res.step in phi.alphas


def test_tight_curvature_finds_minimiser():
    f, df = quartic()
    res = strong_wolfe(Counted(f, df), f(0.0), df(0.0), alpha_init=0.1, c1=1e-7, c2=1e-6)
    assert res.success
    assert abs(res.step - 1.0) < 1e-6  # |φ'(α)| <= 1e-6 forces α ≈ α* = 1


def test_armijo_is_enforced_without_value_noise():
    # φ(α) = e^{-5α}/5 decreases only near 0: at α = 2 the value went down and |φ'| is tiny, but
    # the decrease (≈ 0.2) is far below the sufficient decrease c1·α·|φ'(0)| = 0.6.
    f = lambda a: math.exp(-5 * a) / 5  # noqa: E731
    df = lambda a: -math.exp(-5 * a)  # noqa: E731
    c1, c2 = 0.3, 0.9
    res = strong_wolfe(Counted(f, df), f(0.0), df(0.0), alpha_init=2.0, c1=c1, c2=c2)
    assert res.success
    assert wolfe_ok(f, df, res.step, c1, c2) == (True, True)
    assert res.step < 2.0


def test_value_noise_enables_approximate_wolfe():
    # values carry no information (all equal to φ(0), as when rounding hides the decrease);
    # the derivatives are those of (α - 1)²
    f = lambda a: 1.0  # noqa: E731
    df = lambda a: 2.0 * (a - 1.0)  # noqa: E731
    exact = strong_wolfe(Counted(f, df), 1.0, -2.0, max_ls=10)
    assert not exact.success and exact.step == 0.0 and exact.payload is None
    noisy = strong_wolfe(Counted(f, df), 1.0, -2.0, max_ls=10, value_noise=1e-12)
    assert noisy.success and noisy.step == 1.0


def test_not_a_descent_direction():
    calls = []
    res = strong_wolfe(lambda a: calls.append(a) or (0.0, 0.0, None), 1.0, 0.5)
    assert not res.success and res.message == "not a descent direction"
    assert res.step == 0.0 and res.payload is None and res.n_evals == 0 and not calls


def test_no_sufficient_decrease_returns_zero_step():
    f, df = quartic()
    # α = 100 is far past the minimiser and one evaluation leaves no room to zoom
    res = strong_wolfe(Counted(f, df), f(0.0), df(0.0), alpha_init=100.0, max_ls=1)
    assert not res.success and "max_ls" in res.message
    assert res.step == 0.0 and res.payload is None and res.n_evals == 1
    assert res.value == f(0.0) and res.derivative == df(0.0)


@pytest.mark.parametrize(("alpha_max", "message"), [(1e10, "max_ls"), (4.0, "alpha_max")])
def test_unbounded_below_returns_best_armijo_point(alpha_max, message):
    # φ(α) = -α: every step has sufficient decrease, none the curvature condition
    f = lambda a: -a  # noqa: E731
    df = lambda a: -1.0  # noqa: E731
    phi = Counted(f, df)
    res = strong_wolfe(phi, 0.0, -1.0, alpha_init=1.0, max_ls=6, alpha_max=alpha_max)
    assert not res.success and message in res.message
    assert res.step == max(phi.alphas) > 1.0  # lowest value among the evaluated points
    assert res.payload == ("payload", res.step)
    assert res.step <= alpha_max


def test_non_finite_value_is_backtracked():
    # φ = +inf beyond α = 2 (e.g. a log barrier): the search must zoom back
    f = lambda a: (a - 1.0) ** 2 if a < 2.0 else math.inf  # noqa: E731
    df = lambda a: 2.0 * (a - 1.0) if a < 2.0 else math.nan  # noqa: E731
    res = strong_wolfe(Counted(f, df), 1.0, -2.0, alpha_init=10.0, c1=1e-4, c2=0.5)
    assert res.success and res.step < 2.0
    assert wolfe_ok(f, df, res.step, 1e-4, 0.5) == (True, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"c1": 0.5, "c2": 0.4},
        {"c1": 0.0, "c2": 0.9},
        {"c1": 1e-4, "c2": 1.0},
        {"max_ls": 0},
        {"alpha_max": 0.0},
        {"alpha_init": 0.0},
    ],
)
def test_invalid_parameters(kwargs):
    f, df = quartic()
    with pytest.raises(ValueError):
        strong_wolfe(Counted(f, df), f(0.0), df(0.0), **kwargs)


def test_nd_wrapper_on_quadratic():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, dtype=DT, generator=gen)
    A = M @ M.T + torch.eye(6, dtype=DT)
    b = torch.randn(6, dtype=DT, generator=gen)

    def fun(z):
        return 0.5 * z @ A @ z - b @ z, A @ z - b

    z = torch.zeros(6, dtype=DT)
    value, grad = fun(z)
    p = -grad
    c1, c2 = 1e-4, 0.1
    res = wolfe_line_search(fun, z, p, value, grad, c1=c1, c2=c2)
    assert res.success
    point = res.payload
    assert isinstance(point, TrialPoint)
    torch.testing.assert_close(point.z, z + res.step * p)
    v_new, g_new = fun(point.z)
    torch.testing.assert_close(point.value, v_new)
    torch.testing.assert_close(point.grad, g_new)
    # strong Wolfe in n-D; exact line minimiser is α* = ‖g‖²/(gᵀA g)
    assert float(v_new) <= float(value) + c1 * res.step * float(grad @ p)
    assert abs(float(g_new @ p)) <= c2 * abs(float(grad @ p))
    alpha_star = float(grad @ grad / (grad @ A @ grad))
    assert abs(res.step - alpha_star) <= 0.2 * alpha_star
