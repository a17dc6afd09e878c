"""shine/analysis/time_to_target.py: the time-to-target definition of the bi-level scripts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from script_modules import load_script

from shine.analysis import bilevel_results
from shine.analysis import time_to_target as timing_utils
from shine.analysis.time_to_target import first_within, median_or_nan, threshold, time_to_within

bench_bilevel = load_script("bench_bilevel")


def test_threshold_is_relative_to_the_magnitude_of_best():
    assert threshold(100.0, 1e-2) == pytest.approx(101.0)
    assert threshold(-100.0, 1e-2) == pytest.approx(-99.0)  # not -101: above a negative best
    assert threshold(0.0, 1e-2) == 0.0


def test_time_to_within_first_hit_skips_non_finite_and_says_never():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    losses = [10.0, math.nan, 1.02, 1.009, 1.0]
    assert first_within(losses, 1.0, 1e-2) == 3
    assert time_to_within(times, losses, 1.0, 1e-2) == 3.0
    assert time_to_within(times, losses, 1.0, 5e-2) == 2.0
    assert time_to_within(times, losses, 1.0, 0.0) == 4.0  # the best itself counts
    assert time_to_within(times, [10.0, math.inf, 5, 4, 3], 1.0, 1e-2) == math.inf
    assert first_within([], 1.0, 1e-2) is None
    assert time_to_within(np.arange(3.0), np.array([3.0, 2.0, 1.0]), 1.0, 1e-3) == 2.0
    with pytest.raises(ValueError, match="3 times for 2 losses"):
        time_to_within([0, 1, 2], [1, 2], 1.0, 1e-2)


def test_median_or_nan_counts_inf_as_never():
    assert median_or_nan([3.0, 1.0, 2.0]) == 2.0
    assert median_or_nan([1.0, 2.0, math.inf]) == 2.0  # the median seed got there
    assert math.isnan(median_or_nan([1.0, math.inf, math.inf]))  # the median seed did not
    assert math.isnan(median_or_nan([1.0, 3.0, math.inf, math.inf]))  # (3 + inf) / 2
    assert math.isnan(median_or_nan([]))


def test_the_scripts_share_one_definition():
    assert bilevel_results.TARGETS is timing_utils.TARGETS
    assert bilevel_results.time_to_within is time_to_within
    assert bilevel_results.median_or_nan is median_or_nan
    assert bench_bilevel.time_to_within is time_to_within
    assert bench_bilevel.median_or_nan is median_or_nan


def _records(losses, times, inner, backward, iters, lams):
    recs = [{"step": 0, "time": 0.0, "test_loss": losses[0]}]
    for k in range(1, len(losses)):
        recs.append(
            {
                "step": k,
                "time": times[k],
                "test_loss": losses[k],
                "inner_time": inner[k],
                "backward_time": backward[k],
                "inner_iters": iters[k],
                "log_lambda": [lams[k]],
                "rejected": False,
            }
        )
    return recs


def test_bench_seed_row_splits_the_time_to_target():
    recs = _records(
        losses=[10.0, 5.0, 1.005, 1.0],
        times=[0.0, 1.0, 2.5, 4.0],
        inner=[0, 0.6, 1.0, 1.2],
        backward=[0, 0.3, 0.4, 0.2],
        iters=[0, 10, 20, 30],
        lams=[0, -2.0, -2.5, -2.4],
    )
    row = bench_bilevel.seed_row(recs, best=1.0)
    assert row["time_to_1pct"] == 2.5 and row["time_to_0.1pct"] == 4.0
    assert row["steps_to_1pct"] == 2.0
    assert row["inner_time_to_1pct"] == pytest.approx(1.6)
    assert row["backward_time_to_1pct"] == pytest.approx(0.7)
    assert row["inner_iters_to_1pct"] == 30
    assert row["inner_iters"] == 60 and row["ms_per_inner_iter"] == pytest.approx(1e3 * 2.8 / 60)
    assert row["lambda_spread_last10"] == pytest.approx(0.5)
    assert row["free_backward_bound"] == pytest.approx(2.5 / 1.6)
    never = bench_bilevel.seed_row(recs, best=0.5)
    assert never["time_to_1pct"] == math.inf and never["inner_time_to_1pct"] == math.inf


def test_bench_verdict_says_why_when_the_target_is_missed():
    hoag = {
        "time_to_1pct": 1.2,
        "final_test_loss": 435.0,
        "inner_time_to_1pct": 0.9,
        "backward_time_to_1pct": 0.3,
        "steps_to_1pct": 2.0,
        "free_backward_bound": 1.2 / 0.9,
        "inner_iters_to_1pct": 110.0,
        "ms_per_inner_iter": 7.0,
        "lambda_spread_last10": 0.01,
    }
    slow = {**hoag, "time_to_1pct": 0.8, "inner_time_to_1pct": 0.79}
    slow.update(backward_time_to_1pct=0.01, ms_per_inner_iter=11.0, inner_iters_to_1pct=70.0)
    speedup, ok, why = bench_bilevel.verdict(hoag, slow)
    assert speedup == pytest.approx(1.5) and not ok
    assert "inner solves dominate" in why and "1.33x" in why
    fast = {**slow, "time_to_1pct": 0.5}
    assert bench_bilevel.verdict(hoag, fast)[1:] == (True, "target met")
    worse = {**fast, "final_test_loss": 440.0, "lambda_spread_last10": 1.5}
    speedup, ok, why = bench_bilevel.verdict(hoag, worse)
    assert not ok and "final held-out loss" in why and "inner solves" not in why
