"""Core benchmark: Broyden forward overhead, torchdeq side by side, backward strategies, memory.

    python scripts/bench_core.py [--batch 4] [--iters 12] [--repeats 11] [--warmup 1]
                                 [--threads N] [--expansion 5] [--quick] [--out PATH]

On a DEQ whose ``f`` is an MDEQ-like multi-scale block of the MDEQ-CIFAR size (4 branches,
32/64/128/256 channels at 32/16/8/4 pixels, ``d = 61,440``; see
``shine/analysis/bench_models.py``):

* forward: a Broyden solve of ``DEQLayer.solve`` with ``tol = 0`` (all ``--iters`` iterations,
  ``memory = --iters``) against as many evaluations of ``f`` through the same packer as the solve
  makes (``n_evals = nstep + 1``). The solver overhead per iteration, relative to one evaluation
  of ``f``, is ``(T_solve - n_evals·T_f) / (nstep·T_f)``;
* torchdeq's ``broyden_solver`` (the project's ``bench`` extra) on the same ``f``, flattened
  state, iterations and memory: our time per iteration over torchdeq's;
* both solvers on a trivial element-wise residual of the same shape, which isolates the solvers'
  own arithmetic per iteration (diagnostic, no target);
* backward: after one fixed forward (the same solver result for every strategy), the wall time
  of ``loss.backward()`` and of the strategy alone (``DEQLayer.last_backward_time``) for
  JacobianFree, Shine, Fallback, two Refine variants and IFT with 20 iterations;
* memory: the size of SHINE's low-rank factors against the state.

The compared cases run back to back in each round (their order rotates from round to round), for
``--warmup`` untimed and ``--repeats`` timed rounds. Every ratio is computed per round, between
cases of that round, and its median over the rounds is reported (``*_fastest`` in the JSON: the
same ratio from the fastest time of each case), so that a load burst on a shared machine moves
both sides of a ratio. Targets are printed with PASS/FAIL; the exit code is 0 regardless (this is
a measurement). All numbers go to a JSON file (``--out``, default
``${SHINE_RUNS:-runs}/bench/bench_core.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from shine.analysis.bench import (
    Times,
    environment,
    interleaved,
    med,
    ms,
    per_round,
    summarize_targets,
    target,
    write_json,
)
from shine.analysis.bench_models import CHANNELS, RESOLUTIONS, make_problem, state_dim
from shine.backward import IFT, BroydenAdjoint, Fallback, JacobianFree, Refine, Shine
from shine.deq import DEQLayer, StatePacker
from shine.solvers.base import SolverResult
from shine.solvers.broyden import Broyden

DEFAULT_OUT = Path(os.environ.get("SHINE_RUNS", "runs")) / "bench" / "bench_core.json"

#: key -> (label, strategy factory taking the parsed arguments)
STRATEGIES: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]] = {
    "jacobian_free": ("JacobianFree", lambda a: JacobianFree()),
    "shine": ("Shine", lambda a: Shine()),
    "fallback": ("Fallback(Shine, JF, 1.3)", lambda a: Fallback(Shine(), JacobianFree(), 1.3)),
    "refine_shine": ("Refine(Shine, 5)", lambda a: Refine(Shine(), 5)),
    "refine_jf": (
        "Refine(JF, 5, no reuse)",
        lambda a: Refine(JacobianFree(), 5, solver=BroydenAdjoint()),
    ),
    "ift": ("IFT({n}, tol=0)", lambda a: IFT(max_iter=a.ift_iters, tol=0.0)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="samples per batch (default 4)")
    p.add_argument("--iters", type=int, default=12, help="forward Broyden iterations (tol = 0)")
    p.add_argument("--ift-iters", type=int, default=20, help="iterations of the IFT backward")
    p.add_argument("--repeats", type=int, default=11, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--expansion", type=int, default=5, help="branch width factor of f (MDEQ: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 1, 4 iterations, expansion 1, one round, no warm-up",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file with all numbers")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.iters, args.expansion, args.repeats, args.warmup = 1, 4, 1, 1, 0
    return args


def load_torchdeq() -> tuple[Callable[..., Any] | None, str | None, str | None]:
    """torchdeq's Broyden solver, its version, and the reason when it cannot be used."""
    try:
        from torchdeq.solver import get_solver

        return get_solver("broyden"), metadata.version("torchdeq"), None
    except Exception as exc:  # any import-time failure: not installed, incompatible deps, ...
        return None, None, f"{type(exc).__name__}: {exc}"


