# ruff: noqa: E402  (thread settings must precede the imports of numpy, scipy and torch)
"""Bi-level benchmark: our inner L-BFGS vs SciPy's, and the paper's speed claim for SHINE.

    python scripts/bench_bilevel.py [--dataset synthetic_news] [--seeds 0 1 2]
                                    [--modes faithful robust] [--methods hoag shine ...]
                                    [--inner-memory restart|keep|shift] [--threads 1] [--quick]
                                    [--out PATH]

Part 1 - inner solver. On the ℓ2-logistic inner problem of the data set (train split of seed 0),
our :class:`shine.solvers.LBFGS` as HOAG's experiment config sets it up and SciPy's L-BFGS-B
(``scipy.optimize.minimize``, memory 10) minimise ``h(·, λ)`` from the same random ``w0`` until
``‖∇h‖₂ <= rel·‖∇h(w0)‖₂``, for several ``λ`` and ``rel``, with the *same* oracle (the torch
value-and-gradient used by every method; SciPy gets it through numpy views, and stops through a
callback on the same 2-norm). Reported: time and iteration ratios SciPy / ours per case, and their
median (target: ours at least as fast, ratio >= 1), so that method timings compare methods, not
implementations.

Part 2 - methods. HOAG, SHINE and Jacobian-Free (``--methods`` adds the other methods of
Figure 1: shine_refine, shine_opa, hoag_limited, grid_search), in both modes (``faithful``: the
authors' algorithm, ``robust``: ours), on the authors' split (``dataset.outer_half=second``),
run through the real pipeline
(the Hydra experiment configs, ``HyperparameterOptimization`` and the shared trainer, timing the
outer steps only: inner solve, outer loss, backward and update, as the authors' callback timing)
on each seed. Per seed the reference is the best held-out loss reached by any method; for each
method the time to get within 1 % and 0.1 % of it (the paper's "acceptable level";
``shine/analysis/time_to_target.py``, shared with ``fig_bilevel.py``), its final held-out loss, its
time split into inner solves and backward (whole run, and up to the 1 % point), its inner L-BFGS
iterations and their cost. Reported: median over seeds, and the speed-up HOAG time / SHINE time to
1 % and to 0.1 %. Targets: in robust mode, HOAG / SHINE to 1 % >= 2 (the paper's claim) with
SHINE's final loss no worse than HOAG's by more than 0.1 % (when missed, a ``why:`` line says which
measured cost is responsible); in faithful mode, the methods come in the order of the authors' own
code on the same data (time to 1 %, from ``experiments/authors_code/fig1/summary.csv``, measured on
this machine; see its README), whose speed-up is printed beside ours.
The HOAG-family methods restart their L-BFGS memory at every outer step, as the authors' Figure 1
runs (Fortran L-BFGS-B; the configs' default); ``--inner-memory keep|shift`` compares the other
choices.

Timings are medians over seeds of one run each; ratios compare methods run back to back. Targets
print PASS/FAIL; the exit code is 0 regardless (a measurement). JSON: ``--out`` (default
``${SHINE_RUNS:-runs}/bench/bench_bilevel.json``).
"""

from __future__ import annotations

import os

