"""Strong-Wolfe line search on 1-D functions where every trial step can be derived by hand.

The interpolation helpers are compared with the closed-form minimisers of the quadratic / cubic
through the given values and slopes. The search itself is run on polynomials with exactly
representable values (so that boundary cases of the Wolfe tests and of the value comparisons are
hit exactly), and its trial steps, evaluation counts, returned fields and messages are checked
against Nocedal & Wright Alg. 3.5 / 3.6 as documented in ``shine.solvers.line_search``.
"""

from __future__ import annotations

import math

import pytest
import torch

from shine.solvers.line_search import (
    _cubic_minimizer,
    _interpolate,
    _Point,
    _quadratic_minimizer,
    _secant_minimizer,
    strong_wolfe,
    wolfe_line_search,
)

DT = torch.float64


class Recorded:
    """``φ`` from value and derivative functions; records the trial steps."""

    def __init__(self, f, df):
        self.f, self.df = f, df
        self.alphas: list[float] = []

    def __call__(self, alpha):
        self.alphas.append(alpha)
        return self.f(alpha), self.df(alpha), alpha


def point(alpha, value, deriv):
    return _Point(alpha, value, deriv, None)


# ---------------------------------------------------------------- interpolation helpers


@pytest.mark.parametrize("kappa", [3.0, 0.01])
@pytest.mark.parametrize(("a", "b"), [(0.5, 4.0), (4.0, 0.5), (2.0, 3.0)])
def test_quadratic_minimizer_recovers_the_parabola_vertex(kappa, a, b):
    """φ(a), φ'(a), φ(b) of q(α) = κ(α - 2.5)² + 1 determine q: its vertex 2.5 is returned."""

    def q(t):
        return point(t, kappa * (t - 2.5) ** 2 + 1.0, 2.0 * kappa * (t - 2.5))

    assert _quadratic_minimizer(q(a), q(b)) == pytest.approx(2.5, rel=1e-13)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (point(1.0, 0.0, -1.0), point(1.0, 2.0, 0.0)),  # same abscissa: no interpolant
        (point(0.0, 0.0, -1.0), point(2.0, -3.0, -1.0)),  # below the tangent: concave
        (point(0.0, 0.0, -1.0), point(2.0, -2.0, -1.0)),  # on the tangent: linear, no vertex
        (point(0.0, 0.0, -1.0), point(2.0, math.inf, math.nan)),  # infinite value
    ],
)
def test_quadratic_minimizer_without_a_minimum_is_nan(a, b):
    """Only a strictly convex interpolant has a minimiser; otherwise NaN (bisection follows)."""
    assert math.isnan(_quadratic_minimizer(a, b))


def test_secant_minimizer_is_the_zero_of_the_linear_slope():
    """φ'(α) = 2(α - 1.25) sampled at 0.5 and 3: the secant zero is α = 1.25."""
    a, b = point(0.5, 7.0, -1.5), point(3.0, -4.0, 3.5)  # values do not enter
    assert _secant_minimizer(a, b) == pytest.approx(1.25, rel=1e-15)
    assert _secant_minimizer(b, a) == pytest.approx(1.25, rel=1e-15)


@pytest.mark.parametrize(
    ("da", "db"),
    [(-0.5, -0.25), (-3.0, -2.0), (2.0, 0.5), (-1.0, 0.0), (0.0, 1.0), (-1.0, math.nan)],
)
def test_secant_minimizer_needs_a_sign_change_strictly_inside(da, db):
    """No sign change of φ' (or a zero at an end, which is no new trial point): NaN."""
    assert math.isnan(_secant_minimizer(point(0.0, 0.0, da), point(2.0, 0.0, db)))


def test_cubic_minimizer_closed_forms():
    """Cubics interpolated exactly from two points: local minimiser, saddle, none."""
    # φ = (α - 1)²(α + 2): local minimiser 1 (and maximiser -1)
    f, df = (lambda t: (t - 1) ** 2 * (t + 2)), (lambda t: 3 * t * t - 3)
    for a, b in [(0.0, 3.0), (3.0, 0.0), (-0.5, 2.0)]:
        got = _cubic_minimizer(point(a, f(a), df(a)), point(b, f(b), df(b)))
        assert got == pytest.approx(1.0, rel=1e-13)
    # φ = -(α - 1)³: φ' has a double root at 1 (discriminant exactly 0); the minimiser of the
    # nearby cubics with two stationary points tends to it, so it is returned (all exact here)
    assert _cubic_minimizer(point(0.0, 1.0, -3.0), point(3.0, -8.0, -12.0)) == 1.0
    # φ = -α - α³/3 is strictly decreasing: no stationary point, NaN
    assert math.isnan(_cubic_minimizer(point(0.0, 0.0, -1.0), point(1.0, -4.0 / 3.0, -2.0)))