def bench_forward(args, f, x, torchdeq_broyden) -> dict[str, Any]:
    """Forward solves (no graph), ours and torchdeq's, on ``f`` and on a trivial residual."""
    n = args.iters
    layer = DEQLayer(f, Broyden(max_iter=n, tol=0.0, memory=n), JacobianFree())
    packer = StatePacker.like(x)

    def fmap(zf):
        return packer.flatten(f(packer.unflatten(zf), x))

    with torch.no_grad():
        z_star, _ = layer.solve(x)
        stats = layer.last_forward.stats
        nstep, n_evals = stats.nstep, stats.n_evals
        z0 = torch.zeros_like(z_star)
        g0 = (fmap(z0) - z0).norm(dim=1)
        residual = ((fmap(z_star) - z_star).norm(dim=1) / g0).max().item()

        # a trivial element-wise residual of the state's shape: a solve then costs the solver's
        # own arithmetic (low-rank products, bookkeeping) and little else
        gen = torch.Generator().manual_seed(args.seed)
        slope = torch.rand(z0.shape[1], generator=gen) * 1.8 - 0.9
        offset = torch.randn(z0.shape, generator=gen)

        def fcheap(zf):
            return slope * torch.tanh(zf) + offset

        def gcheap(zf):
            return fcheap(zf) - zf

        cheap_solver = Broyden(max_iter=n, tol=0.0, memory=n)
        cheap_nstep = cheap_solver(gcheap, z0).stats.nstep

        cases: dict[str, Callable[[], Any]] = {
            "f_block": lambda: [fmap(z_star) for _ in range(n_evals)],
            "shine": lambda: layer.solve(x),
            "f_block_cheap": lambda: [gcheap(z_star) for _ in range(n_evals)],
            "shine_cheap": lambda: cheap_solver(gcheap, z0),
        }
        td: dict[str, Any] | None = None
        if torchdeq_broyden is not None:
            calls = [0]

            def fmap_counted(zf):
                calls[0] += 1
                return fmap(zf)

            z_td = torchdeq_broyden(fmap_counted, z0, max_iter=n, tol=0.0, LBFGS_thres=n)[0]
            td_residual = ((fmap(z_td) - z_td).norm(dim=1) / g0).max().item()
            td = {"nstep": calls[0] - 1, "n_evals": calls[0], "residual_rel": td_residual}
            cases["torchdeq"] = lambda: torchdeq_broyden(
                fmap, z0, max_iter=n, tol=0.0, LBFGS_thres=n
            )
            cases["torchdeq_cheap"] = lambda: torchdeq_broyden(
                fcheap, z0, max_iter=n, tol=0.0, LBFGS_thres=n
            )
        times = interleaved(cases, args.repeats, args.warmup)

    def overhead(solve: str, steps: int) -> Callable[[dict[str, float]], float]:
        return lambda t: (t[solve] - t["f_block"]) / (steps * t["f_block"] / n_evals)

    def solver_only(solve: str, steps: int) -> Callable[[dict[str, float]], float]:
        return lambda t: (t[solve] - t["f_block_cheap"]) / steps

    ovh, ovh_fast = per_round(times, overhead("shine", nstep))
    only, only_fast = per_round(times, solver_only("shine_cheap", cheap_nstep))
    out: dict[str, Any] = {
        "iters": n,
        "memory": n,
        "f_eval_s": med(times["f_block"]) / n_evals,
        "cheap_residual_eval_s": med(times["f_block_cheap"]) / n_evals,
        "shine": {
            "nstep": nstep,
            "n_evals": n_evals,
            "solve_s": med(times["shine"]),
            "per_iter_s": med(times["shine"]) / nstep,
            "overhead": ovh,
            "overhead_fastest": ovh_fast,
            "overhead_incl_first_eval": per_round(
                times, lambda t: t["shine"] / nstep / (t["f_block"] / n_evals) - 1.0
            )[0],
            "solver_only_s_per_iter": only,
            "solver_only_s_per_iter_fastest": only_fast,
            "residual_rel": residual,
        },
        "times_s": times,
    }
    if td is not None:
        td_steps = td["nstep"]
        td_ovh, td_ovh_fast = per_round(times, overhead("torchdeq", td_steps))
        td_only, td_only_fast = per_round(times, solver_only("torchdeq_cheap", n))
        td.update(
            solve_s=med(times["torchdeq"]),
            per_iter_s=med(times["torchdeq"]) / td_steps,
            overhead=td_ovh,
            overhead_fastest=td_ovh_fast,
            solver_only_s_per_iter=td_only,
            solver_only_s_per_iter_fastest=td_only_fast,
        )
        out["torchdeq"] = td
        ratio, ratio_fast = per_round(
            times, lambda t: (t["shine"] / nstep) / (t["torchdeq"] / td_steps)
        )
        out["ratio_per_iter_shine_over_torchdeq"] = ratio
        out["ratio_per_iter_shine_over_torchdeq_fastest"] = ratio_fast
        ours_only = solver_only("shine_cheap", cheap_nstep)
        theirs_only = solver_only("torchdeq_cheap", n)
        out["ratio_solver_only_shine_over_torchdeq"] = per_round(
            times, lambda t: ours_only(t) / theirs_only(t)
        )[0]
    return out


