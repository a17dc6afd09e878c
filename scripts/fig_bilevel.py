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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shine.analysis import methods as registry
from shine.analysis.bilevel_results import (
    DATASET_LABELS,
    FIGURES,
    FigureError,
    Panel,
    best_per_seed,
    curve,
    default_eps,
    drop_diverged,
    fmt_value,
    group,
    panel_order,
    read_table,
    series_label,
    series_order,
    summarize,
    write_summary,
)
from shine.analysis.style import figure, save

logger = logging.getLogger("fig_bilevel")


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
            style = registry.method(method)  # labels, colours, markers: shine.analysis.methods
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
            f"{fmt_value(r['median_final_test_loss']):>11} "
            f"{fmt_value(r['median_time_to_1pct']):>9} "
            f"{fmt_value(r['median_time_to_0p1pct']):>9}"
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
