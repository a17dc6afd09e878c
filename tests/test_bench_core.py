"""Smoke test of the core benchmark: ``scripts/bench_core.py --quick`` runs and writes its JSON.

Timings are not checked (the targets are measurements, printed with PASS/FAIL by the script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"jacobian_free", "shine", "fallback", "refine_shine", "refine_jf", "ift"}


@pytest.mark.slow
def test_bench_core_quick_writes_every_number(tmp_path):
    out = tmp_path / "bench_core.json"
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "scripts/bench_core.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary:" in proc.stdout
    res = json.loads(out.read_text())

    sections = {"config", "env", "forward", "backward", "memory", "ratios", "targets", "summary"}
    assert sections <= set(res)
    assert res["config"]["quick"] is True
    assert res["config"]["d"] == 61_440

    fw = res["forward"]
    assert fw["f_eval_s"] > 0
    shine = fw["shine"]
    assert shine["nstep"] == res["config"]["iters"]
    assert shine["n_evals"] == shine["nstep"] + 1
    for key in ("solve_s", "per_iter_s", "overhead", "solver_only_s_per_iter", "residual_rel"):
        assert isinstance(shine[key], float)
    if res["env"]["torchdeq"] is not None:
        assert fw["torchdeq"]["nstep"] == shine["nstep"]
        assert isinstance(fw["ratio_per_iter_shine_over_torchdeq"], float)
    else:
        assert res["env"]["torchdeq_skip"]

    bw = res["backward"]
    assert STRATEGIES <= set(bw)
    for key in STRATEGIES:
        assert bw[key]["full_s"] > 0
        assert bw[key]["strategy_s"] >= 0
        assert -1.0 <= bw[key]["cos_to_ift"] <= 1.0 + 1e-6
    assert bw["ift"]["n_vjps"] == 21  # 20 iterations + the initial residual

    mem = res["memory"]
    assert mem["factor_floats"] == 2 * mem["batch"] * mem["memory_M"] * mem["d"]

    assert len(res["targets"]) == 4
    assert {t["status"] for t in res["targets"]} <= {"PASS", "FAIL", "SKIP"}
    summary = res["summary"]
    assert summary["evaluated"] + summary["skipped"] == 4
