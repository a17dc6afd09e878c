"""OPA inversion experiment: its pieces, and the whole run through train.py in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shine.data import load_breast_cancer
from shine.harness.runtime import RunDirectory
from shine.harness.tasks.opa_inversion import (
    DIRECTIONS,
    VARIANTS,
    OPAInversion,
    inversion_quality,
    summarize,
)
from shine.solvers import LBFGS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- pieces (fast)
def test_breast_cancer_subset_matches_the_authors():
    data = load_breast_cancer()
    assert (data.n_samples, data.n_features) == (113, 30)
    assert data.X.dtype == torch.float64
    assert set(data.y.tolist()) == {-1.0, 1.0}
    full = load_breast_cancer(keep_fraction=None)
    assert full.n_samples == 569
    # StandardScaler(with_mean=False): unit variance, means not removed
    assert torch.allclose(full.X.std(0, unbiased=False), torch.ones(30, dtype=torch.float64))
    assert (full.X.mean(0) > 0.1).all()
    # the subset is made of rows of the scaled full data set
    assert all(any(torch.equal(row, r) for r in full.X) for row in data.X[:5])
    assert load_breast_cancer(dtype="float32").X.dtype == torch.float32


def test_inversion_quality_definitions():
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    q = inversion_quality(a, 2 * a)
    assert q["cos"] == pytest.approx(1.0) and q["ratio"] == pytest.approx(2.0)
    assert q["rel_err"] == pytest.approx(1.0) and q["exact_norm"] == pytest.approx(5.0)
    q = inversion_quality(a, torch.tensor([-4.0, 3.0], dtype=torch.float64))
    assert q["cos"] == pytest.approx(0.0) and q["ratio"] == pytest.approx(1.0)


def _record(step, variant, cos):
    rec = {"step": step, "variant": variant, f"{variant}/n_iter": 10, f"{variant}/converged": True}
    for d in DIRECTIONS:
        rec[f"{variant}/{d}/cos"] = cos
        rec[f"{variant}/{d}/ratio"] = 1.0 + step
    return rec


def test_summarize_keys_and_quantiles():
    records = [_record(s, v, 0.5 + 0.1 * s) for s in range(5) for v in VARIANTS]
    out = summarize(records)
    for v in VARIANTS:
        for d in DIRECTIONS:
            for m in ("cos", "ratio"):
                assert {f"{v}/{d}/{m}_{q}" for q in ("median", "q10", "q90")} <= set(out)
    assert out["opa/prescribed/cos_median"] == pytest.approx(0.7)
    assert out["no_opa/random/ratio_median"] == pytest.approx(3.0)
    assert out["opa/prescribed/cos_q10"] < out["opa/prescribed/cos_q90"]
    assert out["n_seeds"] == 5 and out["opa/n_iter_median"] == 10


def test_draws_are_seeded_per_index():
    task = OPAInversion(data=load_breast_cancer(), solver=lambda *a, **k: None, seed=7)
    first, again, other = task.draws(0), task.draws(0), task.draws(1)
    assert set(first) == {"x0", "prescribed", "random"}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["x0"], other["x0"])
    assert not torch.equal(first["prescribed"], first["random"])
    shifted = OPAInversion(data=load_breast_cancer(), solver=None, seed=8).draws(0)
    assert not any(torch.equal(shifted["x0"], task.draws(i)["x0"]) for i in range(3))


def test_one_seed_opa_improves_the_prescribed_direction():
    from shine.bilevel.problems import L2LogisticRegression

    data = load_breast_cancer()
    task = OPAInversion(data=data, solver=LBFGS(max_iter=1000, tol=1e-6, memory=60, opa_every=5))
    no_opa, opa = task.evaluate(L2LogisticRegression(data.X, data.y), 0)
    assert (no_opa["variant"], opa["variant"]) == VARIANTS
    assert no_opa["no_opa/converged"] and opa["opa/converged"]
    assert opa["opa/prescribed/cos"] > no_opa["no_opa/prescribed/cos"]
    assert opa["opa/prescribed/cos"] > 0.99
    # the Krylov direction is inverted almost exactly by the secant equation
    assert no_opa["no_opa/krylov/cos"] > 0.99


# ---------------------------------------------------------------------------- end to end
def train(log_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "+experiment=opa_inversion", f"paths.log_dir={log_dir}"]
    return subprocess.run(
        cmd + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def metrics_without_time(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


N_SEEDS = 4


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    proc = train(log_dir, f"task.n_seeds={N_SEEDS}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log_dir / "opa_inversion" / f"task.n_seeds={N_SEEDS}" / "seed=0", proc


@pytest.mark.slow
def test_end_to_end_metrics_and_summary(reference_run):
    run, _ = reference_run
    records = metrics_without_time(run)
    assert len(records) == 2 * N_SEEDS
    assert [(r["step"], r["variant"]) for r in records] == [
        (s, v) for s in range(N_SEEDS) for v in VARIANTS
    ]
    for r in records:
        for d in DIRECTIONS:
            # L-BFGS at tolerance 1e-6 on a well-conditioned problem: close in every direction
            # (a sign or scaling error of the estimate or of the exact solve fails this)
            assert 0.9 < r[f"{r['variant']}/{d}/ratio"] < 1.1
            assert 0.95 < r[f"{r['variant']}/{d}/cos"] <= 1 + 1e-12
    summary = json.loads((run / "summary.json").read_text())
    metrics = RunDirectory.final_metrics(summary)
    for v in VARIANTS:
        for d in DIRECTIONS:
            assert f"{v}/{d}/cos_median" in metrics and f"{v}/{d}/ratio_median" in metrics
    assert metrics["n_seeds"] == N_SEEDS
    assert metrics["opa/prescribed/cos_median"] > metrics["no_opa/prescribed/cos_median"]
    assert summary["status"] == "complete" and summary["env"]["torch"] == torch.__version__
    assert "task.n_seeds=4" in summary["overrides"]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert not (run / ".hydra").exists(), "Hydra must not write into the run directory"


@pytest.mark.slow
def test_second_invocation_detects_completion(reference_run):
    run, _ = reference_run
    before = (run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_bytes()
    proc = train(run.parents[2], f"task.n_seeds={N_SEEDS}")
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout + proc.stderr
    assert str(run) in proc.stdout + proc.stderr
    assert ((run / "metrics.jsonl").read_bytes(), (run / "summary.json").read_bytes()) == before


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically(reference_run, tmp_path):
    reference, _ = reference_run
    proc = train(tmp_path, f"task.n_seeds={N_SEEDS}", "task.stop_after=2")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "opa_inversion" / f"task.n_seeds={N_SEEDS}" / "seed=0"  # stop_after: neutral
    assert not (run / "summary.json").exists()
    assert len(metrics_without_time(run)) == 4
    # a kill between writing the records of seed 2 and its checkpoint leaves orphan records
    orphan = dict(metrics_without_time(reference)[4], wall_time=0.0)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(orphan) + "\n" + '{"step": 2, "var')
    proc = train(tmp_path, f"task.n_seeds={N_SEEDS}")
    assert proc.returncode == 0, proc.stderr
    assert metrics_without_time(run) == metrics_without_time(reference)
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["n_starts"] == 2
    assert RunDirectory.final_metrics(resumed) == RunDirectory.final_metrics(
        json.loads((reference / "summary.json").read_text())
    )


@pytest.mark.slow
def test_overwrite_moves_the_finished_run_aside(tmp_path):
    assert train(tmp_path, "task.n_seeds=1").returncode == 0
    run = tmp_path / "opa_inversion" / "task.n_seeds=1" / "seed=0"
    first = json.loads((run / "summary.json").read_text())
    proc = train(tmp_path, "task.n_seeds=1", "overwrite=true")
    assert proc.returncode == 0, proc.stderr
    backups = list(run.parent.glob("seed=0.bak-*"))
    assert len(backups) == 1
    old = json.loads((backups[0] / "summary.json").read_text())
    new = json.loads((run / "summary.json").read_text())
    assert old == first and new["start_time"] >= old["end_time"]
    assert RunDirectory.final_metrics(new) == RunDirectory.final_metrics(old)  # same run again
    assert (run / "train.log").stat().st_size > 0


@pytest.mark.slow
def test_figure_script_writes_pdf_and_png(reference_run, tmp_path):
    run, _ = reference_run
    out = tmp_path / "fig" / "opa_inversion"
    proc = subprocess.run(
        [sys.executable, "scripts/fig_opa_inversion.py", str(run), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for suffix in (".pdf", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 1000
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert "prescribed" in proc.stdout


def test_figure_script_fails_clearly_without_metrics(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/fig_opa_inversion.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "make demo" in proc.stderr
