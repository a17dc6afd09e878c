"""Strong-Wolfe line search (Nocedal & Wright, *Numerical Optimization*, Alg. 3.5 and 3.6).

Given a smooth objective ``r: R^D -> R``, a point ``z`` and a descent direction ``p``
(``∇r(z)ᵀp < 0``), the line search looks for a step ``α > 0`` on the one-dimensional function
``φ(α) = r(z + α p)`` that satisfies the *strong Wolfe conditions*::

    φ(α) <= φ(0) + c1 α φ'(0)            (sufficient decrease, "Armijo")
    |φ'(α)| <= c2 |φ'(0)|                 (curvature)

with ``0 < c1 < c2 < 1``. The bracketing phase (Alg. 3.5) expands the trial step until an
interval containing acceptable steps is found; the zoom phase (Alg. 3.6) shrinks it with
safeguarded cubic (then quadratic, then bisection) interpolation.

Every evaluation of ``φ`` returns its value, its derivative and an opaque *payload* (for the
n-D wrapper: the trial point, the objective value and the gradient), so that the caller never has
to re-evaluate the objective at the accepted step.

On failure (budget ``max_ls`` exhausted, interval collapsed, non-descent direction) the search
never returns an arbitrary step: it returns the evaluated step with the lowest value among those
satisfying the sufficient-decrease condition, flagged ``success=False``; if there is none, it
returns ``step=0`` (stay at ``z``) with ``payload=None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from shine.solvers.base import ObjectiveFn

logger = logging.getLogger(__name__)

#: A 1-D function for the line search: ``α -> (φ(α), φ'(α), payload)``.
Phi = Callable[[float], tuple[float, float, Any]]

# Safeguard of the interpolation in the zoom phase: a trial step is kept at least this fraction
# of the bracket width away from both bracket ends.
_MARGIN = 0.1
# Bracketing phase: next trial in [α_i + _EXTRAP_MIN (α_i - α_{i-1}), α_i + _EXTRAP_MAX (...)].
_EXTRAP_MIN = 1.0
_EXTRAP_MAX = 10.0
# Rounding level of objective values, in units of eps(dtype)·|φ(0)| (see default_value_noise).
_NOISE_ULPS = 100.0


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of a line search.

    Attributes:
        step: the accepted step ``α`` (``0.0`` when no point of sufficient decrease was found).
        value: ``φ(step)``.
        derivative: ``φ'(step)``.
        n_evals: number of evaluations of ``φ``.
        success: whether ``step`` satisfies the strong Wolfe conditions.
        message: why the search stopped (``"ok"`` on success).
        payload: what ``φ`` returned for ``step`` (``None`` when ``step == 0``). For
            :func:`wolfe_line_search` it is a :class:`TrialPoint`.
    """

    step: float
    value: float
    derivative: float
    n_evals: int
    success: bool
    message: str = "ok"
    payload: Any = None


class TrialPoint(NamedTuple):
    """An evaluated point of an n-D line search.

    Attributes:
        z: the point ``z + α p``, shape ``(D,)``.
        value: ``r(z + α p)``, scalar tensor.
        grad: ``∇r(z + α p)``, shape ``(D,)``.
    """

    z: Tensor
    value: Tensor
    grad: Tensor


class _Point(NamedTuple):
    alpha: float
    value: float
    deriv: float
    payload: Any


def _cubic_minimizer(a: _Point, b: _Point) -> float:
    """Minimiser of the cubic interpolating ``φ`` and ``φ'`` at ``a`` and ``b`` (NaN if none).

    Nocedal & Wright eq. (3.59).
    """
    if a.alpha == b.alpha:
        return math.nan
    d1 = a.deriv + b.deriv - 3.0 * (a.value - b.value) / (a.alpha - b.alpha)
    disc = d1 * d1 - a.deriv * b.deriv
    if not math.isfinite(disc) or disc < 0.0:
        return math.nan
    d2 = math.copysign(math.sqrt(disc), b.alpha - a.alpha)
    denom = b.deriv - a.deriv + 2.0 * d2
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    return b.alpha - (b.alpha - a.alpha) * (b.deriv + d2 - d1) / denom


def _quadratic_minimizer(a: _Point, b: _Point) -> float:
    """Minimiser of the quadratic through ``φ(a)``, ``φ'(a)`` and ``φ(b)`` (NaN if none)."""
    h = b.alpha - a.alpha
    curv = b.value - a.value - a.deriv * h
    if h == 0.0 or not math.isfinite(curv) or curv <= 0.0:
        return math.nan
    return a.alpha - a.deriv * h * h / (2.0 * curv)


def _secant_minimizer(a: _Point, b: _Point) -> float:
    """Zero of the linear interpolant of ``φ'`` between ``a`` and ``b`` (NaN if none)."""
    if not (math.isfinite(a.deriv) and math.isfinite(b.deriv)) or a.deriv * b.deriv >= 0.0:
        return math.nan
    return a.alpha - a.deriv * (b.alpha - a.alpha) / (b.deriv - a.deriv)


