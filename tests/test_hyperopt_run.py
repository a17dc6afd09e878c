"""Hyper-parameter optimisation runs: the shared trainer, resume, and train.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import run_task

from shine.backward import Shine
from shine.bilevel import HOAG, GridSearch
from shine.data import BreastCancer
from shine.harness.runtime import RunDirectory
from shine.harness.tasks import HyperparameterOptimization
from shine.harness.training import Trainer
from shine.solvers import LBFGS

ROOT = Path(__file__).resolve().parents[1]


def task(stop_after=None, method=None, **kw):
    return HyperparameterOptimization(
        dataset=BreastCancer(),
        method=method or HOAG(solver=LBFGS(memory=30), backward=Shine(), max_iter=6, name="shine"),
        seed=3,
        trainer=Trainer(stop_after=stop_after),
        **kw,
    )


def strip_time(records):
    drop = {"wall_time", "time", "step_time", "inner_time", "backward_time"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_records_summary_and_timing_split(tmp_path):
    run_dir, summary = run_task(tmp_path / "a", task())
    records = run_dir.read_metrics()
    assert [r["step"] for r in records] == list(range(7))
    assert records[0]["time"] == 0.0 and "test_loss" in records[0]
    times = [r["time"] for r in records]
    assert times == sorted(times)
    for r in records[1:]:
        assert r["inner_time"] + r["backward_time"] <= r["step_time"] + 1e-9
        assert {"outer_loss", "test_loss", "log_lambda", "hypergradient", "inner_iters"} <= set(r)
    assert summary["method"] == "shine" and summary["n_steps"] == 6
    assert summary["final_test_loss"] == records[-1]["test_loss"]
    assert summary["time_s"] == pytest.approx(records[-1]["time"])


@pytest.mark.parametrize(
    "method",
    [
        HOAG(solver=LBFGS(memory=30), backward=Shine(), max_iter=6, name="shine"),
        GridSearch(n_points=6, name="grid_search"),
    ],
    ids=["hoag", "grid"],
)
def test_interrupted_run_resumes_to_identical_records(tmp_path, method):
    reference, _ = run_task(tmp_path / "ref", task(method=method))
    first, out = run_task(tmp_path / "cut", task(stop_after=2, method=method))
    assert out is None and not first.is_complete()
    resumed, out = run_task(tmp_path / "cut", task(method=method))
    assert out is not None
    assert strip_time(resumed.read_metrics()) == strip_time(reference.read_metrics())


def test_group_regularisation_runs(tmp_path):
    method = HOAG(solver=LBFGS(memory=30), backward=Shine(), max_iter=3, name="shine")
    run_dir, _ = run_task(tmp_path / "g", task(method=method, n_groups=3))
    assert len(run_dir.read_metrics()[-1]["log_lambda"]) == 3


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="'logistic' or 'nls'"):
        task(loss="squares")
    with pytest.raises(ValueError, match="HOAG, GridSearch or RandomSearch"):
        HyperparameterOptimization(dataset=BreastCancer(), method=torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------- train.py
def train(args: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args, f"paths.log_dir={log_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_train_py_runs_an_experiment_and_skips_it_when_complete(tmp_path):
    proc = train(["+experiment=breast_cancer", "method=shine", "method.max_iter=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "breast_cancer_shine" / "method.max_iter=4" / "seed=0"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5
    summary = json.loads((run / "summary.json").read_text())
    assert RunDirectory.final_metrics(summary)["method"] == "shine"
    proc = train(["+experiment=breast_cancer", "method=shine", "method.max_iter=4"], tmp_path)
    assert "already complete" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_multirun_over_methods_gives_each_its_own_directory(tmp_path):
    # without a sweep file the sweep folder is "adhoc": two methods of one experiment with the
    # same other overrides must not share a run directory (the second would skip as "already
    # complete"): each is <experiment>_<method>
    proc = train(
        ["-m", "+experiment=breast_cancer", "method=shine,jacobian_free", "seed=3"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" not in proc.stdout + proc.stderr
    summaries = sorted((tmp_path / "sweeps" / "adhoc").glob("*/*/summary.json"))
    found = {p.parent.parent.name: json.loads(p.read_text())["method"] for p in summaries}
    assert found == {
        "breast_cancer_shine": "shine",
        "breast_cancer_jacobian_free": "jacobian_free",
    }
    assert {p.parent.name for p in summaries} == {"seed=3"}


@pytest.mark.slow
def test_sweep_writes_one_run_per_method_and_seed(tmp_path):
    proc = train(["-m", "+sweep=fig1", "method=shine,grid_search", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "sweeps" / "fig1").glob("*/seed=*/summary.json"))
    assert len(summaries) == 4
    methods = sorted(json.loads(p.read_text())["method"] for p in summaries)
    assert methods == ["grid_search", "grid_search", "shine", "shine"]
    names = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in summaries)
    assert names[0] == "grid_search/seed=0"
    # the artefact pipeline: collect the sweep into a table, draw the figure from it
    out, figs = tmp_path / "experiments", tmp_path / "figures"
    for cmd in (
        ["scripts/collect.py", "fig1", "--runs", str(tmp_path), "--out", str(out)],
        [
            "scripts/fig_bilevel.py",
            "fig1",
            "--table",
            str(out / "fig1" / "runs.csv"),
            "--out",
            str(figs),
        ],
    ):
        proc = subprocess.run(
            [sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = (out / "fig1" / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 30 + 2 * 11  # header, SHINE 29 steps + 0, grid 10 + 0
    for suffix in (".pdf", ".png"):
        assert (figs / f"fig1{suffix}").stat().st_size > 1000


@pytest.mark.slow
def test_bench_bilevel_quick_writes_its_numbers(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_bilevel.py",
            "--quick",
            "--methods",
            "hoag",
            "shine",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["inner"]["median_time_ratio"] > 0
    for mode in ("robust", "faithful"):
        assert set(res["methods"][mode]["median"]) == {"hoag", "shine"}
    assert "summary:" in proc.stdout