def test_interpolate_uses_the_secant_when_values_are_equal():
    """φ = α³ - α² - 2α: φ(0) = φ(2) = 0. Equal values (|Δφ| <= value_noise = 0) carry no
    information, so the secant zero of φ' (-2 at 0, 6 at 2) is taken: 0.5, not the cubic's
    minimiser (1 + √7)/3 ≈ 1.215."""
    lo, hi = point(0.0, 0.0, -2.0), point(2.0, 0.0, 6.0)
    assert _interpolate(lo, hi, 0.0) == 0.5
    assert _cubic_minimizer(lo, hi) == pytest.approx((1 + math.sqrt(7)) / 3, rel=1e-13)


def test_interpolate_keeps_a_margin_from_both_ends():
    """The trial stays >= 10 % of the bracket width inside it even when the (exact, quadratic)
    interpolant points next to an end."""
    # φ = (α - 1)², bracket [0, 1.05]: minimiser 1 -> 1.05 - 0.105 = 0.945 (either order)
    a, b = point(0.0, 1.0, -2.0), point(1.05, 0.05**2, 0.1)
    assert _interpolate(b, a, 0.0) == pytest.approx(0.945, rel=1e-14)
    assert _interpolate(a, b, 0.0) == pytest.approx(0.945, rel=1e-14)
    # φ = (α - 0.05)², bracket [0, 1]: minimiser 0.05 -> 0.1
    a, b = point(0.0, 0.0025, -0.1), point(1.0, 0.9025, 1.9)
    assert _interpolate(a, b, 0.0) == pytest.approx(0.1, rel=1e-14)


# ---------------------------------------------------------------- the search on 1-D functions


def test_wolfe_conditions_hold_with_equality_at_the_first_trial():
    """φ = -α + 0.375α², c1 = 0.25, c2 = 0.5: at α = 2, φ = -0.5 = φ(0) + c1·2·φ'(0) and
    φ' = 0.5 = c2|φ'(0)| exactly; both conditions are inclusive, so α = 2 is accepted at once."""
    phi = Recorded(lambda t: -t + 0.375 * t * t, lambda t: -1.0 + 0.75 * t)
    res = strong_wolfe(phi, 0.0, -1.0, alpha_init=2.0, c1=0.25, c2=0.5)
    assert res.success is True and res.message == "ok"
    assert (res.step, res.value, res.derivative, res.n_evals) == (2.0, -0.5, 0.5, 1)


def test_approximate_wolfe_test_and_its_boundaries():
    """Values flat to within value_noise (|φ - φ(0)| = 2⁻²⁰ = noise, inclusive): the Hager-Zhang
    test φ'(α) <= (2c1 - 1)φ'(0) replaces Armijo. φ' = 2(α - 1), c1 = 0.25: bound 1.0, i.e.
    α <= 1.5 (inclusive). α = 1.75 is refused, and the zoom then takes the secant zero α = 1 of
    φ' (the values carry no information)."""
    noise = 2.0**-20

    def run(alpha_init):
        phi = Recorded(lambda t: 1.0 + noise, lambda t: 2.0 * (t - 1.0))
        res = strong_wolfe(phi, 1.0, -2.0, alpha_init=alpha_init, c1=0.25, value_noise=noise)
        return res, phi.alphas

    res, alphas = run(1.5)
    assert res.success and alphas == [1.5] and res.derivative == 1.0
    res, alphas = run(1.75)
    assert res.success and alphas == [1.75, 1.0] and res.step == 1.0


