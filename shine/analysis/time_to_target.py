"""Time to reach an acceptable loss: the one definition shared by the bi-level scripts.

The paper's headline bi-level number ("an acceptable level of performance is reached twice
faster", §3.1) is, here, the time at which a run's held-out loss first comes within a relative
margin of the best held-out loss of that seed (over every method compared):

* :func:`time_to_within` — for one run (one seed, one method), the cumulative time of the first
  logged step whose loss is ``<= best + rel·|best|`` (non-finite losses never count); ``inf``
  when the run never gets there (:func:`first_within` gives the index of that step);
* :func:`median_or_nan` — the median over seeds, ``inf`` counting as "never": NaN when the
  median seed never gets there (or there is no value).

Used by ``scripts/bench_bilevel.py`` (benchmark) and ``scripts/fig_bilevel.py`` (``summary.csv``
of Figures 1, E.1, 2 left, E.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: the relative margins reported everywhere: 1 % and 0.1 % of the best loss
TARGETS: dict[str, float] = {"1pct": 1e-2, "0p1pct": 1e-3}


def threshold(best: float, rel: float) -> float:
    """The loss to reach: ``best + rel·|best|`` (also right for a negative ``best``)."""
    return best + rel * abs(best)


def first_within(losses: Sequence[float] | np.ndarray, best: float, rel: float) -> int | None:
    """Index of the first finite loss ``<= best + rel·|best|``, or ``None`` if there is none."""
    loss = np.asarray(losses, float).reshape(-1)
    hit = np.flatnonzero(np.isfinite(loss) & (loss <= threshold(best, rel)))
    return int(hit[0]) if hit.size else None


def time_to_within(
    times: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    best: float,
    rel: float,
) -> float:
    """Time of the first step whose loss is within ``rel`` (relative) of ``best``.

    Args:
        times: cumulative time of each logged step, in step order.
        losses: the loss at each step (NaN/inf entries are skipped).
        best: the reference (best) loss.
        rel: relative margin, e.g. ``1e-2`` for "within 1 %".

    Returns:
        The time, or ``inf`` if no step gets there.

    Raises:
        ValueError: if ``times`` and ``losses`` have different lengths.
    """
    t = np.asarray(times, float).reshape(-1)
    if t.size != np.asarray(losses).size:
        raise ValueError(f"{t.size} times for {np.asarray(losses).size} losses")
    i = first_within(losses, best, rel)
    return math.inf if i is None else float(t[i])


def median_or_nan(values: Sequence[float] | np.ndarray) -> float:
    """Median with ``inf`` = never; NaN when the median seed never gets there (or no value)."""
    arr = np.asarray(values, float).reshape(-1)
    if not arr.size:
        return math.nan
    med = float(np.median(arr))
    return med if math.isfinite(med) else math.nan
