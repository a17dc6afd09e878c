"""Figure: OPA inversion quality (paper Figure 2, right) from a run's metrics.jsonl.

    python scripts/fig_opa_inversion.py [RUN_DIR_OR_METRICS_JSONL] [--out figures/opa_inversion]

Default input: the run directory of ``python train.py +experiment=opa_inversion``
(``${SHINE_RUNS:-runs}/opa_inversion/seed=0``). One point per seed and direction: x = norm ratio
``‖b‖/‖a‖`` of the L-BFGS estimate ``b = H d`` over the exact ``a = ∇²h^{-1} d``, y = their cosine
similarity; (1, 1) is a perfect inversion. Left: L-BFGS without OPA; right: with OPA along the
prescribed direction. Prints the medians per panel and direction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from shine.analysis.style import figure, save

VARIANTS = {"no_opa": "L-BFGS (no OPA)", "opa": "L-BFGS + OPA"}
DIRECTIONS = {"prescribed": "prescribed", "krylov": "Krylov", "random": "random"}
#: one colour per direction (Okabe-Ito; the colours of SHINE, Jacobian-Free and grid search)
DIRECTION_COLORS = {"prescribed": "#D55E00", "krylov": "#0072B2", "random": "#009E73"}
DEFAULT_RUN = Path(os.environ.get("SHINE_RUNS", "runs")) / "opa_inversion" / "seed=0"


def load(path: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{variant: {direction: {"cos": (n,), "ratio": (n,)}}}`` from a metrics.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for variant in VARIANTS:
        rows = [r for r in records if r.get("variant") == variant]
        data[variant] = {
            d: {
                m: np.array([r[f"{variant}/{d}/{m}"] for r in rows], float)
                for m in ("cos", "ratio")
            }
            for d in DIRECTIONS
        }
    return data


def plot(data, out: Path) -> list[Path]:
    """Two scatter panels (no OPA, OPA) of cosine vs norm ratio, one colour per direction."""
    fig, axes = figure(ncols=2, height=2.6, sharex=True, sharey=True)
    for ax, (variant, title) in zip(axes[0], VARIANTS.items(), strict=True):
        for direction, label in DIRECTIONS.items():
            values = data[variant][direction]
            ax.scatter(
                values["ratio"],
                values["cos"],
                s=6,
                alpha=0.7,
                color=DIRECTION_COLORS[direction],
                label=label,
            )
        ax.axhline(1.0, color="0.6", lw=0.5, zorder=0)
        ax.axvline(1.0, color="0.6", lw=0.5, zorder=0)
        ax.set_title(title)
        ax.set_xlabel(r"norm ratio $\|b\| / \|a\|$")
    axes[0][0].set_ylabel(r"$\cos(a, b)$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0), markerscale=2
    )
    return save(fig, out)


def medians_table(data) -> str:
    """Median cosine and norm ratio per variant and direction, as text."""
    lines = [f"{'variant':<8} {'direction':<11} {'cos median':>11} {'ratio median':>13}  (n)"]
    for variant in VARIANTS:
        for direction in DIRECTIONS:
            v = data[variant][direction]
            lines.append(
                f"{variant:<8} {direction:<11} {np.median(v['cos']):>11.6f} "
                f"{np.median(v['ratio']):>13.6f}  ({len(v['cos'])})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--out", type=Path, default=Path("figures/opa_inversion"))
    args = parser.parse_args(argv)
    metrics = args.run / "metrics.jsonl" if args.run.is_dir() else args.run
    if not metrics.is_file():
        print(
            f"no metrics at {metrics}: run `python train.py +experiment=opa_inversion` "
            "(or `make demo`) first",
            file=sys.stderr,
        )
        return 1
    data = load(metrics)
    if not len(data["opa"]["prescribed"]["cos"]):
        print(f"{metrics} has no OPA inversion records", file=sys.stderr)
        return 1
    paths = plot(data, args.out)
    print(medians_table(data))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
