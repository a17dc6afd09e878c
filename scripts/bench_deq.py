"""DEQ benchmark: the Table E.2 protocol on the CIFAR-LARGE MDEQ, timings and memory per method.

    python scripts/bench_deq.py [--device auto|cpu|cuda] [--batch B] [--rounds R] [--warmup W]
                                [--methods original jacobian_free shine ...] [--iters-low 6]
                                [--backward-repeats K] [--threads N] [--seed 0] [--quick]
                                [--out PATH]

The model, forward solver and backward methods are those of ``+experiment=cifar_timing``, built
by ``train.py``'s ``compose_task`` (MDEQ CIFAR-LARGE, ``d = 61,440``; forward Broyden with the
training ``f_thres`` iterations, memory and ``f_tol``; ``original`` = IFT with ``b_thres``
iterations, ``jacobian_free``, ``shine`` and the refine / limited rows of Table E.2), randomly
initialised, in training mode (dropout masks drawn per batch, the same for every method), on
synthetic 3x32x32 images (timings do not depend on the pixels). Default batch: 32, the paper's
(~3 min on a 2-core CPU with 3 rounds). On a CPU the backward every method shares (head and
backprop through ``f(z*)``) costs ~2.2 VJPs of ``f`` at batch 32 and ~3 at batch 4, which caps
IFT(20) / SHINE near 1 + 21 / 2.2 ≈ 10.5 (measured 10.1-11.1) and 7.6 (batch 4); on a GPU the
paper measured 210 / 16 ms.

* **timings** (the protocol of ``shine/harness/tasks/deq_timing.py``, one step of it timed by
  ``shine/harness/tasks/step_timing.py``): forward = ``model(x)`` (stem,
  Broyden solve, the differentiable step ``f(z*)``, head), backward = the whole
  ``loss.backward()`` of the cross-entropy (head, the method's implicit correction, backprop
  through ``f(z*)``), each framed by ``torch.cuda.synchronize()`` on a GPU; the implicit
  correction alone is ``model.last_backward_time`` (timed inside the autograd hook, not
  synchronised). One model, its backward strategy swapped per method; in each round every method
  runs on that round's batch, back to back, in an order that rotates from round to round
  (``--warmup`` untimed rounds on the first batch first). On the CPU the backward of each step
  runs ``--backward-repeats`` times (default 3; 1 on CUDA) on the same graph and the fastest is
  kept (load bursts of a shared machine only slow runs down). Ratios are computed per round and
  their median is reported (``*_fastest``: the same ratio of the fastest times).
  Targets: backward IFT / SHINE >= 10 and SHINE / Jacobian-Free <= 1.15. Diagnostics: the cost
  of one VJP (IFT's correction over its VJPs), the backward every method shares (Jacobian-Free's)
  in VJPs, and SHINE / Jacobian-Free from the corrections alone (JF's backward plus the difference
  of the two corrections, which is all that differs between them).
* **memory (a)**: SHINE's extra memory is the forward estimate ``H = h0·I + U Vᵀ`` kept from the
  forward solve until the backward: the bytes of the (distinct) storages reachable from
  ``model.last_forward.inverse``, against the bound of its factors, ``2·B·M·d`` floats (plus the
  ``B·M`` per-column weights of the estimate at the lowest-residual iterate), ``M`` the Broyden
  memory. On CUDA also the memory freed when the estimate is released after a forward.
* **memory (b)**: training memory does not depend on the number of forward iterations. With the
  forward solver at ``--iters-low`` and at ``f_thres`` iterations (``tol = 0``: all of them run;
  memory = iterations, as the configs tie them), the bytes saved for backward (every tensor the
  autograd graph keeps, caught by ``torch.autograd.graph.saved_tensors_hooks``, counted once per
  storage; device independent) must be equal, and so must the rest of the forward result kept
  until the backward (``z*`` and its statistics); what grows with the iterations is reported
  separately: the estimate's factors (``∝ M``) and the residual trace of the statistics
  (``(n + 1)·B`` floats). On CUDA also the peak memory of a training step
  (``torch.cuda.max_memory_allocated``), whose growth must be that of the factors.

Targets are printed with PASS/FAIL (SKIP when they do not apply, e.g. CUDA-only ones on the CPU);
the exit code is 0 regardless (this is a measurement). All numbers go to a JSON file (``--out``,
default ``${SHINE_RUNS:-runs}/bench/bench_deq.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shine.analysis.bench import (
    environment,
    interleaved,
    med,
    ms,
    per_round,
    summarize_targets,
    target,
    write_json,
)
from shine.backward import IFT, Fallback, JacobianFree, Refine, Shine
from shine.harness.runtime.devices import synchronize
from shine.harness.tasks.step_timing import timed_training_step

DEFAULT_OUT = Path(os.environ.get("SHINE_RUNS", "runs")) / "bench" / "bench_deq.json"
EXPERIMENT = "cifar_timing"
#: the methods the targets compare (keys of the experiment's ``task.backwards``)
IFT_KEY, JF_KEY, SHINE_KEY = "original", "jacobian_free", "shine"
MiB = 2**20
#: slack of the CUDA check for the caching allocator's block rounding: a large block may be
#: handed out up to 1 MiB bigger than asked (not split further); three tensors (U, V, weights)
CUDA_ROUNDING = 3 * MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32, the paper's)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (3 on CPU, 20 on CUDA)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds first (1 on CPU, 3 on CUDA)"
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help="subset of the experiment's methods (all)"
    )
    p.add_argument(
        "--iters-low",
        type=int,
        default=6,
        help="forward iterations compared with f_thres in the memory check",
    )
    p.add_argument(
        "--backward-repeats",
        type=int,
        default=None,
        help="backward passes per forward, the fastest recorded (3 on CPU, 1 on CUDA)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: batch 1, one round, no warm-up"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file with all numbers")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.batch, args.rounds, args.warmup, args.backward_repeats = 1, 1, 0, 1
    if args.backward_repeats is None:
        args.backward_repeats = 1 if cuda else 3
    args.batch = args.batch or 32  # the paper's protocol, on both devices
    args.rounds = args.rounds or (20 if cuda else 3)
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    return args


def compose_timing_task(args: argparse.Namespace) -> Any:
    """The ``cifar_timing`` task (model config, solver, methods) built by train.py's code."""
    from train import compose_task

    return compose_task(
        [
            f"+experiment={EXPERIMENT}",
            "dataset=synthetic_images",
            "dataset.image_shape=[3,32,32]",
            f"task.batch_size={args.batch}",
            f"task.n_batches={args.rounds}",
            f"trainer.device='{args.device}'",
            "trainer.num_workers=0",
            f"seed={args.seed}",
        ]
    )


