"""DEQ figures: paper Figure 3 (top-1 vs backward time) and Figure E.3 (OPA inversion quality).

    python scripts/fig_deq.py fig3  [--table experiments/fig3/runs.csv] [--out figures]
        [--x backward|implicit] [--no-paper]
    python scripts/fig_deq.py fig_e3 [--table experiments/fig_e3/runs.csv] [--out figures]

``fig3`` reads the training rows collected by ``python scripts/collect.py fig3`` (one per run)
and draws, one panel per data set, the final top-1 (mean ± std over seeds) against the median
over seeds of the median backward time of each (method family, n): markers per number of
backward iterations n as the authors' ``paper_plot.py`` (0 'o', 1 '^', 2 's', 5 'p', 10 'D',
full '*'), one colour per family (Original, SHINE, SHINE with fallback, Jacobian-Free). The
backward time is the whole ``loss.backward()`` (``--x backward``, the paper's) or the implicit
correction alone (``--x implicit``). The paper's points are drawn hollow: on the CIFAR / ImageNet
panels of runs, or on panels of their own when there is no such run (``--no-paper``: none).
Writes ``<out>/fig3.{pdf,png}`` and ``summary.csv`` next to the table (one line per point, with
the paper's values where it has them).

``fig_e3`` reads the per-(batch, method) rows of ``python scripts/collect.py fig_e3`` and draws
the scatter of ``cos(a, b)`` against ``‖a‖/‖b‖`` (exact over approximate inverse; (1, 1) is
perfect) per method, one panel per data set; ``summary.csv`` gives medians per method.

Exit codes: 0 done, 2 missing table or nothing to plot.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shine.analysis import methods
from shine.analysis.deq_results import (
    E3_METHODS,
    FIG3_FAMILIES,
    FULL,
    MARKERS,
    PAPER_FIG3,
    e3_summary,
    fig3_points,
    n_key,
    read_table,
    to_float,
    write_csv,
)
from shine.analysis.style import figure, save

logger = logging.getLogger("fig_deq")

DATASET_TITLES = {"digits": "digits (tiny MDEQ)", "cifar": "CIFAR-10", "imagenet": "ImageNet"}


class FigureError(RuntimeError):
    """Missing table or nothing to plot."""


def n_label(n: str) -> str:
    """Legend entry of a marker."""
    return "full backward" if n == FULL else f"n = {n}"


def log_axis(ax) -> None:
    """Log-scale x axis with plain numbers at the decades only (no crowded minor labels)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def paper_points(dataset: str) -> list[dict[str, Any]]:
    """The paper's Fig. 3 points of ``dataset`` in the format of :func:`fig3_points`."""
    return [
        {"dataset": dataset, "family": fam, "n": n, "top1_mean": top1, "top1_std": 0.0,
         "backward_ms": ms}
        for (fam, n), (top1, ms) in PAPER_FIG3.get(dataset, {}).items()
    ]  # fmt: skip


def _draw(ax, pts: list[dict[str, Any]], hollow: bool = False) -> None:
    """One line per family through its points (by n), a marker per n, error bars."""
    for fam in FIG3_FAMILIES:
        fp = sorted((p for p in pts if p["family"] == fam), key=lambda p: n_key(p["n"]))
        if not fp:
            continue
        color = methods.color(fam)
        xs = [p["backward_ms"] for p in fp]
        ax.plot(
            xs, [p["top1_mean"] for p in fp], color=color, lw=0.8, alpha=0.3 if hollow else 0.6
        )
        for p in fp:
            ax.errorbar(
                p["backward_ms"],
                p["top1_mean"],
                yerr=p["top1_std"] or None,
                marker=MARKERS.get(str(p["n"]), "x"),
                color=color,
                mfc="none" if hollow else color,
                ms=6 if p["n"] != FULL else 9,
                capsize=2,
                lw=0.8,
            )