def equal_value_poly(delta):
    """φ = -3 + (α-1)(α-2)r(α) + δ(α-1): φ(0) = -δ, φ'(0) = -1 + δ, φ(1) = -3, φ(2) = -3 + δ,
    φ'(1) = φ'(2) = -2 + δ (all exact), with r = 1.5 + 1.75α - 0.75α² - 0.5α³."""

    def r(t):
        return 1.5 + 1.75 * t - 0.75 * t * t - 0.5 * t**3

    def dr(t):
        return 1.75 - 1.5 * t - 1.5 * t * t

    def f(t):
        return -3.0 + (t - 1.0) * (t - 2.0) * r(t) + delta * (t - 1.0)

    def df(t):
        return (2.0 * t - 3.0) * r(t) + (t - 1.0) * (t - 2.0) * dr(t) + delta

    return f, df


def test_equal_value_is_not_lower_in_exact_mode():
    """Without value noise a later trial is "not lower" when φ(α_i) >= φ(α_{i-1}) (N&W
    Alg. 3.5, inclusive). Trials: α1 = 1 (fails curvature, φ' < 0), α2 = 2 (the cubic
    extrapolant's minimiser ≈ 1.2 is clamped to 2α1); φ(2) = φ(1), so the search zooms into
    [1, 2]: equal values -> secant (no sign change) -> quadratic 1 - φ'(1)/(2·2) = 1.5."""
    f, df = equal_value_poly(0.0)
    phi = Recorded(f, df)
    strong_wolfe(phi, f(0.0), df(0.0), max_ls=3)
    assert phi.alphas == [1.0, 2.0, 1.5]
    # with the budget spent at α2 the best point of sufficient decrease is returned; of the two
    # equal values the first (shorter) step is kept
    phi = Recorded(f, df)
    res = strong_wolfe(phi, f(0.0), df(0.0), max_ls=2)
    assert res.success is False and res.message == "max_ls reached in zoom"
    assert (res.step, res.value, res.derivative, res.n_evals, res.payload) == (
        1.0,
        -3.0,
        -2.0,
        2,
        1.0,
    )


def test_rise_within_value_noise_is_not_a_rise():
    """With value_noise = δ = 2⁻¹⁰, φ(2) - φ(1) = δ exactly is within the noise (inclusive):
    α2 still counts as lower and the bracketing goes on, to 2α2 - α1 = 3 (clamped extrapolant)."""
    delta = 2.0**-10
    f, df = equal_value_poly(delta)
    assert f(2.0) - f(1.0) == delta
    phi = Recorded(f, df)
    res = strong_wolfe(phi, f(0.0), df(0.0), max_ls=3, value_noise=delta)
    assert phi.alphas == [1.0, 2.0, 3.0]
    assert res.message == "max_ls reached while bracketing"


def test_first_trial_is_compared_with_phi0_only_through_armijo():
    """N&W compare φ(α_i) with φ(α_{i-1}) only for i > 1. φ = (α - 1)² with α1 = 2⁻⁶⁰: φ(α1)
    rounds to φ(0) = 1, and so does the Armijo bound, so α1 passes; it fails curvature with
    φ' < 0, hence the search expands to 2α1 (clamped cubic extrapolant) instead of zooming
    back into [0, α1]."""
    phi = Recorded(lambda t: (t - 1.0) ** 2, lambda t: 2.0 * (t - 1.0))
    strong_wolfe(phi, 1.0, -2.0, alpha_init=2.0**-60, max_ls=2)
    assert phi.alphas == [2.0**-60, 2.0**-59]


def test_extrapolation_steps():
    """Bracketing: α_{i+1} = cubic minimiser clamped to [α_i + (α_i - α_{i-1}),
    α_i + 10 (α_i - α_{i-1})], the upper end when the cubic has no minimiser."""
    # φ = -α - α³/3 is its own interpolating cubic and has no stationary point
    phi = Recorded(lambda t: -t - t**3 / 3, lambda t: -1.0 - t * t)
    strong_wolfe(phi, 0.0, -1.0, max_ls=4)
    assert phi.alphas == [1.0, 11.0, 111.0, 1111.0]
    # φ = -(α - 1)³: the cubic's stationary point 1 lies behind, the lower clamp is taken
    phi = Recorded(lambda t: -((t - 1.0) ** 3), lambda t: -3.0 * (t - 1.0) ** 2)
    strong_wolfe(phi, 1.0, -3.0, alpha_init=3.0, max_ls=3)
    assert phi.alphas == [3.0, 6.0, 9.0]