def label(strategy: Any) -> str:
    """A short name of a backward strategy, e.g. ``IFT (20 it)``, ``SHINE + refine (5)``."""
    if isinstance(strategy, IFT):
        return f"IFT ({strategy.max_iter} it)"
    if isinstance(strategy, JacobianFree):
        return "Jacobian-Free"
    if isinstance(strategy, Shine):
        return "SHINE"
    if isinstance(strategy, Refine):
        return f"{label(strategy.init)} + refine ({strategy.n_steps})"
    if isinstance(strategy, Fallback):
        return f"{label(strategy.primary)} / fallback {strategy.ratio:g}"
    return type(strategy).__name__


# ------------------------------------------------------------------------------ bytes
def storage_bytes(obj: Any) -> dict[int, int]:
    """``{storage address: bytes}`` of the distinct tensor storages reachable from ``obj``.

    Walks tensors, dataclasses, mappings, lists and tuples (a solver result, its statistics and
    its low-rank estimate); a view counts with its whole storage (the memory it keeps alive).
    """
    out: dict[int, int] = {}
    seen: set[int] = set()

    def walk(o: Any) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = s.nbytes()
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name))
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)

    walk(obj)
    return out


class SavedTensors:
    """``saved_tensors_hooks`` that count what the autograd graph keeps for the backward."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}
        self.count = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def summary(self) -> dict[str, int]:
        params = sum(b for p, b in self.storages.items() if p in self.param_storages)
        total = sum(self.storages.values())
        return {
            "saved_tensors": self.count,
            "saved_storages": len(self.storages),
            "saved_bytes": total,
            "saved_activation_bytes": total - params,
            "saved_parameter_bytes": params,
        }


# ---------------------------------------------------------------------------- timing
def train_step(
    model: Any,
    strategy: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    device: torch.device,
    backward_repeats: int = 1,
) -> dict[str, Any]:
    """One timed training step of ``model`` with ``strategy`` (forward, then loss.backward()).

    With ``backward_repeats > 1`` the backward runs that many times on the same graph (kept by
    ``retain_graph`` until the last one, gradients reset in between) and the fastest is recorded:
    on a loaded machine, a load burst only ever slows a run down.
    """
    model.backward_strategy = strategy
    cuda = device.type == "cuda"
    base: list[int] = []

    def on_start() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base.append(torch.cuda.memory_allocated(device))

    step = timed_training_step(model, x, y, gen, device, backward_repeats, on_start)
    backward, implicit = step.backward_s, step.implicit_s
    fwd, bwd = model.last_forward, model.last_backward
    rec: dict[str, Any] = {
        "forward_s": step.forward_s,
        "backward_s": min(backward),
        "implicit_s": min(implicit),
        "backward_repeats_s": backward,
        "fwd_nstep": int(fwd.stats.nstep),
        "fwd_residual_max": float(fwd.stats.residual.max()),
        "bwd_n_vjps": int(bwd.stats.n_vjps),
        "loss": float(step.loss),
    }
    if cuda:
        rec["peak_step_bytes"] = torch.cuda.max_memory_allocated(device) - base[0]
    return rec


def bench_timing(args, task, model, methods, batches, device) -> dict[str, Any]:
    """Interleaved timed training steps per method; medians and per-round ratios to JF."""
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}

    def case(method: str) -> Callable[[], float]:
        calls = [0]

        def run() -> float:
            index = max(0, calls[0] - args.warmup)  # warm-up rounds on the first batch
            calls[0] += 1
            x, y = batches[index]
            gen = task.batch_generator(index, device)
            rec = train_step(
                model, task.backwards[method], x, y, gen, device, args.backward_repeats
            )
            records[method].append(rec)
            return rec["backward_s"]

        return run

    backward = interleaved({m: case(m) for m in methods}, args.rounds, args.warmup)
    recs = {m: records[m][args.warmup :] for m in methods}
    forward = {m: [r["forward_s"] for r in recs[m]] for m in methods}
    implicit = {m: [r["implicit_s"] for r in recs[m]] for m in methods}
    out: dict[str, Any] = {}
    for m in methods:
        entry: dict[str, Any] = {
            "label": label(task.backwards[m]),
            "strategy": repr(task.backwards[m]),
            "forward_ms": 1e3 * med(forward[m]),
            "backward_ms": 1e3 * med(backward[m]),
            "implicit_ms": 1e3 * med(implicit[m]),
            "fwd_nstep": med([r["fwd_nstep"] for r in recs[m]]),
            "bwd_n_vjps": med([r["bwd_n_vjps"] for r in recs[m]]),
        }
        if JF_KEY in methods:
            entry["backward_over_jf"] = per_round(backward, lambda t, k=m: t[k] / t[JF_KEY])[0]
            entry["forward_over_jf"] = per_round(forward, lambda t, k=m: t[k] / t[JF_KEY])[0]
        if device.type == "cuda":
            entry["peak_step_mib"] = med([r["peak_step_bytes"] for r in recs[m]]) / MiB
        out[m] = entry
    out["times_s"] = {"forward": forward, "backward": backward, "implicit": implicit}
    return out


# ---------------------------------------------------------------------------- memory
def factor_bound(batch: int, memory: int, d: int, itemsize: int) -> dict[str, int]:
    """Bytes of the factors ``U, V: (B, M, d)`` and of the estimate's column weights ``(B, M)``."""
    return {
        "factor_bytes": 2 * batch * memory * d * itemsize,
        "weight_bytes": batch * memory * itemsize,
    }


