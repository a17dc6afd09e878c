"""Print the summary of ``make demo``: bi-level speed-ups and DEQ accuracies/backward times.

    python scripts/demo_summary.py [--runs DIR]

Reads what the demo wrote under ``DIR`` (default ``$SHINE_RUNS`` or ``runs``): the summary of
the bi-level sweep (HOAG, SHINE, Jacobian-Free on the 20news-sized synthetic set, 3 seeds, in
faithful and robust mode) that ``scripts/fig_bilevel.py demo`` wrote to
``DIR/demo/demo/summary.csv`` (median over seeds of the final held-out loss and of the time to
get within 1 % and 0.1 % of each seed's best), and the digits MDEQ
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


MODES = {
    "faithful": "the authors' algorithm (their step rule, L-BFGS-B, SHINE estimate)",
    "robust": "ours (safeguarded step, our L-BFGS and estimate)",
}


def bilevel_table(summary_csv: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Per (mode, method): the medians ``scripts/fig_bilevel.py demo`` wrote to ``summary_csv``."""
    if not summary_csv.is_file():
        return {}
    with summary_csv.open(newline="") as fh:
        rows = {(row.get("mode", ""), row["method"]): row for row in csv.DictReader(fh)}
    return {
        key: {
            "final_loss": float(row["median_final_test_loss"]),
            "time_to_1pct": float(row["median_time_to_1pct"]),
            "time_to_0p1pct": float(row["median_time_to_0p1pct"]),
            "seeds": int(row["n_seeds"]),
        }
        for key, row in rows.items()
        if key[1] in BILEVEL
    }


def bilevel_memory(root: Path) -> str | None:
    """The L-BFGS memory policy across outer steps of the demo's SHINE runs (their configs)."""
    for path in sorted((root / "sweeps" / "demo_bilevel").rglob("config.yaml")):
        method = (yaml.safe_load(path.read_text()) or {}).get("method") or {}
        if method.get("name") == "shine":
            return str(method.get("inner_memory"))
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
    print(
        "\n== bi-level: l2-logistic regression on the 20news-sized synthetic set "
        "(18 000 x 100 000; held-out loss, medians over seeds; outer steps timed)"
    )
    memory = bilevel_memory(args.runs)
    for mode, words in MODES.items():
        rows = {m: r for (md, m), r in bilevel.items() if md == mode}
        if not rows:
            continue
        print(f"   method.mode={mode}: {words}")
        for method, row in rows.items():
            print(
                f"     {method:<14} final loss {row['final_loss']:9.3f}   time to 1 % / 0.1 % of "
                f"best {row['time_to_1pct']:.3f} / {row['time_to_0p1pct']:.3f} s "
                f"({row['seeds']} seeds)"
            )
        if "hoag" in rows and "shine" in rows:
            r1 = rows["hoag"]["time_to_1pct"] / rows["shine"]["time_to_1pct"]
            r01 = rows["hoag"]["time_to_0p1pct"] / rows["shine"]["time_to_0p1pct"]
            print(
                f"     speed-up of SHINE over HOAG ({mode}): {r1:.2f}x to 1 %, {r01:.2f}x to "
                "0.1 % of the best"
            )
    if memory is not None:
        print(f"   L-BFGS memory across outer steps: {memory} (the authors' Figure 1)")
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
