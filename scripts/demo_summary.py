"""Print the summary of ``make demo``: bi-level speed-ups and DEQ accuracies/backward times.

    python scripts/demo_summary.py [--runs DIR]

Reads what the demo wrote under ``DIR`` (default ``$SHINE_RUNS`` or ``runs``): the summary of
the bi-level sweep (HOAG, SHINE, Jacobian-Free on breast cancer, several seeds) that
``scripts/fig_bilevel.py demo`` wrote to ``DIR/demo/demo/summary.csv`` (median over seeds of the
final held-out loss and of the time to get within 1 % of each seed's best), and the digits MDEQ
runs ``digits_{original,shine,jacobian_free}/seed=0`` (final top-1, median backward
milliseconds, training seconds). Exit code 2 when they are missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import yaml

BILEVEL = ("hoag", "shine", "jacobian_free")
DEQ = ("original", "shine", "jacobian_free")


def bilevel_table(summary_csv: Path) -> dict[str, dict[str, float]]:
    """Per method: the medians ``scripts/fig_bilevel.py demo`` wrote to ``summary_csv``."""
    if not summary_csv.is_file():
        return {}
    with summary_csv.open(newline="") as fh:
        rows = {row["method"]: row for row in csv.DictReader(fh)}
    return {
        method: {
            "final_loss": float(rows[method]["median_final_test_loss"]),
            "time_to_1pct": float(rows[method]["median_time_to_1pct"]),
            "seeds": int(rows[method]["n_seeds"]),
        }
        for method in BILEVEL
        if method in rows
    }


def bilevel_settings(root: Path) -> dict[str, str] | None:
    """The outer step rule and L-BFGS memory policy of the demo's SHINE runs (their configs)."""
    for path in sorted((root / "sweeps" / "demo_bilevel").glob("*/config.yaml")):
        method = (yaml.safe_load(path.read_text()) or {}).get("method") or {}
        if method.get("name") == "shine":
            return {"mode": str(method.get("mode")), "memory": str(method.get("inner_memory"))}
    return None


def deq_table(root: Path) -> dict[str, dict[str, float]]:
    """Per method: the digits run's summary."""
    out = {}
    for method in DEQ:
        path = root / f"digits_{method}" / "seed=0" / "summary.json"
        if path.is_file():
            out[method] = json.loads(path.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("SHINE_RUNS", "runs")))
    args = p.parse_args(argv)
    bilevel = bilevel_table(args.runs / "demo" / "demo" / "summary.csv")
    deq = deq_table(args.runs)
    if not bilevel or not deq:
        print(f"demo runs not found under {args.runs}: run `make demo`", file=sys.stderr)
        return 2
    print("\n== bi-level: l2-logistic regression on breast cancer (held-out loss, medians)")
    for method, row in bilevel.items():
        print(
            f"   {method:<14} final loss {row['final_loss']:9.3f}   time to 1 % of best "
            f"{row['time_to_1pct']:.3f} s   ({row['seeds']} seeds)"
        )
    if "hoag" in bilevel and "shine" in bilevel:
        ratio = bilevel["hoag"]["time_to_1pct"] / bilevel["shine"]["time_to_1pct"]
        print(f"   speed-up of SHINE over HOAG to 1 % of the best: {ratio:.2f}x")
    settings = bilevel_settings(args.runs)
    if settings is not None:
        print(
            f"   settings: outer step rule {settings['mode']}, L-BFGS memory {settings['memory']} "
            "across outer steps (the authors' Figure 1: faithful, restart; our outer loop: "
            "python train.py -m +sweep=demo_bilevel method.mode=robust)"
        )
    print("\n== DEQ: tiny MDEQ on digits")
    for method, row in deq.items():
        print(
            f"   {method:<14} top-1 {row['final_test_top1']:6.2f} %   median backward "
            f"{row['median_backward_ms']:8.3f} ms   training {row['train_time_s']:6.1f} s"
        )
    if "original" in deq and "shine" in deq:
        ratio = deq["original"]["median_backward_ms"] / deq["shine"]["median_backward_ms"]
        print(f"   backward speed-up of SHINE over the original implicit backward: {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