def plot_fig3(points: list[dict[str, Any]], out: Path, x: str, paper: bool) -> list[Path]:
    """Draw Fig. 3 and return the written paths.

    One panel per data set of ``points``; with ``paper``, the paper's points are drawn hollow on
    the CIFAR / ImageNet panels, and the paper's CIFAR and ImageNet panels are added (hollow
    markers, "paper" in the title) when there are no runs of those data sets.
    """
    from matplotlib.lines import Line2D

    datasets = sorted({p["dataset"] for p in points}, key=lambda d: (d != "digits", d))
    paper_only = [d for d in PAPER_FIG3 if d not in datasets] if paper else []
    panels = datasets + paper_only
    fig, axes = figure(ncols=len(panels), height=2.8, width=3.4 * len(panels))
    for ax, dataset in zip(axes[0], panels, strict=True):
        title = DATASET_TITLES.get(dataset, dataset)
        if dataset in paper_only:
            _draw(ax, paper_points(dataset), hollow=True)
            title += " (paper)"
        else:
            _draw(ax, [p for p in points if p["dataset"] == dataset])
            if paper:
                _draw(ax, paper_points(dataset), hollow=True)
        log_axis(ax)
        ax.set_xlabel(
            "median backward time [ms]" if x == "backward" else "median implicit correction [ms]"
        )
        ax.set_ylabel("top-1 accuracy [%]")
        ax.set_title(title)
    shown = points + [p for d in panels for p in paper_points(d)] if paper else points
    fams = [f for f in FIG3_FAMILIES if any(p["family"] == f for p in shown)]
    handles = [
        Line2D([], [], color=methods.color(f), lw=1.5, label=methods.label(f, methods.DEQ))
        for f in fams
    ]
    ns = sorted({str(p["n"]) for p in shown}, key=n_key)
    handles += [
        Line2D([], [], color="0.3", marker=MARKERS.get(n, "x"), ls="", label=n_label(n))
        for n in ns
    ]
    if paper:
        handles.append(Line2D([], [], marker="o", mfc="none", mec="0.3", ls="", label="paper"))
    axes[0][0].legend(handles=handles, fontsize=5, loc="lower right", frameon=False)
    fig.subplots_adjust(wspace=0.35)
    return save(fig, out / "fig3")


def plot_fig_e3(rows: list[dict[str, str]], out: Path) -> list[Path]:
    """Draw Fig. E.3 (one panel per data set) and return the written paths."""
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = figure(ncols=len(datasets), height=2.8, width=3.6 * len(datasets))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method in E3_METHODS:
            style = methods.method(method)
            name, color, marker = style.label, style.color, style.marker
            rs = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not rs:
                continue
            ax.scatter(
                [to_float(r["norm_ratio"]) for r in rs],
                [to_float(r["cos"]) for r in rs],
                s=8,
                color=color,
                marker=marker,
                alpha=0.7,
                label=name,
                linewidths=0,
            )
        ax.axvline(1.0, color="0.7", lw=0.6, ls=":")
        ax.axhline(1.0, color="0.7", lw=0.6, ls=":")
        log_axis(ax)
        ax.set_xlabel(r"$\|a\| / \|b\|$ (exact / approximate)")
        ax.set_ylabel(r"$\cos(a, b)$")
        ax.set_title(DATASET_TITLES.get(dataset, dataset))
    axes[0][-1].legend(fontsize=6, loc="best", frameon=False)
    return save(fig, out / "fig_e3")


def run(name: str, table: Path, out: Path, x: str = "backward", paper: bool = True) -> list[Path]:
    """Make figure ``name`` from ``table``; return the written paths.

    Raises:
        FigureError: missing table or nothing to plot.
    """
    if not table.is_file():
        raise FigureError(f"no table {table}: run `python scripts/collect.py {name}` first")
    rows = read_table(table)
    if name == "fig3":
        points = fig3_points(rows, x)
        if not points:
            raise FigureError(f"{table} has no training row of {', '.join(FIG3_FAMILIES)}")
        summary = table.parent / "summary.csv"
        write_csv(summary, points, list(points[0]))
        return [*plot_fig3(points, out, x, paper), summary]
    if name == "fig_e3":
        if not rows:
            raise FigureError(f"{table} is empty")
        summary = table.parent / "summary.csv"
        stats = e3_summary(rows)
        write_csv(summary, stats, list(stats[0]))
        return [*plot_fig_e3(rows, out), summary]
    raise FigureError(f"unknown figure {name!r}; valid: fig3, fig_e3")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="DEQ figures (Fig. 3, Fig. E.3).")
    parser.add_argument("figure", choices=["fig3", "fig_e3"])
    parser.add_argument("--table", type=Path, default=None, help="collected runs.csv")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--x", choices=["backward", "implicit"], default="backward")
    parser.add_argument("--no-paper", action="store_true", help="do not draw the paper's points")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    table = args.table or Path("experiments") / args.figure / "runs.csv"
    try:
        paths = run(args.figure, table, args.out, args.x, not args.no_paper)
    except FigureError as err:
        print(f"fig_deq.py: error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
