"""Smoke test of the DEQ benchmark: ``scripts/bench_deq.py --quick`` runs and writes its JSON.

Timings are not checked against their targets (measurements, printed with PASS/FAIL by the
script); the memory accounting is deterministic and is checked exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
bench_deq = load_script("bench_deq")

#: the rows of Table E.2 in configs/experiment/cifar_timing.yaml
METHODS = {
    "original",
    "jacobian_free",
    "shine",
    "shine_refine",
    "jacobian_free_refine",
    "original_limited",
}


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_deq_quick_writes_every_number(tmp_path, capsys):
    out = tmp_path / "bench_deq.json"
    assert bench_deq.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert "summary:" in capsys.readouterr().out
    res = json.loads(out.read_text())

    assert {"config", "env", "timing", "memory", "ratios", "targets", "summary"} <= set(res)
    cfg = res["config"]
    assert cfg["quick"] is True and cfg["batch"] == 1 and cfg["rounds"] == 1
    assert cfg["d"] == 61_440  # the CIFAR-LARGE model of the experiment
    # the solver and the IFT backward come from the configs (trainer/cifar.yaml)
    assert (cfg["f_thres"], cfg["memory"], cfg["b_thres"]) == (18, 18, 20)
    assert set(cfg["methods"]) == METHODS

    timing = res["timing"]
    for m in METHODS:
        e = timing[m]
        assert positive(e["forward_ms"]) and positive(e["backward_ms"]), m
        assert math.isfinite(e["implicit_ms"]) and e["implicit_ms"] >= 0, m
        assert positive(e["backward_over_jf"]), m
        for kind in ("forward", "backward", "implicit"):
            assert len(timing["times_s"][kind][m]) == 1
    assert timing["original"]["bwd_n_vjps"] == 21  # b_thres iterations + the initial residual
    assert timing["shine"]["bwd_n_vjps"] == 0

    mem = res["memory"]
    a = mem["shine_extra"]
    assert a["factor_bytes"] == 2 * a["batch"] * a["memory_M"] * a["d"] * 4
    assert 0 < a["estimate_bytes"] <= a["bound_bytes"]
    assert a["released_cuda_bytes"] is None  # CPU run
    assert mem["training_step"]["saved_bytes"] > 0

    b = mem["iterations"]
    lo, hi = (b["per_iters"][str(n)] for n in b["iters"])
    assert b["iters"] == [6, 18]
    assert (lo["fwd_nstep"], hi["fwd_nstep"]) == (6, 18)  # tol 0: every iteration runs
    # what the graph keeps for the backward does not depend on the forward iterations ...
    for key in ("saved_tensors", "saved_storages", "saved_bytes", "forward_result_bytes"):
        assert lo[key] == hi[key] > 0, key
    assert b["independent"] is True and b["max_abs_diff"] == 0
    # ... only the estimate does, by exactly its factors (and column weights)
    assert b["estimate_bytes_diff"] == b["factor_bound_diff"] > 0
    for r in (lo, hi):
        assert r["estimate_bytes"] == r["factor_bytes"] + r["weight_bytes"]

    targets = {t["name"]: t for t in res["targets"]}
    assert len(targets) == 7
    assert {t["status"] for t in targets.values()} <= {"PASS", "FAIL", "SKIP"}
    memory_targets = [t for name, t in targets.items() if name.startswith("memory:")]
    assert len(memory_targets) == 3 and all(t["status"] == "PASS" for t in memory_targets)
    assert all(t["status"] == "SKIP" for n, t in targets.items() if "(CUDA)" in n)
    s = res["summary"]
    assert s["evaluated"] + s["skipped"] == 7 and s["skipped"] == 2
