"""DEQ tables of the paper's appendix, with the paper's numbers side by side.

    python scripts/tables_deq.py table_e1 [--table experiments/table_e1/runs.csv] [--out DIR]
    python scripts/tables_deq.py table_e2 [--table experiments/table_e2/runs.csv] [--out DIR]
    python scripts/tables_deq.py table_e3 [--table experiments/table_e3/runs.csv] [--out DIR]

Each reads the rows collected by ``python scripts/collect.py NAME`` and writes
``<out>/table.md`` and ``<out>/table.csv`` (default ``<out>`` = the table's folder,
``experiments/NAME/``):

* **table_e1** (contractivity): per data set and trained method, the authors' "nonlinear spectral
  radius" and the spectral radius / norm of ``J_f(z*)`` (means over test images, then over
  seeds), the fraction of images with ``ρ < 1``; paper: the nonlinear value on CIFAR.
* **table_e2** (time per method): per data set and row of the paper's table, the median forward
  and backward ms of the timing run (``kind = timing`` rows; the CIFAR/digits "SHINE Fallback"
  rows are plain SHINE, as the paper says fallback is not used on CIFAR) and the equilibrium
  epoch time of the training runs of the same method (mean over seeds of the mean of the first
  6 equilibrium epochs; ``kind = train`` rows); paper: its values for CIFAR and ImageNet.
* **table_e3** (adjoint Broyden / OPA): per data set, final top-1 (mean ± std over seeds) and
  epoch time of original, Jacobian-Free, SHINE (Broyden), SHINE (adj. Broyden), SHINE (adj.
  Broyden/OPA); paper: its CIFAR values.

Missing measurements are empty cells. Exit codes: 0 done, 2 missing or empty table.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shine.analysis.deq_results import (
    FULL,
    PAPER_TABLE_E1,
    PAPER_TABLE_E2,
    PAPER_TABLE_E3,
    TABLE_E2_ROWS,
    TABLE_E3_ROWS,
    read_table,
    to_float,
)
from shine.analysis.tables import fmt_duration

logger = logging.getLogger("tables_deq")


class TableError(RuntimeError):
    """Missing or empty table."""


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (empty for None / NaN)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not math.isfinite(float(value)):
        return ""
    return f"{float(value):.{digits}g}"


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, std (0 for one value) and count of the finite values."""
    arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std()) if arr.size > 1 else 0.0, int(arr.size)


def csv_cell(value: Any) -> Any:
    """A raw CSV cell: floats with 6 significant digits, empty for None / NaN."""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else value


def write(out: Path, columns: list[str], rows: list[dict[str, Any]], title: str, note: str):
    """Write ``table.csv`` (raw numbers) and ``table.md`` (formatted) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    (out / "table.csv").write_text(buf.getvalue(), encoding="utf-8")
    lines = [f"# {title}", "", note, "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row.get(f"_{c}", fmt(row.get(c))) for c in columns) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / "table.md", out / "table.csv"]


# ----------------------------------------------------------------------- Table E.1
def table_e1(rows: list[dict[str, str]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of Table E.1 (see the module docstring)."""
    columns = [
        "dataset",
        "method",
        "seeds",
        "nonlinear_spectral_radius",
        "paper_nonlinear_cifar",
        "spectral_radius",
        "spectral_norm",
        "contractive_frac",
        "n_images",
        "sqrt_state_dim",
    ]
    order = {"original": 0, "jacobian_free": 1, "shine": 2}
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    out = []
    for (dataset, method), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][1])
    ):
        row: dict[str, Any] = {"dataset": dataset, "method": method, "seeds": len(rs)}
        for key in ("nonlinear_spectral_radius", "spectral_radius", "spectral_norm"):
            m, s, _ = mean_std([to_float(r[key]) for r in rs])
            row[key] = m
            row[f"_{key}"] = fmt(m, 4) + (f" ± {fmt(s, 2)}" if len(rs) > 1 else "")
        row["contractive_frac"] = mean_std([to_float(r["contractive_frac"]) for r in rs])[0]
        row["n_images"] = int(to_float(rs[0]["n_images"]))
        row["_n_images"] = str(row["n_images"])
        row["_seeds"] = str(len(rs))
        row["sqrt_state_dim"] = math.sqrt(to_float(rs[0]["state_dim"]))
        row["paper_nonlinear_cifar"] = PAPER_TABLE_E1.get(method)
        row["_paper_nonlinear_cifar"] = fmt(PAPER_TABLE_E1.get(method), 4)
        out.append(row)
    return columns, out


# ----------------------------------------------------------------------- Table E.2
def _match(rows: list[dict[str, str]], dataset: str, key: str, kind: str) -> list[dict[str, str]]:
    """Rows of ``kind`` measuring the Table E.2 row ``key`` on ``dataset``."""
    _, family, n = TABLE_E2_ROWS[key]
    families = [family]
    if family == "shine":  # "SHINE Fallback": with fallback where the data set uses it
        families = (
            ["shine_fallback", "shine"] if dataset == "imagenet" else ["shine", "shine_fallback"]
        )
    for fam in families:
        found = [
            r
            for r in rows
            if r.get("kind") == kind
            and r.get("dataset") == dataset
            and r.get("family") == fam
            and str(r.get("n")) == n
        ]
        if found:
            return found
    return []