def _interpolate(lo: _Point, hi: _Point, value_noise: float) -> float:
    """Next trial step inside the bracket ``[lo, hi]`` (either order).

    Cubic interpolation (values and derivatives at both ends), else quadratic (value and
    derivative at ``lo``, value at ``hi``), else bisection; when the two values differ by at
    most ``value_noise`` they carry no information and the secant step on the derivatives is
    used instead. The result is clamped to stay at least ``_MARGIN`` times the bracket width
    away from both ends, so the bracket shrinks by a fixed factor even when the interpolant
    points at an end.
    """
    alpha = math.nan
    if abs(hi.value - lo.value) <= value_noise:
        alpha = _secant_minimizer(lo, hi)
    elif math.isfinite(hi.value) and math.isfinite(hi.deriv):
        alpha = _cubic_minimizer(lo, hi)
    if not math.isfinite(alpha) and math.isfinite(hi.value):
        alpha = _quadratic_minimizer(lo, hi)
    left, right = min(lo.alpha, hi.alpha), max(lo.alpha, hi.alpha)
    if not math.isfinite(alpha):
        return 0.5 * (left + right)
    width = right - left
    return min(max(alpha, left + _MARGIN * width), right - _MARGIN * width)


def strong_wolfe(
    phi: Phi,
    phi0: float,
    dphi0: float,
    *,
    alpha_init: float = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_ls: int = 20,
    alpha_max: float = 1e10,
    value_noise: float = 0.0,
) -> LineSearchResult:
    """Find a step satisfying the strong Wolfe conditions on a 1-D function.

    Implements Nocedal & Wright Alg. 3.5 (bracketing) and 3.6 (zoom) with safeguarded cubic,
    quadratic and bisection interpolation.

    Args:
        phi: ``α -> (φ(α), φ'(α), payload)``; ``φ(α) = r(z + α p)``, ``φ'(α) = ∇r(z + α p)ᵀp``.
        phi0: ``φ(0)``.
        dphi0: ``φ'(0)``; must be negative (``p`` a descent direction).
        alpha_init: first trial step (``> 0``).
        c1: sufficient-decrease constant, ``0 < c1 < c2``.
        c2: curvature constant, ``c1 < c2 < 1``.
        max_ls: maximum number of evaluations of ``phi``.
        alpha_max: largest step allowed.
        value_noise: absolute rounding level of the values of ``φ`` (default 0: exact
            Nocedal & Wright). When ``|φ(α) - φ(0)| <= value_noise`` the sufficient decrease
            cannot be tested on values, and the *approximate* Wolfe test of Hager & Zhang (2005),
            ``φ'(α) <= (2 c1 - 1) φ'(0)`` (equivalent for a quadratic), is used instead; values
            closer than ``value_noise`` are also treated as equal when comparing trial points.
            This lets the search succeed near a minimiser, where decreases fall below rounding.

    Returns:
        A :class:`LineSearchResult`. On failure the result holds the evaluated step with the
        lowest value among those satisfying the sufficient-decrease condition, or ``step=0``
        (``payload=None``) if there is none, and ``success=False``.

    Raises:
        ValueError: if the constants are inconsistent.
    """
    if not 0.0 < c1 < c2 < 1.0:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if max_ls < 1:
        raise ValueError(f"max_ls must be >= 1, got {max_ls}")
    if not alpha_max > 0.0:
        raise ValueError(f"alpha_max must be positive, got {alpha_max}")

    origin = _Point(0.0, phi0, dphi0, None)
    if not (math.isfinite(phi0) and math.isfinite(dphi0)) or dphi0 >= 0.0:
        return LineSearchResult(0.0, phi0, dphi0, 0, False, "not a descent direction")

    n_evals = 0
    best: _Point | None = None  # lowest-value point satisfying the sufficient decrease

    def evaluate(alpha: float) -> _Point:
        nonlocal n_evals, best
        value, deriv, payload = phi(alpha)
        n_evals += 1
        if not math.isfinite(value):
            value = math.inf
        if not math.isfinite(deriv):
            deriv = math.nan
        point = _Point(alpha, value, deriv, payload)
        if (
            armijo(point)
            and math.isfinite(point.deriv)
            and (best is None or point.value < best.value)
        ):
            best = point
        return point

    def armijo(point: _Point) -> bool:
        if point.value <= phi0 + c1 * point.alpha * dphi0:
            return True
        # approximate Wolfe test, only where the values cannot resolve the decrease
        return (
            value_noise > 0.0
            and abs(point.value - phi0) <= value_noise
            and point.deriv <= (2.0 * c1 - 1.0) * dphi0
        )

    def not_lower(a: _Point, b: _Point) -> bool:
        """Whether ``a`` counts as not lower than ``b`` (``a > b + value_noise`` with noise)."""
        if value_noise > 0.0:
            return a.value - b.value > value_noise
        return a.value >= b.value

    def curvature(point: _Point) -> bool:
        return abs(point.deriv) <= -c2 * dphi0

    def done(point: _Point) -> LineSearchResult:
        return LineSearchResult(
            point.alpha, point.value, point.deriv, n_evals, True, "ok", point.payload
        )

    def fail(message: str) -> LineSearchResult:
        logger.debug("line search failed (%s) after %d evaluations", message, n_evals)
        if best is None:
            return LineSearchResult(0.0, phi0, dphi0, n_evals, False, message)
        return LineSearchResult(
            best.alpha, best.value, best.deriv, n_evals, False, message, best.payload
        )

    def zoom(lo: _Point, hi: _Point) -> LineSearchResult:
        # Invariants (N&W): lo satisfies the sufficient decrease and has the lowest value seen
        # among such points; φ'(lo)·(hi - lo) < 0; the bracket contains Wolfe steps.
        while n_evals < max_ls:
            width = abs(hi.alpha - lo.alpha)
            if width <= 1e-12 * max(lo.alpha, hi.alpha, 1e-300):
                return fail("bracket collapsed")
            alpha = _interpolate(lo, hi, value_noise)
            new = evaluate(alpha)
            if not armijo(new) or not_lower(new, lo):
                hi = new
            else:
                if curvature(new):
                    return done(new)
                if not math.isfinite(new.deriv):
                    return fail("non-finite derivative")
                # signs compared directly: the product φ'(new)·(hi - lo) may underflow to ±0
                if (new.deriv > 0.0) == (hi.alpha > lo.alpha):
                    hi = lo
                lo = new
        return fail("max_ls reached in zoom")

    prev = origin
    alpha = min(alpha_init, alpha_max)
    if not alpha > 0.0:
        raise ValueError(f"alpha_init must be positive, got {alpha_init}")
    first = True
    while True:
        cur = evaluate(alpha)
        if not armijo(cur) or (not first and not_lower(cur, prev)):
            return zoom(prev, cur)
        if curvature(cur):
            return done(cur)
        if not math.isfinite(cur.deriv):
            return fail("non-finite derivative")
        if cur.deriv >= 0.0:
            return zoom(cur, prev)
        if cur.alpha >= alpha_max:
            return fail("alpha_max reached")
        if n_evals >= max_ls:
            return fail("max_ls reached while bracketing")
        # Extrapolate: cubic minimiser, safeguarded to a bounded expansion of the step.
        lo_b = cur.alpha + _EXTRAP_MIN * (cur.alpha - prev.alpha)
        hi_b = cur.alpha + _EXTRAP_MAX * (cur.alpha - prev.alpha)
        cand = _cubic_minimizer(prev, cur)
        alpha = hi_b if not math.isfinite(cand) else min(max(cand, lo_b), hi_b)
        alpha = min(alpha, alpha_max)
        prev = cur
        first = False


