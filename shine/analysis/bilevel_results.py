"""Bi-level results: the figure specs, the collected runs table, curves and ``summary.csv``.

The protocol of the bi-level figures (paper Figures 1, E.1, 2 left, E.2; the authors'
``main_plots.py``, zaccharieramzi/hoag branch ``shine``) on the tidy table written by
``python scripts/collect.py ARTEFACT``: per seed, the suboptimality ``test_loss - best + eps``
where ``best`` is the lowest held-out loss of that seed over *all* methods of the table and all
steps; per method, mode and step index, the median over seeds and a quantile band against the
median over seeds of the cumulative ``time`` at that step. ``summary.csv`` (per dataset, loss,
method and mode): number of seeds, median final held-out loss, median time to come within 1 % and
0.1 % of the per-seed best (:mod:`shine.analysis.time_to_target`).

Used by ``scripts/fig_bilevel.py`` (the figures) and ``scripts/collect.py`` (``summary.csv``
beside a committed table). Labels and colours of the methods: :mod:`shine.analysis.methods`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shine.analysis import methods as registry
from shine.analysis.time_to_target import TARGETS, median_or_nan, time_to_within

# the name the figure script has always logged under
logger = logging.getLogger("fig_bilevel")


@dataclass(frozen=True)
class FigureSpec:
    """Methods (in legend order) and quantile band of one bi-level figure."""

    methods: tuple[str, ...]
    band: tuple[float, float]


FIGURES: dict[str, FigureSpec] = {
    "fig1": FigureSpec(
        ("hoag", "shine", "shine_refine", "jacobian_free", "grid_search"), (0.10, 0.90)
    ),
    "fig_e1": FigureSpec(
        (
            "hoag",
            "hoag_limited",
            "shine",
            "shine_refine",
            "jacobian_free",
            "grid_search",
            "random_search",
        ),
        (0.10, 0.90),
    ),
    "fig2_left": FigureSpec(("hoag", "shine", "shine_opa"), (0.25, 0.75)),
    "fig_e2": FigureSpec(
        ("hoag", "shine", "shine_refine", "shine_opa", "jacobian_free"), (0.25, 0.75)
    ),
    "demo": FigureSpec(("hoag", "shine", "jacobian_free"), (0.25, 0.75)),
}

# panel order (paper data first) and titles; other data sets follow alphabetically
DATASET_LABELS = {
    "news20": "20news",
    "real_sim": "real-sim",
    "synthetic_news": "synthetic 20news-like",
    "synthetic_news_small": "synthetic 20news-like (small)",
    "breast_cancer": "breast cancer",
}
SUMMARY_COLUMNS = [
    "artefact",
    "dataset",
    "loss",
    "method",
    "mode",
    "n_seeds",
    "median_final_test_loss",
    "median_best_test_loss",
    "median_time_to_1pct",
    "median_time_to_0p1pct",
    "n_seeds_reaching_1pct",
    "n_seeds_reaching_0p1pct",
    "median_total_time",
]

Panel = tuple[str, str]  # (dataset, loss)
Series = tuple[str, str]  # (method, mode); mode "" for runs without one
#: order of the modes in legends and tables
MODES = ("authors", "faithful", "", "robust")


class FigureError(RuntimeError):
    """Missing table or nothing to plot."""


def _float(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``runs.csv`` with ``seed``/``step`` as int and ``time``/``test_loss`` as float.

    Raises:
        FigureError: if the file is missing or lacks a needed column.
    """
    path = Path(path)
    if not path.is_file():
        raise FigureError(f"{path} not found")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"dataset", "method", "seed", "step", "time", "test_loss"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise FigureError(f"{path} lacks the column(s) {sorted(missing)}")
        rows = []
        for raw in reader:
            row: dict[str, Any] = dict(raw)
            row["loss"] = raw.get("loss") or ""
            row["seed"] = int(raw["seed"])
            row["step"] = int(raw["step"])
            row["time"] = _float(raw["time"])
            row["test_loss"] = _float(raw["test_loss"])
            row["mode"] = raw.get("mode") or ""
            row["log_lambda"] = _float(raw.get("log_lambda", ""))
            row["status"] = raw.get("status") or "complete"
            rows.append(row)
    return rows