def table_e2(rows: list[dict[str, str]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of Table E.2 (see the module docstring)."""
    columns = [
        "dataset",
        "method",
        "forward_ms",
        "backward_ms",
        "epoch_s",
        "paper_forward_ms",
        "paper_backward_ms",
        "paper_epoch_s",
        "timing_batches",
        "train_seeds",
    ]
    datasets = sorted({r["dataset"] for r in rows if r.get("kind") == "timing"})
    datasets += sorted({r["dataset"] for r in rows} - set(datasets))
    out = []
    for dataset in datasets:
        for key, (name, _, _) in TABLE_E2_ROWS.items():
            timing = _match(rows, dataset, key, "timing")
            train = _match(rows, dataset, key, "train")
            if not timing and not train:
                continue
            fwd = mean_std([to_float(r["median_forward_ms"]) for r in timing])[0]
            bwd = mean_std([to_float(r["median_backward_ms"]) for r in timing])[0]
            epoch, epoch_std, n_train = mean_std([to_float(r["epoch_time_s"]) for r in train])
            paper = PAPER_TABLE_E2.get(dataset, {}).get(key)
            out.append(
                {
                    "dataset": dataset,
                    "method": name,
                    "forward_ms": fwd,
                    "backward_ms": bwd,
                    "epoch_s": epoch,
                    "_epoch_s": fmt_duration(epoch)
                    + (f" ± {fmt_duration(epoch_std)}" if n_train > 1 else ""),
                    "paper_forward_ms": paper[0] if paper else None,
                    "paper_backward_ms": paper[1] if paper else None,
                    "paper_epoch_s": paper[2] if paper else None,
                    "_paper_epoch_s": fmt_duration(paper[2]) if paper else "",
                    "timing_batches": sum(int(to_float(r["n_batches"])) for r in timing),
                    "train_seeds": n_train,
                }
            )
            out[-1]["_timing_batches"] = str(out[-1]["timing_batches"])
            out[-1]["_train_seeds"] = str(n_train)
    return columns, out


# ----------------------------------------------------------------------- Table E.3
def table_e3(rows: list[dict[str, str]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of Table E.3 (see the module docstring)."""
    columns = [
        "dataset",
        "method",
        "top1",
        "top1_std",
        "epoch_s",
        "paper_top1_cifar",
        "paper_epoch_s_cifar",
        "seeds",
    ]
    out = []
    for dataset in sorted({r["dataset"] for r in rows if r.get("kind") == "train"}):
        for method, name in TABLE_E3_ROWS.items():
            rs = [
                r
                for r in rows
                if r.get("kind") == "train"
                and r.get("dataset") == dataset
                and r.get("method") == method
                and str(r.get("n")) in ("0", FULL)
            ]
            if not rs:
                continue
            top1, std, n = mean_std([to_float(r["final_top1"]) for r in rs])
            epoch = mean_std([to_float(r["epoch_time_s"]) for r in rs])[0]
            paper = PAPER_TABLE_E3.get(method)
            out.append(
                {
                    "dataset": dataset,
                    "method": name,
                    "top1": top1,
                    "_top1": fmt(top1, 4),
                    "top1_std": std,
                    "epoch_s": epoch,
                    "_epoch_s": fmt_duration(epoch),
                    "paper_top1_cifar": paper[0],
                    "_paper_top1_cifar": fmt(paper[0], 4),
                    "paper_epoch_s_cifar": paper[1],
                    "_paper_epoch_s_cifar": fmt_duration(paper[1]),
                    "seeds": n,
                    "_seeds": str(n),
                }
            )
    return columns, out


TABLES = {
    "table_e1": (
        table_e1,
        "Table E.1 - contractivity of the fixed-point map",
        "nonlinear_spectral_radius: the authors' power method on f (an output norm, ~sqrt(d) "
        "for a GroupNorm-ended f: compare with sqrt_state_dim); spectral_radius / spectral_norm: "
        "power iteration on J_f(z*) at each test image's equilibrium (< 1: contractive). Means "
        "over test images, ± std over seeds. Paper: CIFAR, 10 000 images, 500 iterations.",
    ),
    "table_e2": (
        table_e2,
        "Table E.2 - time per method (forward / backward: median ms per batch of 32; epoch: "
        "equilibrium training)",
        "Ours: synchronised timing of the timing run (kind=timing), epoch time from the training "
        "runs (kind=train; mean of the first 6 equilibrium epochs, evaluation excluded). SHINE "
        "uses fallback on ImageNet only, as the paper. Paper: one V100, unsynchronised timer.",
    ),
    "table_e3": (
        table_e3,
        "Table E.3 - adjoint Broyden and OPA (top-1 %, epoch time)",
        "Final top-1 (mean over seeds) and equilibrium epoch time of the training runs; the "
        "paper's values are CIFAR-10 (MDEQ-LARGE, 5 seeds).",
    ),
}


def run(name: str, table: Path, out: Path | None = None) -> list[Path]:
    """Write table ``name`` from ``table``; return the written paths.

    Raises:
        TableError: missing or empty table, or nothing to tabulate.
    """
    if name not in TABLES:
        raise TableError(f"unknown table {name!r}; valid: {', '.join(TABLES)}")
    if not table.is_file():
        raise TableError(f"no table {table}: run `python scripts/collect.py {name}` first")
    rows = read_table(table)
    build, title, note = TABLES[name]
    columns, out_rows = build(rows)
    if not out_rows:
        raise TableError(f"{table}: nothing to tabulate for {name}")
    return write(out or table.parent, columns, out_rows, title, note)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="DEQ tables E.1, E.2, E.3 with paper values.")
    parser.add_argument("table", choices=list(TABLES))
    parser.add_argument("--table", dest="path", type=Path, default=None, help="runs.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = args.path or Path("experiments") / args.table / "runs.csv"
    try:
        paths = run(args.table, path, args.out)
    except TableError as err:
        print(f"tables_deq.py: error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