def test_defaults_linear_descent_stops_at_alpha_max():
    """φ = -α (no Wolfe step): from the default α1 = 1 the steps grow 1, 11, 111, ... (upper
    clamp, the linear data have no cubic minimiser) until the 11th trial is cut to the default
    alpha_max = 1e10, within the default budget of 20."""
    phi = Recorded(lambda t: -t, lambda t: -1.0)
    res = strong_wolfe(phi, 0.0, -1.0)
    assert phi.alphas[:3] == [1.0, 11.0, 111.0] and phi.alphas[-1] == 1e10
    assert res.success is False and res.message == "alpha_max reached"
    assert (res.step, res.value, res.derivative, res.n_evals, res.payload) == (
        1e10,
        -1e10,
        -1.0,
        11,
        1e10,
    )


def test_defaults_budget_is_20_evaluations():
    """Values all equal to φ(0) and no value noise: no step passes Armijo, the bracket [0, α]
    halves each time (secant: φ'(α) = 0 at the first hi gives no sign change; quadratic:
    vertex at half the bracket), and the default budget of 20 evaluations is spent."""
    phi = Recorded(lambda t: 1.0, lambda t: 2.0 * (t - 1.0))
    res = strong_wolfe(phi, 1.0, -2.0)
    assert phi.alphas[:4] == [1.0, 0.5, 0.25, 0.125]
    assert res.n_evals == len(phi.alphas) == 20
    assert res.success is False and res.message == "max_ls reached in zoom"
    assert (res.step, res.value, res.derivative, res.payload) == (0.0, 1.0, -2.0, None)


def test_budget_counts_every_evaluation_while_bracketing():
    phi = Recorded(lambda t: -t, lambda t: -1.0)
    res = strong_wolfe(phi, 0.0, -1.0, max_ls=3)
    assert res.n_evals == len(phi.alphas) == 3
    assert res.message == "max_ls reached while bracketing" and res.success is False
    assert (res.step, res.value, res.derivative) == (111.0, -111.0, -1.0)


def cliff(t):
    """φ = -α below t, +inf from t on (e.g. a barrier); φ' = -1 fails curvature everywhere."""
    return Recorded(lambda a: -a if a < t else math.inf, lambda a: -1.0)


@pytest.mark.parametrize(
    ("scale", "k", "multiple"),
    [(1.0, 40, 1.0), (2.0**-990, 37, 8.0)],
)
def test_bracket_collapses_relative_to_its_larger_end(scale, k, multiple):
    """α1 = 2⁻¹⁰·s hits the cliff at t = (10¹² - ½)·2⁻⁵⁰·s; hi has an infinite value, so every
    zoom step bisects and lo, hi stay consecutive multiples of w_k = 2⁻¹⁰⁻ᵏ·s. The bracket
    collapses at the first w_k <= 1e-12·max(lo, hi, 1e-300).

    s = 1: after k = 40 bisections lo = (10¹² - 1)·2⁻⁵⁰ < t < hi = 10¹²·2⁻⁵⁰ and the width 2⁻⁵⁰
    equals 1e-12·hi exactly (fl(1e-12·10¹²) = 1): collapse (inclusive) after 1 + 40 evaluations.
    s = 2⁻⁹⁹⁰: the steps are below 1e-300, so the threshold is the floor 1e-312, first reached
    at w = 2⁻¹⁰³⁷ ≈ 7.3e-313 (k = 37); lo is then the largest multiple of 8·2⁻¹⁰⁴⁰ below t."""
    assert 1e-12 * 1e12 == 1.0
    phi = cliff((1e12 - 0.5) * 2.0**-50 * scale)
    res = strong_wolfe(phi, 0.0, -1.0, alpha_init=2.0**-10 * scale, max_ls=60)
    assert res.message == "bracket collapsed" and res.success is False
    lo = (1e12 - multiple) * 2.0**-50 * scale
    assert (res.step, res.value, res.n_evals, res.payload) == (lo, -lo, 1 + k, lo)