def default_value_noise(value: float, dtype: torch.dtype) -> float:
    """Rounding level assumed for objective values: ``100 · eps(dtype) · |value|``."""
    return _NOISE_ULPS * torch.finfo(dtype).eps * abs(value)


def wolfe_line_search(
    fun: ObjectiveFn,
    z: Tensor,
    p: Tensor,
    value: Tensor | float,
    grad: Tensor,
    *,
    alpha_init: float = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_ls: int = 20,
    alpha_max: float = 1e10,
    value_noise: float | None = None,
) -> LineSearchResult:
    """Strong-Wolfe line search for ``min_α r(z + α p)`` with an n-D objective.

    Builds ``φ(α) = r(z + α p)``, ``φ'(α) = ∇r(z + α p)ᵀ p`` from ``fun`` (one call to ``fun``
    per trial step) and runs :func:`strong_wolfe`.

    Args:
        fun: ``z (D,) -> (r(z) scalar tensor, ∇r(z) (D,))``.
        z: current point, shape ``(D,)``.
        p: search direction, shape ``(D,)``.
        value: ``r(z)``.
        grad: ``∇r(z)``, shape ``(D,)``.
        alpha_init: first trial step.
        c1: sufficient-decrease constant.
        c2: curvature constant.
        max_ls: maximum number of evaluations of ``fun``.
        alpha_max: largest step allowed.
        value_noise: see :func:`strong_wolfe`; ``None`` uses :func:`default_value_noise`.

    Returns:
        A :class:`LineSearchResult` whose ``payload`` is the :class:`TrialPoint`
        ``(z + step·p, r, ∇r)`` at the returned step, or ``None`` if ``step == 0``.
    """

    def phi(alpha: float) -> tuple[float, float, TrialPoint]:
        z_new = torch.add(z, p, alpha=alpha)
        f_new, g_new = fun(z_new)
        f_new, g_new = f_new.detach(), g_new.detach()
        return float(f_new), float(torch.dot(g_new, p)), TrialPoint(z_new, f_new, g_new)

    phi0 = float(value)
    if value_noise is None:
        value_noise = default_value_noise(phi0, z.dtype)
    return strong_wolfe(
        phi,
        phi0,
        float(torch.dot(grad, p)),
        alpha_init=alpha_init,
        c1=c1,
        c2=c2,
        max_ls=max_ls,
        alpha_max=alpha_max,
        value_noise=value_noise,
    )
