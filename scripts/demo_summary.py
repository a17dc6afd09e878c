"""Print the summary of ``make demo``: bi-level speed-ups and DEQ accuracies/backward times.

    python scripts/demo_summary.py [--runs DIR]

Reads the run directories the demo wrote under ``DIR`` (default ``$SHINE_RUNS`` or ``runs``):
the bi-level sweep ``sweeps/demo_bilevel`` (HOAG, SHINE, Jacobian-Free on breast cancer, several
seeds) and the digits MDEQ runs ``digits_{original,shine,jacobian_free}/seed=0``. For the
bi-level runs: the median over seeds of the final held-out loss and of the time to get within
1 % of each seed's best held-out loss over all methods; for the DEQ runs: final top-1, median
backward milliseconds, training seconds. Exit code 2 when the runs are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

BILEVEL = ("hoag", "shine", "jacobian_free")
DEQ = ("original", "shine", "jacobian_free")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a truncated last line is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def bilevel_table(root: Path) -> dict[str, dict[str, float]]:
    """Per method: median final held-out loss and median time to 1 % of the per-seed best."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for summary in sorted((root / "sweeps" / "demo_bilevel").glob("*/summary.json")):
        info = json.loads(summary.read_text())
        seed = int(summary.parent.name.split("seed=")[-1].split(",")[0])
        runs[(info["method"], seed)] = read_jsonl(summary.parent / "metrics.jsonl")
    seeds = sorted({s for _, s in runs})
    table: dict[str, dict[str, float]] = {}
    for method in BILEVEL:
        finals, times = [], []
        for seed in seeds:
            if (method, seed) not in runs:
                continue
            best = min(r["test_loss"] for (m, s), recs in runs.items() if s == seed for r in recs)
            recs = runs[(method, seed)]
            finals.append(recs[-1]["test_loss"])
            hit = [r["time"] for r in recs if r["test_loss"] <= 1.01 * best]
            times.append(hit[0] if hit else math.inf)
        if finals:
            table[method] = {
                "final_loss": statistics.median(finals),
                "time_to_1pct": statistics.median(times),
                "seeds": len(finals),
            }
    return table


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
    bilevel, deq = bilevel_table(args.runs), deq_table(args.runs)
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