def test_bracket_collapse_when_the_larger_end_is_lo():
    """Mirror image: α1 = L = 10¹²·2⁻⁵⁰ has sufficient decrease and φ'(L) = 2 > 0, so the zoom
    runs on [0, L] with lo = L on the right; φ = +inf everywhere else on (0, L). φ(L) is tuned
    (found by bisection over floats) so that the cubic on [0, L] puts the first zoom trial
    exactly at L - 2⁻¹²; the later trials bisect [hi, L]. After 38 bisections the width is
    2⁻⁵⁰ = 1e-12·L = 1e-12·max(lo, hi): collapse after 2 + 38 evaluations, returning L."""
    big = 1e12 * 2.0**-50
    value_at_big = -0.0004288243111599907

    def f(a):
        return value_at_big if a == big else math.inf

    phi = Recorded(f, lambda a: 2.0 if a == big else math.nan)
    res = strong_wolfe(phi, 0.0, -1.0, alpha_init=big, max_ls=60)
    assert phi.alphas[:3] == [big, big - 2.0**-12, big - 2.0**-13]
    assert res.message == "bracket collapsed" and res.n_evals == 40
    assert (res.step, res.value, res.derivative) == (big, value_at_big, 2.0)


@pytest.mark.parametrize("where", ["bracketing", "zoom"])
def test_non_finite_derivative_stops_the_search(where):
    """A trial of sufficient decrease whose φ' is NaN cannot be tested for curvature: the
    search stops, and since such a point is never returned, with step 0."""
    if where == "bracketing":  # first trial α = 0.5
        phi = Recorded(lambda t: (t - 1.0) ** 2, lambda t: math.nan)
        res = strong_wolfe(phi, 1.0, -2.0, alpha_init=0.5)
    else:  # α1 = 3 fails Armijo; the cubic on [0, 3] gives the minimiser 1, where φ' is NaN
        phi = Recorded(lambda t: (t - 1.0) ** 2, lambda t: 2.0 * (t - 1.0) if t > 2 else math.nan)
        res = strong_wolfe(phi, 1.0, -2.0, alpha_init=3.0)
        assert phi.alphas == [3.0, 1.0]
    assert res.message == "non-finite derivative" and res.success is False
    assert (res.step, res.value, res.derivative, res.payload) == (0.0, 1.0, -2.0, None)


@pytest.mark.parametrize(
    ("phi0", "dphi0"), [(1.0, 0.0), (1.0, 0.5), (math.nan, -1.0), (math.inf, -1.0)]
)
def test_not_a_descent_direction_returns_the_origin(phi0, dphi0):
    """φ'(0) must be negative and φ(0), φ'(0) finite; otherwise nothing is evaluated."""
    calls = []
    res = strong_wolfe(lambda a: calls.append(a) or (0.0, -1.0, a), phi0, dphi0)
    assert not calls and res.message == "not a descent direction"
    assert res.success is False and res.step == 0.0 and res.n_evals == 0
    assert res.derivative == dphi0 and res.value is phi0


def test_parameter_checks():
    """0 < c1 < c2 < 1 strictly; alpha_max > 0 (any positive value, also below 1)."""
    phi = Recorded(lambda t: (t - 1.0) ** 2, lambda t: 2.0 * (t - 1.0))
    with pytest.raises(ValueError, match="c1 < c2"):
        strong_wolfe(phi, 1.0, -2.0, c1=0.5, c2=0.5)
    with pytest.raises(ValueError, match="alpha_max must be positive"):
        strong_wolfe(phi, 1.0, -2.0, alpha_max=0.0)
    res = strong_wolfe(phi, 1.0, -2.0, alpha_max=0.5)
    assert res.success and res.step == 0.5 and phi.alphas == [0.5]


# ---------------------------------------------------------------- the n-D wrapper