def drop_diverged(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of runs that did not diverge (``status`` column), and how many runs did."""
    diverged = {r.get("run_dir") for r in rows if r.get("status") == "diverged"}
    if diverged:
        names = ", ".join(sorted(diverged))
        logger.warning("%d diverged run(s) left out: %s", len(diverged), names)
    return [r for r in rows if r.get("status") != "diverged"], len(diverged)


def panel_order(panels: Sequence[Panel], datasets: Sequence[str] | None = None) -> list[Panel]:
    """Panels sorted paper data first (``datasets``, if given, selects and orders them)."""
    if datasets:
        return [p for d in datasets for p in sorted(panels) if p[0] == d]
    known = list(DATASET_LABELS)
    return sorted(
        panels, key=lambda p: (known.index(p[0]) if p[0] in known else len(known), p[0], p[1])
    )


def group(rows: Sequence[dict[str, Any]]) -> dict[Panel, dict[Series, dict[int, np.ndarray]]]:
    """``{(dataset, loss): {(method, mode): {seed: (step, time, test_loss, log λ) by step}}}``."""
    out: dict[Panel, dict[Series, dict[int, list]]] = {}
    for r in rows:
        series = (r["method"], r.get("mode", ""))
        seeds = out.setdefault((r["dataset"], r["loss"]), {}).setdefault(series, {})
        seeds.setdefault(r["seed"], []).append(
            (r["step"], r["time"], r["test_loss"], r.get("log_lambda", math.nan))
        )
    return {
        panel: {
            m: {s: np.array(sorted(v), float).reshape(-1, 4) for s, v in seeds.items()}
            for m, seeds in methods.items()
        }
        for panel, methods in out.items()
    }


def series_order(present: Sequence[Series], methods: Sequence[str]) -> list[Series]:
    """The series of ``present`` in figure order.

    Methods as listed, then faithful before robust; methods the figure spec does not list follow,
    alphabetically.
    """
    rank = {m: i for i, m in enumerate(methods)}

    def key(series: Series) -> tuple:
        method, mode = series
        return (rank.get(method, len(rank)), method, MODES.index(mode) if mode in MODES else 9)

    return sorted(present, key=key)


def series_label(series: Series) -> str:
    """Legend label: ``SHINE (ours), faithful``, ``SHINE (ours), robust``.

    Runs of the authors' own code (mode ``authors``, ``experiments/authors_code/``):
    ``SHINE, authors' code``.
    """
    method, mode = series
    label = registry.label(method, registry.BILEVEL)
    if mode == "authors":
        return f"{label.replace(' (ours)', '')}, authors' code"
    return f"{label}, {mode}" if mode else label


def best_per_seed(methods: dict[Series, dict[int, np.ndarray]]) -> dict[int, float]:
    """Lowest finite held-out loss of each seed over all methods and steps."""
    best: dict[int, float] = {}
    for seeds in methods.values():
        for seed, arr in seeds.items():
            finite = arr[np.isfinite(arr[:, 2]), 2]
            if finite.size:
                best[seed] = min(best.get(seed, math.inf), float(finite.min()))
    return best


def default_eps(best: dict[int, float]) -> float:
    """``1e-2 x`` the median over seeds of the best loss (``1e-8`` if that is 0)."""
    eps = 1e-2 * abs(float(np.median(list(best.values())))) if best else 1.0
    return eps if eps > 0 else 1e-8


def curve(
    seeds: dict[int, np.ndarray], best: dict[int, float], eps: float, band: tuple[float, float]
) -> dict[str, np.ndarray]:
    """Median and quantile band over seeds of the suboptimality, per step index.

    Returns:
        ``{"step", "time", "median", "lo", "hi", "n"}``: one entry per step index logged by at
        least one seed (``time`` = median over those seeds of the cumulative time).
    """
    by_step: dict[int, list[tuple[float, float]]] = {}
    for seed, arr in seeds.items():
        if seed not in best:
            continue
        for step, time, loss, _ in arr:
            if np.isfinite(loss):
                by_step.setdefault(int(step), []).append((time, loss - best[seed] + eps))
    steps = sorted(by_step)
    res = {k: np.empty(len(steps)) for k in ("step", "time", "median", "lo", "hi", "n")}
    for i, step in enumerate(steps):
        values = np.array(by_step[step])
        res["step"][i] = step
        res["time"][i] = np.median(values[:, 0])
        res["median"][i] = np.median(values[:, 1])
        res["lo"][i], res["hi"][i] = np.quantile(values[:, 1], band)
        res["n"][i] = len(values)
    return res


def summarize(rows: Sequence[dict[str, Any]], artefact: str) -> list[dict[str, Any]]:
    """Per (dataset, loss, method, mode) of the artefact: the numbers of ``summary.csv``."""
    spec = FIGURES[artefact]
    grouped = group(rows)
    out = []
    for panel in panel_order(list(grouped)):
        methods = grouped[panel]
        best = best_per_seed(methods)
        for series in series_order(list(methods), spec.methods):
            seeds = {s: a for s, a in sorted(methods[series].items()) if s in best}
            finals, bests, totals = [], [], []
            reach: dict[str, list[float]] = {k: [] for k in TARGETS}
            for seed, arr in seeds.items():
                finite = arr[np.isfinite(arr[:, 2])]
                if not finite.size:
                    continue
                finals.append(finite[-1, 2])
                bests.append(best[seed])
                totals.append(arr[-1, 1])
                for key, rel in TARGETS.items():
                    reach[key].append(time_to_within(arr[:, 1], arr[:, 2], best[seed], rel))
            row: dict[str, Any] = {
                "artefact": artefact,
                "dataset": panel[0],
                "loss": panel[1],
                "method": series[0],
                "mode": series[1],
                "n_seeds": len(finals),
                "median_final_test_loss": median_or_nan(finals),
                "median_best_test_loss": median_or_nan(bests),
                "median_total_time": median_or_nan(totals),
            }
            for key in TARGETS:
                row[f"median_time_to_{key}"] = median_or_nan(reach[key])
                row[f"n_seeds_reaching_{key}"] = sum(math.isfinite(t) for t in reach[key])
            out.append(row)
    return out


def fmt_value(value: Any) -> str:
    """A summary cell as text: floats with 6 significant digits (``nan`` for NaN)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_summary(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``summary`` as CSV (atomically) and return ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in summary:
        writer.writerow([fmt_value(row[c]) for c in SUMMARY_COLUMNS])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path