def measure_step(model, x, y, gen, device) -> dict[str, Any]:
    """A SHINE training step with the saved tensors counted (and its CUDA peak)."""
    model.backward_strategy = Shine()
    model.deq.last_forward = model.deq.last_backward = None  # this step's memory only
    model.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    saved = SavedTensors(list(model.parameters()))
    with saved.hooks():
        logits = model(x, targets=y, generator=gen)
        loss = F.cross_entropy(logits, y)
    fwd = model.last_forward
    estimate = storage_bytes(fwd.inverse)
    trace = storage_bytes(fwd.stats.residual_trace)  # (nstep + 1, B): grows with the iterations
    result = {k: v for k, v in storage_bytes(fwd).items() if k not in estimate and k not in trace}
    loss.backward()
    synchronize(device)
    out: dict[str, Any] = {
        **saved.summary(),
        "estimate_bytes": sum(estimate.values()),
        "estimate_rank": int(fwd.inverse.rank),
        "forward_result_bytes": sum(result.values()),
        "residual_trace_bytes": sum(trace.values()),
        "fwd_nstep": int(fwd.stats.nstep),
    }
    if cuda:
        out["peak_step_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return out


def released_bytes(model, x, y, gen, device) -> int | None:
    """CUDA: the memory freed when the forward estimate is dropped after a SHINE forward."""
    if device.type != "cuda":
        return None
    model.backward_strategy = Shine()
    model.zero_grad(set_to_none=True)
    logits = model(x, targets=y, generator=gen)
    fwd = model.last_forward
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    fwd.inverse = None  # the backward hook holds the same result object
    gc.collect()
    synchronize(device)
    freed = before - torch.cuda.memory_allocated(device)
    del logits, fwd
    model.deq.last_forward = None
    return freed


def bench_memory(args, task, model, batches, device) -> dict[str, Any]:
    """(a) the estimate SHINE keeps against its factor bound; (b) iterations vs training memory."""
    B, d = args.batch, model.state_dim
    itemsize = next(model.parameters()).element_size()
    x, y = batches[0]
    solver = task.solver
    cuda = device.type == "cuda"

    # (a) the training configuration (f_thres, f_tol: may stop early; the buffers hold M columns)
    step = measure_step(model, x, y, task.batch_generator(0, device), device)
    bound = factor_bound(B, solver.memory, d, itemsize)
    shine_extra: dict[str, Any] = {
        "memory_M": solver.memory,
        "batch": B,
        "d": d,
        "estimate_bytes": step["estimate_bytes"],
        "estimate_rank": step["estimate_rank"],
        "fwd_nstep": step["fwd_nstep"],
        **bound,
        "bound_bytes": bound["factor_bytes"] + bound["weight_bytes"],
        "state_bytes": B * d * itemsize,
        "released_cuda_bytes": released_bytes(
            model, x, y, task.batch_generator(0, device), device
        ),
    }
    shine_extra["ratio_to_bound"] = shine_extra["estimate_bytes"] / shine_extra["bound_bytes"]
    shine_extra["ratio_to_state"] = shine_extra["estimate_bytes"] / shine_extra["state_bytes"]
    training = {k: step[k] for k in step if k.startswith("saved") or k == "forward_result_bytes"}

    # (b) the same step with all of n_low and of f_thres iterations (tol 0, memory = iterations)
    iters: dict[str, Any] = {}
    for n in (args.iters_low, solver.max_iter):
        model.solver = dataclasses.replace(solver, max_iter=n, memory=n, tol=0.0, rel_tol=0.0)
        if cuda:  # one untimed step first: the allocator and cuDNN settle
            measure_step(model, x, y, task.batch_generator(0, device), device)
        res = measure_step(model, x, y, task.batch_generator(0, device), device)
        res.update(factor_bound(B, n, d, itemsize))
        iters[str(n)] = res
    model.solver = solver
    lo, hi = iters[str(args.iters_low)], iters[str(solver.max_iter)]
    keys = ("saved_tensors", "saved_storages", "saved_bytes", "forward_result_bytes")
    check: dict[str, Any] = {
        "iters": [args.iters_low, solver.max_iter],
        "per_iters": iters,
        "saved_bytes_diff": hi["saved_bytes"] - lo["saved_bytes"],
        "independent": all(lo[k] == hi[k] for k in keys),
        "max_abs_diff": max(abs(hi[k] - lo[k]) for k in keys),
        "estimate_bytes_diff": hi["estimate_bytes"] - lo["estimate_bytes"],
        "factor_bound_diff": (hi["factor_bytes"] + hi["weight_bytes"])
        - (lo["factor_bytes"] + lo["weight_bytes"]),
    }
    if cuda:
        check["peak_diff_bytes"] = hi["peak_step_bytes"] - lo["peak_step_bytes"]
        check["peak_diff_minus_estimate_diff_bytes"] = (
            check["peak_diff_bytes"] - check["estimate_bytes_diff"]
        )
    return {"shine_extra": shine_extra, "training_step": training, "iterations": check}


# ---------------------------------------------------------------------------- report
def mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / MiB:.2f} MiB"