def newton_quadratic():
    """r(z) = ½zᵀAz - bᵀz from z = 0 along the Newton direction p = A⁻¹b: φ(α) is a parabola
    with φ'(α) = (α - 1)φ'(0); the strong Wolfe set is 1 - c2 <= α <= 1 + c2 intersected with
    the Armijo set α <= 2(1 - c1)."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(4, 4, dtype=DT, generator=gen)
    A = M @ M.T + torch.eye(4, dtype=DT)
    b = torch.randn(4, dtype=DT, generator=gen)
    calls = []

    def fun(z):
        calls.append(z.clone())
        return 0.5 * z @ A @ z - b @ z, A @ z - b

    z = torch.zeros(4, dtype=DT)
    value, grad = fun(z)
    calls.clear()
    return fun, z, torch.linalg.solve(A, b), value, grad, calls


def test_wrapper_defaults_accept_the_unit_newton_step():
    fun, z, p, value, grad, calls = newton_quadratic()
    res = wolfe_line_search(fun, z, p, value, grad)
    assert res.success and res.n_evals == 1 and res.step == 1.0
    torch.testing.assert_close(calls[0], p)


def test_wrapper_forwards_every_setting():
    fun, z, p, value, grad, calls = newton_quadratic()
    res = wolfe_line_search(fun, z, p, value, grad, alpha_init=0.25)
    torch.testing.assert_close(calls[0], 0.25 * p)  # first trial z + α_init p
    assert res.success and res.step == 0.25 and res.n_evals == 1  # 0.25 >= 1 - c2 = 0.1
    res = wolfe_line_search(fun, z, p, value, grad, c1=0.6)
    assert res.success and 0.1 <= res.step <= 2 * (1 - 0.6) + 1e-12
    res = wolfe_line_search(fun, z, p, value, grad, alpha_init=0.5, c2=0.1)
    assert res.success and abs(res.step - 1.0) <= 0.1 + 1e-12
    res = wolfe_line_search(fun, z, p, value, grad, alpha_init=3.0, max_ls=1)
    assert res.n_evals == 1 and not res.success  # α = 3 > 2(1 - c1): no sufficient decrease
    res = wolfe_line_search(fun, z, p, value, grad, alpha_max=0.5)
    assert res.success and res.step == 0.5


def test_wrapper_default_value_noise_and_budget():
    """r constant (rounding hides the decrease), ∇r(z) = z - 1: along p = 1, φ'(α) = 4(α - 1).
    The default value noise 100·eps·|r| enables the approximate Wolfe test, which accepts α = 1;
    exact comparisons (value_noise = 0) find no sufficient decrease within the default 20."""

    def fun(z):
        return torch.tensor(1.0, dtype=DT), z - 1.0

    z = torch.zeros(4, dtype=DT)
    value, grad = fun(z)
    res = wolfe_line_search(fun, z, -grad, value, grad)
    assert res.success and res.step == 1.0 and res.n_evals == 1
    res = wolfe_line_search(fun, z, -grad, value, grad, value_noise=0.0)
    assert not res.success and res.step == 0.0 and res.n_evals == 20


def test_wrapper_default_alpha_max():
    """r(z) = -Σz along p = 1: φ = -4α, the bracketing steps are cut at alpha_max = 1e10."""

    def fun(z):
        return -z.sum(), -torch.ones_like(z)

    z = torch.zeros(4, dtype=DT)
    value, grad = fun(z)
    res = wolfe_line_search(fun, z, -grad, value, grad)
    assert res.message == "alpha_max reached" and res.step == 1e10
    torch.testing.assert_close(res.payload.z, torch.full((4,), 1e10, dtype=DT))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_zoom_orientation_survives_underflow(sign):
    """The zoom keeps φ'(lo)·(hi - lo) < 0 from the sign of φ'(new)·(hi - lo), also when that
    product underflows (|φ'| = 2⁻⁶⁰⁰, bracket 2⁻⁴⁸⁰: product 2⁻¹⁰⁸⁰ < 2⁻¹⁰⁷⁴). α1 fails Armijo
    (φ = 1), the quadratic on [0, α1] is clamped to 0.1·α1, which has sufficient decrease and
    fails curvature (|φ'| = |φ'(0)| > c2|φ'(0)|): φ' > 0 there puts the minimiser to its left
    (next trial in [0, 0.1·α1]), φ' < 0 to its right (next trial in [0.1·α1, α1])."""
    a1, slope = 2.0**-480, 2.0**-600
    assert slope * (0.9 * a1) == 0.0
    phi = Recorded(
        lambda t: 1.0 if t == a1 else -1.0, lambda t: math.nan if t == a1 else sign * slope
    )
    strong_wolfe(phi, 0.0, -slope, alpha_init=a1, max_ls=3)
    assert phi.alphas[:2] == [a1, pytest.approx(0.1 * a1, rel=1e-15)]
    assert (phi.alphas[2] < phi.alphas[1]) == (sign > 0)