class FixedForward:
    """A stand-in solver returning one precomputed result: every strategy sees the same forward."""

    def __init__(self, result: SolverResult) -> None:
        self.result = result

    def __call__(self, g, z0, **kwargs) -> SolverResult:
        return self.result


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the per-sample cosine similarity."""
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()


def bench_backward(args, f, x) -> dict[str, Any]:
    """``loss.backward()`` after one fixed forward, for each backward strategy."""
    n = args.iters
    solve = DEQLayer(f, Broyden(max_iter=n, tol=0.0, memory=n), Shine())
    with torch.no_grad():
        solve.solve(x)
    fixed = FixedForward(solve.last_forward)
    layers = {key: DEQLayer(f, fixed, make(args)) for key, (_, make) in STRATEGIES.items()}
    strategy_times: Times = {k: [] for k in layers}
    last: dict[str, Any] = {}

    def case(key: str) -> Callable[[], float]:
        layer = layers[key]

        def run() -> float:
            f.zero_grad(set_to_none=True)
            out = layer(x)  # the differentiable step f(z*, x) only: the solve is fixed
            loss = sum(o.square().sum() for o in out)
            start = time.perf_counter()
            loss.backward()
            elapsed = time.perf_counter() - start
            strategy_times[key].append(layer.last_backward_time)
            last[key] = layer.last_backward
            return elapsed

        return run

    times = interleaved({k: case(k) for k in layers}, args.repeats, args.warmup)
    ref = last["ift"].value
    out: dict[str, Any] = {}
    for key, (label, _) in STRATEGIES.items():
        stats = last[key].stats
        entry: dict[str, Any] = {
            "label": label.format(n=args.ift_iters),
            "full_s": med(times[key]),
            "strategy_s": med(strategy_times[key][args.warmup :]),
            "over_jf": per_round(times, lambda t, k=key: t[k] / t["jacobian_free"])[0],
            "n_vjps": stats.n_vjps,
            "cos_to_ift": cosine(last[key].value, ref),
        }
        if stats.fallback_mask is not None:
            entry["fallback_frac"] = stats.fallback_mask.double().mean().item()
        if stats.residual is not None:
            entry["adjoint_residual_rel_max"] = stats.residual.max().item()
        out[key] = entry
    out["times_s"] = times
    return out


def memory_report(args, f, x) -> dict[str, Any]:
    """Size of the forward estimate's factors (what SHINE keeps) against the state."""
    n = args.iters
    layer = DEQLayer(f, Broyden(max_iter=n, tol=0.0, memory=n), Shine())
    with torch.no_grad():
        layer.solve(x)
    inv = layer.last_forward.inverse
    B, d, M = args.batch, state_dim(), n
    itemsize = torch.finfo(torch.float32).bits // 8
    factors = 2 * B * M * d
    return {
        "batch": B,
        "d": d,
        "memory_M": M,
        "factor_floats": factors,
        "factor_bytes": factors * itemsize,
        "state_floats": B * d,
        "state_bytes": B * d * itemsize,
        "ratio_to_state": factors / (B * d),
        "estimate_floats": int(inv.U.numel() + inv.V.numel()),
        "estimate_rank": inv.rank,
    }


