"""Helpers the benchmark scripts share: interleaved rounds, per-round ratios, targets, JSON.

Used by ``scripts/bench_core.py`` and ``scripts/bench_deq.py``. The compared cases run back to
back in each round, their order rotating from round to round, and every ratio is computed per
round (between cases of that round) before its median is taken, so that a load burst on a shared
machine moves both sides of a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: ``{case: [time of each timed round]}``
Times = dict[str, list[float]]


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> Times:
    """Times of each case over ``repeats`` rounds, after ``warmup`` untimed rounds.

    A case returning a float has that time recorded (the part of it that it timed itself); any
    other case has its wall time recorded. The cases of a round run back to back; their order
    rotates from round to round.

    Returns:
        ``{case: [seconds per timed round]}``.
    """
    names = list(cases)
    times: Times = {k: [] for k in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            recorded = cases[name]()
            elapsed = recorded if isinstance(recorded, float) else time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def per_round(times: Times, fn: Callable[[dict[str, float]], float]) -> tuple[float, float]:
    """Median over the rounds of ``fn(times of the round)``, and ``fn`` of the fastest times."""
    n = len(next(iter(times.values())))
    values = [fn({k: v[r] for k, v in times.items()}) for r in range(n)]
    return float(statistics.median(values)), fn({k: min(v) for k, v in times.items()})


def med(xs: list[float]) -> float:
    """The median of ``xs`` as a float."""
    return float(statistics.median(xs))


def target(
    name: str,
    value: float | None,
    op: str,
    threshold: float,
    fastest: float | None = None,
    skip: str | None = None,
) -> dict[str, Any]:
    """One target of a benchmark: ``value op threshold`` with ``op`` ``"<="`` or ``">="``.

    Args:
        name: what is compared, as printed.
        value: the measured value (``None``: not measured, the target is skipped).
        op: ``"<="`` or ``">="``.
        threshold: the bound.
        fastest: the same value from the fastest times (reported, not judged).
        skip: the reason to skip the target (it does not apply on this machine).

    Returns:
        The JSON entry, with ``status`` ``PASS``, ``FAIL`` or ``SKIP`` (and ``reason``).
    """
    entry: dict[str, Any] = {"name": name, "value": value, "value_fastest": fastest}
    entry.update(op=op, threshold=threshold)
    if skip is not None or value is None:
        entry.update(status="SKIP", reason=skip)
    else:
        ok = value <= threshold if op == "<=" else value >= threshold
        entry["status"] = "PASS" if ok else "FAIL"
    return entry


def ms(t: float) -> str:
    """Seconds as milliseconds, right-aligned: ``'   12.34 ms'``."""
    return f"{1e3 * t:8.2f} ms"


def environment(**extra: Any) -> dict[str, Any]:
    """Versions and threads of this run, plus ``extra`` (the JSON's ``env`` block)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **extra,
    }


def summarize_targets(targets: list[dict[str, Any]], start: float) -> dict[str, Any]:
    """Counts of passed / evaluated / skipped targets, the failed names and the wall time."""
    evaluated = [t for t in targets if t["status"] != "SKIP"]
    return {
        "passed": sum(t["status"] == "PASS" for t in targets),
        "evaluated": len(evaluated),
        "skipped": len(targets) - len(evaluated),
        "failed": [t["name"] for t in targets if t["status"] == "FAIL"],
        "wall_s": time.perf_counter() - start,
    }


def write_json(res: dict[str, Any], out: Path) -> None:
    """Write the benchmark's numbers to ``out`` (directories created)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


__all__ = [
    "Times",
    "environment",
    "interleaved",
    "med",
    "ms",
    "per_round",
    "summarize_targets",
    "target",
    "write_json",
]