def report(res: dict[str, Any]) -> None:
    cfg, env, tm, mem = (res[k] for k in ("config", "env", "timing", "memory"))
    print(
        f"SHINE DEQ benchmark (Table E.2 protocol): MDEQ CIFAR-LARGE ({cfg['params']:,} "
        f"parameters, d = {cfg['d']:,}), {cfg['device_name']}, torch {env['torch']}, "
        f"{env['threads']} threads"
    )
    print(
        f"batch {cfg['batch']} of synthetic 3x32x32 images, training mode; forward Broyden "
        f"{cfg['f_thres']} iterations, memory {cfg['memory']}, tol {cfg['f_tol']:g}; "
        f"{cfg['rounds']} timed rounds after {cfg['warmup']} warm-up, methods interleaved, "
        f"fastest of {cfg['backward_repeats']} backward(s) per forward; ratios are medians of "
        "per-round ratios"
    )
    print("\n== timings: median over rounds (forward = model(x), backward = loss.backward())")
    print(
        f"  {'method':22s} {'':26s} {'forward':>11s} {'backward':>11s} {'implicit':>11s}"
        f" {'bwd/JF':>7s} {'fwd it':>6s} {'VJPs':>5s}"
    )
    for m in cfg["methods"]:
        e = tm[m]
        over = f"{e['backward_over_jf']:7.2f}" if "backward_over_jf" in e else f"{'':7s}"
        peak = f"  peak {e['peak_step_mib']:.0f} MiB" if "peak_step_mib" in e else ""
        print(
            f"  {m:22s} {e['label']:26s} {ms(e['forward_ms'] / 1e3)} {ms(e['backward_ms'] / 1e3)}"
            f" {ms(e['implicit_ms'] / 1e3)} {over} {e['fwd_nstep']:6.0f} {e['bwd_n_vjps']:5.0f}"
            f"{peak}"
        )

    r = res["ratios"]
    if "vjp_ms" in r:
        n = r["ift_n_vjps"]
        print(
            f"  one VJP of f (IFT's correction / its {n:.0f} VJPs): {r['vjp_ms']:.2f} ms; the part"
            f" of the backward every method shares (head, backprop through f(z*) = JF's"
            f" backward): {r['shared_backward_in_vjps']:.2f} VJPs, so IFT / SHINE is about"
            f" 1 + {n:.0f} / {r['shared_backward_in_vjps']:.2f} (>= 10 needs <= {n / 9:.2f} VJPs)"
        )
        print(
            "  SHINE / JF from the corrections alone (JF's backward + SHINE's correction - JF's):"
            f" {r['backward_shine_over_jf_from_corrections']:.3f}"
        )

    a, t, b = mem["shine_extra"], mem["training_step"], mem["iterations"]
    print("\n== memory (a): what SHINE keeps from the forward until the backward")
    print(
        f"  forward estimate H = h0 I + U V^T reachable from last_forward.inverse: "
        f"{mib(a['estimate_bytes'])} (rank {a['estimate_rank']}, {a['fwd_nstep']} iterations)"
    )
    print(
        f"  bound: U, V (B, M, d) = 2·{a['batch']}·{a['memory_M']}·{a['d']:,} floats = "
        f"{mib(a['factor_bytes'])} (+ {a['weight_bytes']} B column weights): ratio "
        f"{a['ratio_to_bound']:.4f}; {a['ratio_to_state']:.0f}x the state"
    )
    if a["released_cuda_bytes"] is not None:
        print(f"  CUDA: memory freed by dropping the estimate: {mib(a['released_cuda_bytes'])}")
    print(
        f"  for scale, saved for backward by the training step: {mib(t['saved_bytes'])} "
        f"({mib(t['saved_activation_bytes'])} activations, {mib(t['saved_parameter_bytes'])} "
        f"parameters, {t['saved_tensors']} tensors)"
    )
    lo_n, hi_n = b["iters"]
    lo, hi = b["per_iters"][str(lo_n)], b["per_iters"][str(hi_n)]
    print(
        f"\n== memory (b): forward with {lo_n} vs {hi_n} iterations (tol 0, memory = iterations)"
    )
    for name, key in (
        ("saved for backward", "saved_bytes"),
        ("  of which activations", "saved_activation_bytes"),
        ("forward result (z*, stats)", "forward_result_bytes"),
        ("residual trace (∝ iterations)", "residual_trace_bytes"),
        ("estimate (∝ M, separate)", "estimate_bytes"),
    ):
        print(f"  {name:28s} {mib(lo[key]):>12s} {mib(hi[key]):>12s}  diff {hi[key] - lo[key]} B")
    print(
        f"  saved tensors: {lo['saved_tensors']} vs {hi['saved_tensors']}; estimate growth "
        f"{mib(b['estimate_bytes_diff'])} (factor bound growth {mib(b['factor_bound_diff'])})"
    )
    if "peak_diff_bytes" in b:
        print(
            f"  CUDA peak of the step: {mib(lo['peak_step_bytes'])} vs "
            f"{mib(hi['peak_step_bytes'])}, diff {mib(b['peak_diff_bytes'])}"
        )

    print("\n== targets")
    for tg in res["targets"]:
        if tg["status"] == "SKIP":
            print(f"  [SKIP] {tg['name']}: {tg['reason']}")
            continue
        fastest = tg["value_fastest"]
        extra = "" if fastest is None else f"; from the fastest rounds {fastest:.3f}"
        print(
            f"  [{tg['status']}] {tg['name']}: {tg['value']:.4g} "
            f"(target {tg['op']} {tg['threshold']:g}{extra})"
        )
    s = res["summary"]
    print(
        f"\nsummary: {s['passed']}/{s['evaluated']} targets met, {s['skipped']} skipped"
        f" (failed: {', '.join(s['failed']) or 'none'}); {s['wall_s']:.0f} s; JSON: {res['out']}"
    )