# one thread per BLAS/OpenMP pool before numpy/scipy/torch load them: idle BLAS threads of SciPy
# spinning beside torch's threads on a small machine would distort the comparison (10x seen)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from shine.analysis.time_to_target import (
    TARGETS,
    first_within,
    median_or_nan,
    threshold,
    time_to_within,
)
from shine.bilevel import L2Regularized
from shine.harness.runtime import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(os.environ.get("SHINE_RUNS", "runs")) / "bench" / "bench_bilevel.json"
METHODS = [
    "hoag",
    "shine",
    "shine_refine",
    "shine_opa",
    "jacobian_free",
    "hoag_limited",
    "grid_search",
]
SEARCHES = {"grid_search", "random_search"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic_news", help="configs/dataset/ name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["faithful", "robust"])
    p.add_argument("--methods", nargs="+", default=["hoag", "shine", "jacobian_free"])
    p.add_argument(
        "--authors",
        type=Path,
        default=ROOT / "experiments" / "authors_code" / "fig1" / "summary.csv",
        help="summary of the authors' code on --dataset (the faithful ordering target)",
    )
    p.add_argument(
        "--inner-memory",
        choices=["restart", "keep", "shift"],
        default=None,
        help="method.inner_memory of the HOAG-family methods (default: the configs' restart, "
        "the authors' Figure 1 runs: Fortran L-BFGS-B restarted every outer step)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="small data, one seed, few iterations")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def compose_task(experiment: str, overrides: list[str]) -> Any:
    """The task of ``+experiment=experiment`` with ``overrides``, built by train.py's code."""
    from train import compose_task as compose

    return compose([f"+experiment={experiment}", *overrides])


# ---------------------------------------------------------------------------- part 1
def bench_inner(dataset: str, quick: bool) -> dict[str, Any]:
    overrides = [f"dataset={dataset}", "seed=0"] + (quick_overrides() if quick else [])
    task = compose_task("synthetic_news", ["method=hoag", *overrides])
    problem, w0 = task.build()
    inner: L2Regularized = problem.inner
    cases = []
    lams = (-2.0, 0.0, 2.0)
    rels = (1e-3, 1e-6)
    for lam_value in lams:
        lam = torch.tensor(lam_value, dtype=inner.dtype)
        fun = inner.objective(lam)
        ref = float(torch.linalg.vector_norm(fun(w0)[1]))
        for rel in rels:
            tol = rel * ref
            t0 = time.perf_counter()
            ours = replace(task.method.solver, tol=tol, rel_tol=0.0, max_iter=10_000)(fun, w0)
            t_ours = time.perf_counter() - t0
            sp = scipy_lbfgs(fun, w0, tol)
            cases.append(
                {
                    "log_lambda": lam_value,
                    "rel_tol": rel,
                    "ours_time": t_ours,
                    "ours_iters": int(ours.stats.nstep),
                    "ours_evals": int(ours.stats.n_evals),
                    "ours_grad_norm": float(ours.stats.residual),
                    "ours_value": float(fun(ours.value)[0]),
                    **sp,
                    "time_ratio_scipy_over_ours": sp["scipy_time"] / t_ours,
                }
            )
    ratios = [c["time_ratio_scipy_over_ours"] for c in cases]
    return {
        "cases": cases,
        "median_time_ratio": statistics.median(ratios),
        "n_features": w0.numel(),
    }


def scipy_lbfgs(fun: Any, w0: torch.Tensor, tol: float) -> dict[str, Any]:
    """SciPy L-BFGS-B (memory 10) on the same torch oracle, stopped at ‖∇h‖₂ <= tol."""
    last: dict[str, float] = {"gnorm": math.inf}

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = fun(torch.from_numpy(x))
        g = grad.numpy()
        last["gnorm"] = float(np.linalg.norm(g))
        return float(value), g

    def callback(intermediate_result: Any) -> None:
        if last["gnorm"] <= tol:
            raise StopIteration

    t0 = time.perf_counter()
    res = minimize(
        f,
        w0.numpy().copy(),
        jac=True,
        method="L-BFGS-B",
        callback=callback,
        options={"maxcor": 10, "gtol": 0.0, "ftol": 0.0, "maxiter": 10_000, "maxfun": 100_000},
    )
    dt = time.perf_counter() - t0
    value, grad = fun(torch.from_numpy(res.x))
    return {
        "scipy_time": dt,
        "scipy_iters": int(res.nit),
        "scipy_evals": int(res.nfev),
        "scipy_grad_norm": float(torch.linalg.vector_norm(grad)),
        "scipy_value": float(value),
    }


# ---------------------------------------------------------------------------- part 2
def quick_overrides() -> list[str]:
    return [
        "dataset.n_samples=1500",
        "dataset.n_features=2000",
        "dataset.nnz_per_row=20",
    ]


def run_method(
    dataset: str, method: str, seed: int, mode: str, quick: bool, inner_memory: str | None = None
) -> list[dict]:
    overrides = [f"dataset={dataset}", f"seed={seed}", "dataset.outer_half=second"]
    overrides += quick_overrides() if quick else []
    overrides.append(f"method.mode={mode}")
    if method not in SEARCHES:
        if inner_memory is not None:
            overrides.append(f"method.inner_memory={inner_memory}")
        if quick:
            overrides.append("method.max_iter=8")
    # every bi-level experiment is the same but for its data set: take one family, swap the data
    task = compose_task("synthetic_news", [f"method={method}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDirectory(tmp)
        run_dir.start("bench: true\n")
        task.run(run_dir)
        return run_dir.read_metrics()


#: per-seed quantities whose median over seeds is reported
SUMMARY_KEYS = (
    "time_to_1pct",
    "time_to_0.1pct",
    "final_test_loss",
    "total_time",
    "inner_time",
    "backward_time",
    "inner_iters",
    "ms_per_inner_iter",
    "steps_to_1pct",
    "inner_time_to_1pct",
    "backward_time_to_1pct",
    "inner_iters_to_1pct",
    "free_backward_bound",
    "n_rejected",
    "lambda_spread_last10",
)


def seed_row(recs: list[dict], best: float) -> dict[str, Any]:
    """The numbers of one run (one method, one seed) against the seed's best held-out loss."""
    times = [r["time"] for r in recs]
    losses = [r["test_loss"] for r in recs]
    steps = [r for r in recs if r["step"] > 0]
    hit = first_within(losses, best, TARGETS["1pct"])
    upto = [r for r in recs[1 : (hit or 0) + 1]] if hit is not None else []
    inner_iters = sum(r.get("inner_iters", 0) for r in steps)
    inner_time = sum(r.get("inner_time", 0.0) for r in steps)
    lams = [r["log_lambda"][0] for r in steps[-10:] if r.get("log_lambda")]

    def upto_sum(key: str) -> float:
        return float(sum(r.get(key, 0.0) for r in upto)) if hit is not None else math.inf

    t1, in1 = time_to_within(times, losses, best, TARGETS["1pct"]), upto_sum("inner_time")

    return {
        "best": best,
        "time_to_1pct": t1,
        "time_to_0.1pct": time_to_within(times, losses, best, TARGETS["0p1pct"]),
        "final_test_loss": recs[-1]["test_loss"],
        "total_time": recs[-1]["time"],
        "inner_time": inner_time,
        "backward_time": sum(r.get("backward_time", 0.0) for r in steps),
        "inner_iters": inner_iters,
        "ms_per_inner_iter": 1e3 * inner_time / inner_iters if inner_iters else math.nan,
        "steps_to_1pct": float(hit) if hit is not None else math.inf,
        "inner_time_to_1pct": upto_sum("inner_time"),
        "backward_time_to_1pct": upto_sum("backward_time"),
        "inner_iters_to_1pct": upto_sum("inner_iters"),
        # time to 1 % over its inner-solve part: the speed-up a free backward could give at most
        "free_backward_bound": t1 / in1 if 0 < in1 < math.inf else math.inf,
        "n_rejected": sum(bool(r.get("rejected", False)) for r in steps),
        "lambda_spread_last10": (max(lams) - min(lams)) if lams else math.nan,
    }


def bench_methods(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in args.modes:
        per_seed: dict[str, list[dict]] = {m: [] for m in args.methods}
        for seed in args.seeds:
            runs = {
                m: run_method(args.dataset, m, seed, mode, args.quick, args.inner_memory)
                for m in args.methods
            }
            best = min(r["test_loss"] for recs in runs.values() for r in recs)
            for m, recs in runs.items():
                per_seed[m].append({"seed": seed, **seed_row(recs, best)})
            logging.info("mode %s seed %d done", mode, seed)
        summary = {
            m: {k: median_or_nan([row[k] for row in rows]) for k in SUMMARY_KEYS}
            for m, rows in per_seed.items()
        }
        out[mode] = {"per_seed": per_seed, "median": summary}
    return out


def verdict(hoag: dict[str, float], shine: dict[str, float]) -> tuple[float, bool, str]:
    """Speed-up HOAG / SHINE to 1 %, whether the target is met, and why (measured), in words.

    The target: SHINE at least twice as fast to 1 % of the best held-out loss, with a final
    held-out loss no worse than HOAG's by more than 0.1 %.
    """
    speedup = hoag["time_to_1pct"] / shine["time_to_1pct"]
    loss_ok = shine["final_test_loss"] <= threshold(hoag["final_test_loss"], 1e-3)
    ok = bool(speedup >= 2.0 and loss_ok)
    if ok:
        return speedup, ok, "target met"
    if math.isnan(speedup):
        return speedup, ok, "the median seed of HOAG or SHINE never got within 1 % of the best"
    why = []
    if speedup < 2.0:
        in_h, bw_h = hoag["inner_time_to_1pct"], hoag["backward_time_to_1pct"]
        in_s, bw_s = shine["inner_time_to_1pct"], shine["backward_time_to_1pct"]
        bound = hoag["free_backward_bound"]
        lead = "inner solves dominate" if in_h >= bw_h else "SHINE's inner solves are costlier"
        why.append(
            f"{lead}: up to 1 % HOAG spends {in_h:.3f} s in inner solves and "
            f"{bw_h:.3f} s in its CG backward ({hoag['steps_to_1pct']:.0f} outer steps), "
            f"so a free backward with HOAG's inner solves would be at most {bound:.2f}x faster; "
            f"SHINE's backward takes {bw_s:.3f} s but its inner solves {in_s:.3f} s "
            f"({shine['inner_iters_to_1pct']:.0f} L-BFGS iterations at "
            f"{shine['ms_per_inner_iter']:.1f} ms each vs HOAG's "
            f"{hoag['inner_iters_to_1pct']:.0f} at {hoag['ms_per_inner_iter']:.1f} ms)"
        )
    if not loss_ok:
        why.append(
            f"SHINE's final held-out loss {shine['final_test_loss']:.3f} is worse than HOAG's "
            f"{hoag['final_test_loss']:.3f} by more than 0.1 % (lambda spread over the last 10 "
            f"steps: SHINE {shine['lambda_spread_last10']:.3f}, HOAG "
            f"{hoag['lambda_spread_last10']:.3f}: its inexact hypergradient keeps lambda moving)"
        )
    return speedup, ok, "; ".join(why)


def authors_times(path: Path, dataset: str) -> dict[str, float]:
    """Median time to 1 % per method of the authors' code on ``dataset`` (empty if unknown)."""
    import csv

    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == dataset]
    return {r["method"]: float(r["median_time_to_1pct"]) for r in rows}


def ordering(times: dict[str, float]) -> list[str]:
    """Methods from fastest to slowest (time to 1 %; never reached: last)."""
    return sorted(times, key=lambda m: (not math.isfinite(times[m]), times[m], m))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.dataset = "synthetic_news_small"
    if args.threads:
        torch.set_num_threads(args.threads)
    res: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    print(f"== part 1: inner L-BFGS vs SciPy L-BFGS-B on {args.dataset} (memory 10)")
    inner = bench_inner(args.dataset, args.quick)
    res["inner"] = inner
    print(f"   {'lambda':>7} {'rel':>6} {'ours s':>8} {'its':>5} {'scipy s':>8} {'its':>5} ratio")
    for c in inner["cases"]:
        print(
            f"   {c['log_lambda']:7.1f} {c['rel_tol']:6.0e} {c['ours_time']:8.3f} "
            f"{c['ours_iters']:5d} {c['scipy_time']:8.3f} {c['scipy_iters']:5d} "
            f"{c['time_ratio_scipy_over_ours']:.2f}"
        )
    targets = {}
    ok = inner["median_time_ratio"] >= 1.0
    targets["inner_lbfgs_at_least_as_fast_as_scipy"] = ok
    print(
        f"   median time ratio SciPy / ours = {inner['median_time_ratio']:.2f} "
        f"(target >= 1): {'PASS' if ok else 'FAIL'}"
    )

    memory = args.inner_memory or "restart (configs)"
    print(f"== part 2: methods on {args.dataset}, seeds {args.seeds}, inner memory {memory}")
    methods = bench_methods(args)
    res["methods"] = methods
    for mode, block in methods.items():
        print(f"   mode={mode} (medians over seeds; times in s, outer steps only)")
        print(
            f"   {'method':<14} {'to 1%':>7} {'to 0.1%':>8} {'final loss':>11} "
            f"{'total':>7} {'inner':>7} {'backward':>8} {'in its':>7} {'ms/it':>6} "
            f"{'steps1%':>7} {'inner1%':>7} {'bwd1%':>7}"
        )
        for m, s in block["median"].items():
            print(
                f"   {m:<14} {s['time_to_1pct']:7.3f} {s['time_to_0.1pct']:8.3f} "
                f"{s['final_test_loss']:11.3f} {s['total_time']:7.3f} {s['inner_time']:7.3f} "
                f"{s['backward_time']:8.3f} {s['inner_iters']:7.0f} "
                f"{s['ms_per_inner_iter']:6.1f} {s['steps_to_1pct']:7.0f} "
                f"{s['inner_time_to_1pct']:7.3f} {s['backward_time_to_1pct']:7.3f}"
            )
        med = block["median"]
        if "hoag" not in med or "shine" not in med:
            continue
        for key, column in (("1pct", "time_to_1pct"), ("0p1pct", "time_to_0.1pct")):
            ratio = med["hoag"][column] / med["shine"][column]
            block[f"speedup_hoag_over_shine_to_{key}"] = ratio
        print(
            f"   speed-up HOAG / SHINE: {block['speedup_hoag_over_shine_to_1pct']:.2f} to 1 %, "
            f"{block['speedup_hoag_over_shine_to_0p1pct']:.2f} to 0.1 %"
        )
        if mode == "robust":
            speedup, ok, why = verdict(med["hoag"], med["shine"])
            block["verdict"] = why
            targets["shine_2x_faster_than_hoag_robust"] = ok
            print(
                f"   target (robust): HOAG / SHINE to 1 % = {speedup:.2f} >= 2, final loss "
                f"SHINE {med['shine']['final_test_loss']:.3f} vs HOAG "
                f"{med['hoag']['final_test_loss']:.3f}: {'PASS' if ok else 'FAIL'}"
            )
            if not ok:
                print(f"   why: {why}")
        else:
            theirs = authors_times(args.authors, args.dataset)
            ours = {m: med[m]["time_to_1pct"] for m in med if m in theirs}
            if len(ours) < 2:
                print(f"   (no authors' code results for {args.dataset} in {args.authors})")
                continue
            same = ordering(ours) == ordering({m: theirs[m] for m in ours})
            block["authors_ordering"] = ordering({m: theirs[m] for m in ours})
            block["ordering"] = ordering(ours)
            targets[f"faithful_{mode}_ordering_as_authors_code"] = same
            authors_speedup = theirs.get("hoag", math.nan) / theirs.get("shine", math.nan)
            block["authors_speedup_hoag_over_shine_to_1pct"] = authors_speedup
            print(
                f"   target ({mode}): order by time to 1 % {' < '.join(ordering(ours))}; "
                f"authors' code {' < '.join(block['authors_ordering'])} (their HOAG / SHINE "
                f"{authors_speedup:.2f}): {'PASS' if same else 'FAIL'}"
            )
    res["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"summary: {sum(targets.values())}/{len(targets)} targets met; numbers in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