def report(res: dict[str, Any]) -> None:
    cfg, env, fw, bw, mem = (res[k] for k in ("config", "env", "forward", "backward", "memory"))
    print(
        f"SHINE core benchmark: torch {env['torch']}, {env['threads']} threads, "
        f"batch {cfg['batch']}, d = {cfg['d']:,} ({cfg['state']}), float32"
    )
    print(
        f"f = MDEQ-like block, expansion {cfg['expansion']}, {cfg['f_params']:,} parameters; "
        f"{cfg['repeats']} timed rounds after {cfg['warmup']} warm-up; ratios are medians of "
        "per-round ratios"
    )

    sh, td = fw["shine"], fw.get("torchdeq")
    print(f"\n== forward: Broyden, {fw['iters']} iterations (tol = 0, memory {fw['memory']})")
    print(f"  one evaluation of f (through the packer)    {ms(fw['f_eval_s'])}")
    rows = [("shine", sh)] + ([("torchdeq", td)] if td is not None else [])
    for name, r in rows:
        print(
            f"  {name:8s} solve ({r['nstep']} it, {r['n_evals']} evals)    {ms(r['solve_s'])}"
            f"  = {ms(r['per_iter_s'])}/it; solver overhead {100 * r['overhead']:5.1f}% of f"
            f" per it; final residual {r['residual_rel']:.2e} (relative)"
        )
    if td is not None:
        print(
            "  time per iteration, shine / torchdeq:      "
            f"{fw['ratio_per_iter_shine_over_torchdeq']:.3f}"
        )
    else:
        print(f"  torchdeq: SKIP ({env['torchdeq_skip']})")
    line = (
        f"  solver arithmetic alone (element-wise residual, {ms(fw['cheap_residual_eval_s'])}"
        f"/eval): shine {ms(sh['solver_only_s_per_iter'])}/it"
    )
    if td is not None:
        line += (
            f", torchdeq {ms(td['solver_only_s_per_iter'])}/it"
            f" (ratio {fw['ratio_solver_only_shine_over_torchdeq']:.2f})"
        )
    print(line)

    print("\n== backward: loss.backward() after one fixed forward (loss = Σ‖z_i‖²)")
    print(
        f"  {'strategy':26s} {'full backward':>13s} {'strategy':>11s} {'/ JF':>6s} {'VJPs':>5s}"
        f" {'cos(u, u_IFT)':>14s}"
    )
    for key in STRATEGIES:
        e = bw[key]
        extra = f"  fallback {100 * e['fallback_frac']:.0f}%" if "fallback_frac" in e else ""
        print(
            f"  {e['label']:26s} {ms(e['full_s']):>13s} {ms(e['strategy_s']):>11s}"
            f" {e['over_jf']:6.2f} {e['n_vjps']:5d} {e['cos_to_ift']:14.4f}{extra}"
        )

    print("\n== memory: SHINE's low-rank factors U, V (2·B·M·d floats)")
    print(
        f"  B = {mem['batch']}, M = {mem['memory_M']}, d = {mem['d']:,}: "
        f"{mem['factor_floats']:,} floats = {mem['factor_bytes'] / 2**20:.1f} MiB = "
        f"{mem['ratio_to_state']:.0f}x the state ({mem['state_bytes'] / 2**20:.2f} MiB)"
    )

    print("\n== targets")
    for t in res["targets"]:
        if t["status"] == "SKIP":
            print(f"  [SKIP] {t['name']}: {t['reason']}")
            continue
        print(
            f"  [{t['status']}] {t['name']}: {t['value']:.3f} "
            f"(target {t['op']} {t['threshold']:g}; from the fastest rounds "
            f"{t['value_fastest']:.3f})"
        )
    s = res["summary"]
    print(
        f"\nsummary: {s['passed']}/{s['evaluated']} targets met, {s['skipped']} skipped"
        f" (failed: {', '.join(s['failed']) or 'none'}); {s['wall_s']:.0f} s; JSON: {res['out']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torchdeq_broyden, td_version, td_skip = load_torchdeq()
    f, x = make_problem(args.batch, args.expansion, args.seed)

    forward = bench_forward(args, f, x, torchdeq_broyden)
    backward = bench_backward(args, f, x)
    memory = memory_report(args, f, x)
    bt = backward["times_s"]
    shine_jf = per_round(bt, lambda t: t["shine"] / t["jacobian_free"])
    ift_shine = per_round(bt, lambda t: t["ift"] / t["shine"])
    ratios = {
        "forward_overhead": forward["shine"]["overhead"],
        "forward_shine_over_torchdeq": forward.get("ratio_per_iter_shine_over_torchdeq"),
        "backward_shine_over_jf": shine_jf[0],
        "backward_ift_over_shine": ift_shine[0],
    }
    targets = [
        target(
            "forward: Broyden overhead per iteration / one f evaluation",
            forward["shine"]["overhead"],
            "<=",
            0.20,
            forward["shine"]["overhead_fastest"],
        ),
        target(
            "forward: time per iteration, shine / torchdeq",
            forward.get("ratio_per_iter_shine_over_torchdeq"),
            "<=",
            1.0,
            forward.get("ratio_per_iter_shine_over_torchdeq_fastest"),
            skip=None if torchdeq_broyden is not None else f"torchdeq unavailable ({td_skip})",
        ),
        target("backward: Shine / JacobianFree", shine_jf[0], "<=", 1.15, shine_jf[1]),
        target(f"backward: IFT({args.ift_iters}) / Shine", ift_shine[0], ">=", 10.0, ift_shine[1]),
    ]
    res = {
        "config": {
            "batch": args.batch,
            "iters": args.iters,
            "ift_iters": args.ift_iters,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "expansion": args.expansion,
            "seed": args.seed,
            "quick": args.quick,
            "d": state_dim(),
            "state": " + ".join(
                f"{c}x{r}x{r}" for c, r in zip(CHANNELS, RESOLUTIONS, strict=True)
            ),
            "f_params": sum(p.numel() for p in f.parameters()),
        },
        "env": environment(torchdeq=td_version, torchdeq_skip=td_skip),
        "forward": forward,
        "backward": backward,
        "memory": memory,
        "ratios": ratios,
        "targets": targets,
        "summary": summarize_targets(targets, start),
        "out": str(args.out),
    }
    report(res)
    write_json(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