def make_targets(args, methods, timing, memory, cuda) -> tuple[list[dict[str, Any]], dict]:
    bt = timing["times_s"]["backward"]
    ratios: dict[str, Any] = {}
    missing = [k for k in (IFT_KEY, JF_KEY, SHINE_KEY) if k not in methods]
    skip = f"methods {', '.join(missing)} not timed" if missing else None
    if skip is None:
        ift_shine = per_round(bt, lambda t: t[IFT_KEY] / t[SHINE_KEY])
        shine_jf = per_round(bt, lambda t: t[SHINE_KEY] / t[JF_KEY])
        ratios.update(
            backward_ift_over_shine=ift_shine[0],
            backward_ift_over_shine_fastest=ift_shine[1],
            backward_shine_over_jf=shine_jf[0],
            backward_shine_over_jf_fastest=shine_jf[1],
            forward_shine_over_jf=per_round(
                timing["times_s"]["forward"], lambda t: t[SHINE_KEY] / t[JF_KEY]
            )[0],
        )
        # why the IFT / SHINE ratio is what it is: IFT's correction costs n VJPs, and every
        # method shares the rest of the backward (head, backprop through f(z*): JF's backward)
        n = timing[IFT_KEY]["bwd_n_vjps"]
        parts = {"jf": bt[JF_KEY], "ift": timing["times_s"]["implicit"][IFT_KEY]}
        ratios["ift_n_vjps"] = n
        ratios["vjp_ms"] = 1e3 * per_round(parts, lambda t: t["ift"] / n)[0]
        ratios["shared_backward_in_vjps"] = per_round(parts, lambda t: t["jf"] * n / t["ift"])[0]
        corr = {
            "jf": bt[JF_KEY],
            "jf_impl": timing["times_s"]["implicit"][JF_KEY],
            "shine_impl": timing["times_s"]["implicit"][SHINE_KEY],
        }
        ratios["backward_shine_over_jf_from_corrections"] = per_round(
            corr, lambda t: (t["jf"] + t["shine_impl"] - t["jf_impl"]) / t["jf"]
        )[0]
    else:
        ift_shine = shine_jf = (None, None)
    a, b = memory["shine_extra"], memory["iterations"]
    lo = b["per_iters"][str(b["iters"][0])]
    ift_label = timing[IFT_KEY]["label"] if IFT_KEY in timing else "IFT"
    ift_name = f"backward: original {ift_label} / SHINE"
    targets = [
        target(ift_name, ift_shine[0], ">=", 10.0, ift_shine[1], skip=skip),
        target("backward: SHINE / Jacobian-Free", shine_jf[0], "<=", 1.15, shine_jf[1], skip=skip),
        target(
            "memory: SHINE's estimate / bound 2·B·M·d floats (+ B·M weights)",
            a["ratio_to_bound"],
            "<=",
            1.0,
        ),
        target(
            f"memory: bytes saved for backward, {b['iters'][1]} - {b['iters'][0]} iterations",
            float(b["max_abs_diff"]),
            "<=",
            0.0,
        ),
        target(
            f"memory: estimate growth {b['iters'][0]} -> {b['iters'][1]} iterations / the "
            "factors' growth",
            b["estimate_bytes_diff"] / b["factor_bound_diff"] if b["factor_bound_diff"] else None,
            "<=",
            1.0,
            skip=None if b["factor_bound_diff"] else "same M",
        ),
    ]
    released = a["released_cuda_bytes"]
    targets.append(
        target(
            "memory (CUDA): freed by dropping the estimate / bound (+ allocator rounding)",
            None if released is None else released / (a["bound_bytes"] + CUDA_ROUNDING),
            "<=",
            1.0,
            skip=None if cuda else "CUDA only",
        )
    )
    peak = None
    if cuda:
        # the step's peak may only grow by the factors (tolerance: 2 % of the smaller peak)
        peak = b["peak_diff_minus_estimate_diff_bytes"] / lo["peak_step_bytes"]
    targets.append(
        target(
            f"memory (CUDA): peak step memory growth {b['iters'][0]} -> {b['iters'][1]} "
            "iterations beyond the factors' / peak",
            None if peak is None else abs(peak),
            "<=",
            0.02,
            skip=None if cuda else "CUDA only",
        )
    )
    ratios["shine_extra_over_bound"] = a["ratio_to_bound"]
    ratios["saved_bytes_diff"] = b["saved_bytes_diff"]
    return targets, ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    task = compose_timing_task(args)
    methods = args.methods or task.methods
    unknown = [m for m in methods if m not in task.backwards]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; the experiment has {task.methods}")
    model, _ = task.build_model(task.solver, task.backwards[methods[0]], None, train=True)
    batches = list(task.training_batches(args.rounds))

    timing = bench_timing(args, task, model, methods, batches, device)
    memory = bench_memory(args, task, model, batches, device)
    targets, ratios = make_targets(args, methods, timing, memory, cuda)
    solver = task.solver
    res = {
        "config": {
            "experiment": EXPERIMENT,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "batch": args.batch,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "backward_repeats": args.backward_repeats,
            "seed": args.seed,
            "quick": args.quick,
            "methods": methods,
            "f_thres": solver.max_iter,
            "memory": solver.memory,
            "f_tol": solver.tol,
            "solver": repr(solver),
            "b_thres": getattr(task.backwards.get(IFT_KEY), "max_iter", None),
            "iters_low": args.iters_low,
            "d": model.state_dim,
            "params": sum(p.numel() for p in model.parameters()),
            "model": dataclasses.asdict(task.model),
        },
        "env": environment(),
        "timing": timing,
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
