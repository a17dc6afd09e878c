"""Bi-level figures (paper Figures 1, E.1, 2 left, E.2) from a collected runs table.

    python scripts/fig_bilevel.py ARTEFACT [--table experiments/<ARTEFACT>/runs.csv]
        [--out figures] [--summary PATH] [--eps EPS] [--xmax SECONDS] [--datasets NAME ...]

Reads the tidy table written by ``python scripts/collect.py ARTEFACT`` and applies the authors'
plotting protocol (their ``main_plots.py``, zaccharieramzi/hoag branch ``shine``): one panel per
(dataset, loss) of the table; per seed, the suboptimality ``test_loss - best + eps`` where ``best``
is the lowest held-out loss of that seed over *all* methods of the table and all steps; per method,
mode and step index, the median over seeds (line) and a quantile band (10/90 % for fig1/fig_e1,
25/75 % for fig2_left/fig_e2) against the median over seeds of the cumulative ``time`` at that
step; log-scale y. Runs of ``method.mode=faithful`` (the authors' code) are drawn solid, those of
``robust`` (ours) dashed with hollow markers; every method and mode of the table is in the legend.
A second row shows the ``log λ`` trajectory of the first seed of each curve against time.

``eps`` (the paper's additive offset: 10 for Fig. 1/E.1 on losses ~1e2) defaults to
``1e-2 x`` the median over seeds of ``best`` in each panel; ``--eps`` sets one absolute value.

Writes one figure per artefact, one panel per dataset: ``<out>/<ARTEFACT>.{pdf,png}``, and
``summary.csv`` next to the table (per dataset, loss, method and mode: number of seeds, median
final held-out loss, median time to come within 1 % and 0.1 % of the per-seed best, NaN when the
median seed never does). Exit codes: 0 done, 2 missing table / nothing to plot.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plot_style import figure, save
from timing_utils import TARGETS, median_or_nan, time_to_within

logger = logging.getLogger("fig_bilevel")


@dataclass(frozen=True)
class MethodStyle:
    """Legend label and line style of one method (the same in every figure)."""

    label: str
    color: str
    marker: str
    linestyle: str = "-"


# Okabe-Ito colours; SHINE and Jacobian-Free match plot_style.COLORS
METHOD_STYLES: dict[str, MethodStyle] = {
    "hoag": MethodStyle("HOAG", "#000000", "o"),
    "hoag_limited": MethodStyle("HOAG limited backward", "#000000", "v", "--"),
    "shine": MethodStyle("SHINE (ours)", "#D55E00", "s"),
    "shine_refine": MethodStyle("SHINE refine (ours)", "#E69F00", "D"),
    "shine_opa": MethodStyle("SHINE-OPA (ours)", "#CC79A7", "^"),
    "jacobian_free": MethodStyle("Jacobian-Free", "#0072B2", "P"),
    "grid_search": MethodStyle("Grid search", "#009E73", "x", ":"),
    "random_search": MethodStyle("Random search", "#56B4E9", "+", ":"),
}


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
    """The series of ``present`` in figure order: methods as listed, then faithful before robust;
    methods the figure spec does not list follow, alphabetically."""
    rank = {m: i for i, m in enumerate(methods)}

    def key(series: Series) -> tuple:
        method, mode = series
        return (rank.get(method, len(rank)), method, MODES.index(mode) if mode in MODES else 9)

    return sorted(present, key=key)


def series_label(series: Series) -> str:
    """Legend label: ``SHINE (ours), faithful``, ``SHINE (ours), robust``; runs of the authors'
    own code (mode ``authors``, ``experiments/authors_code/``): ``SHINE, authors' code``."""
    method, mode = series
    label = METHOD_STYLES[method].label if method in METHOD_STYLES else method
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_summary(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``summary`` as CSV (atomically) and return ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for row in summary:
        writer.writerow([_fmt(row[c]) for c in SUMMARY_COLUMNS])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def panel_title(panel: Panel) -> str:
    """Readable panel title, e.g. ``20news`` or ``20news (NLS)``."""
    dataset, loss = panel
    title = DATASET_LABELS.get(dataset, dataset.replace("_", " "))
    return f"{title} (NLS)" if loss == "nls" else title


def plot(
    rows: Sequence[dict[str, Any]],
    artefact: str,
    out_stem: Path,
    eps: float | None = None,
    xmax: float | None = None,
    datasets: Sequence[str] | None = None,
    left_out: int = 0,
) -> list[Path]:
    """Draw one column per (dataset, loss) and save ``<out_stem>.{pdf,png}``.

    Top row: held-out suboptimality (median and band over seeds) of every method and mode of
    the table; bottom row: ``log λ`` of the first seed of each curve against time. ``left_out``
    diverged runs (not in ``rows``) are mentioned under the legend.

    Raises:
        FigureError: if the table holds no run.
    """
    spec = FIGURES[artefact]
    grouped = group(rows)
    panels = panel_order(list(grouped), datasets)
    if not panels:
        raise FigureError(
            "no run in the table"
            + (f" for the data sets {', '.join(datasets)}" if datasets else "")
        )
    fig, axes = figure(nrows=2, ncols=len(panels), height=4.2, sharex="col")
    handles: dict[str, Any] = {}
    for col, panel in enumerate(panels):
        ax, ax_lam = axes[0][col], axes[1][col]
        methods = grouped[panel]
        best = best_per_seed(methods)
        panel_eps = eps if eps is not None else default_eps(best)
        for method in spec.methods:
            if not any(m == method for m, _ in methods):
                logger.warning("%s: no run of %s for %s", artefact, method, panel_title(panel))
        for series in series_order(list(methods), spec.methods):
            method, mode = series
            c = curve(methods[series], best, panel_eps, spec.band)
            style = METHOD_STYLES.get(method, MethodStyle(method, "0.5", "."))
            robust = mode == "robust"
            line_kw = {
                "color": style.color,
                "linestyle": ("--" if style.linestyle == "-" else "-.")
                if robust
                else style.linestyle,
                "marker": style.marker,
                "markerfacecolor": "none" if robust else style.color,
                "markersize": 3,
                "linewidth": 1.0,
            }
            (line,) = ax.plot(
                c["time"], c["median"], markevery=max(1, len(c["time"]) // 8), **line_kw
            )
            ax.fill_between(c["time"], c["lo"], c["hi"], color=style.color, alpha=0.12, lw=0)
            first = methods[series][min(methods[series])]
            ax_lam.plot(first[:, 1], first[:, 3], markevery=max(1, len(first) // 8), **line_kw)
            handles.setdefault(series_label(series), line)
        ax.set_yscale("log")
        ax.set_xlim(left=0, right=xmax)
        ax.set_title(panel_title(panel))
        ax_lam.set_xlabel("time (s)")
        ax.text(
            0.97,
            0.97,
            rf"$\varepsilon$ = {panel_eps:.2g}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize="x-small",
        )
    axes[0][0].set_ylabel(r"held-out loss $-$ best $+\ \varepsilon$")
    axes[1][0].set_ylabel(r"$\log\lambda$ (first seed)")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 4 if len(panels) > 1 else 2),
        fontsize="small",
        title=f"{left_out} diverged run(s) left out" if left_out else None,
        title_fontsize="x-small",
    )
    return save(fig, out_stem)


def summary_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """Human-readable lines of the summary."""
    lines = [
        f"  {'dataset':<22} {'loss':<9} {'method':<15} {'mode':<9} {'seeds':>5} "
        f"{'final loss':>11} {'t(1%) s':>9} {'t(0.1%) s':>9}"
    ]
    for r in summary:
        lines.append(
            f"  {r['dataset']:<22} {r['loss']:<9} {r['method']:<15} {r['mode'] or '-':<9} "
            f"{r['n_seeds']:>5} "
            f"{_fmt(r['median_final_test_loss']):>11} {_fmt(r['median_time_to_1pct']):>9} "
            f"{_fmt(r['median_time_to_0p1pct']):>9}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artefact", help=f"one of: {', '.join(FIGURES)}")
    parser.add_argument(
        "--table", type=Path, default=None, help="default: experiments/<artefact>/runs.csv"
    )
    parser.add_argument("--out", type=Path, default=Path("figures"), help="figure directory")
    parser.add_argument(
        "--summary", type=Path, default=None, help="default: summary.csv next to the table"
    )
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="additive offset of the suboptimality (default: 1e-2 x median per-seed best)",
    )
    parser.add_argument("--xmax", type=float, default=None, help="right end of the time axis")
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="data sets to plot, in panel order"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.artefact not in FIGURES:
        parser.error(f"unknown artefact {args.artefact!r}; valid: {', '.join(FIGURES)}")
    table = args.table or Path("experiments") / args.artefact / "runs.csv"
    try:
        rows, left_out = drop_diverged(read_table(table))
        if args.datasets:
            rows = [r for r in rows if r["dataset"] in args.datasets]
        stem = args.out / args.artefact
        paths = plot(rows, args.artefact, stem, args.eps, args.xmax, args.datasets, left_out)
    except FigureError as err:
        print(
            f"fig_bilevel.py: error: {err}; produce the table with:\n"
            f"    python scripts/collect.py {args.artefact}",
            file=sys.stderr,
        )
        return 2
    summary = summarize(rows, args.artefact)
    summary_path = write_summary(summary, args.summary or table.parent / "summary.csv")
    print(f"{args.artefact}: wrote {', '.join(str(p) for p in paths)} and {summary_path}")
    if left_out:
        print(f"  {left_out} diverged run(s) left out of the figure and the summary")
    for line in summary_lines(summary):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
