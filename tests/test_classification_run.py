"""MDEQ image classification through the shared trainer: training works, resume is exact."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import run_task

from shine.backward import IFT, Shine
from shine.data import DigitsData, SyntheticImages
from shine.harness.tasks import ImageClassification
from shine.harness.training import Trainer
from shine.models import MDEQConfig
from shine.solvers import Broyden

ROOT = Path(__file__).resolve().parents[1]


def task(stop_after=None, backward=None, epochs=1, data=None, **kw):
    return ImageClassification(
        data=data or SyntheticImages(n_train=96, n_test=32, image_shape=(1, 8, 8)),
        model=MDEQConfig.tiny(image_size=8, in_channels=1, dropout=0.2),
        solver=Broyden(max_iter=8, tol=1e-3, memory=8),
        backward=backward or Shine(),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        epochs=epochs,
        batch_size=16,
        pretrain_steps=3,
        method_name="shine",
        trainer=Trainer(checkpoint_every=2, stop_after=stop_after),
        **kw,
    )


def without_times(records):
    return [
        {k: v for k, v in r.items() if not (k.endswith("time") or k in ("samples_per_s",))}
        for r in records
    ]


def test_records_pretraining_then_equilibrium_and_summary(tmp_path):
    run_dir, summary = run_task(tmp_path / "a", task(epochs=2))
    records = run_dir.read_metrics()
    steps = [r for r in records if r["step"] > 0]
    assert len(steps) == 12  # 96 / 16 per epoch, 2 epochs
    assert [r["unrolled"] for r in steps[:4]] == [True, True, True, False]
    deq = [r for r in steps if not r["unrolled"]]
    assert all(r["fwd_nstep"] >= 1 and "backward_time" in r for r in deq)
    evals = [r for r in records if "test_top1" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]  # start and every epoch
    assert summary["n_steps"] == 12 and summary["final_test_top1"] == evals[-1]["test_top1"]
    lrs = [r["lr"] for r in steps]
    assert lrs == sorted(lrs, reverse=True)  # cosine decay per batch


def test_interrupted_training_resumes_to_identical_metrics(tmp_path):
    reference, _ = run_task(tmp_path / "ref", task(epochs=2))
    first, out = run_task(tmp_path / "cut", task(epochs=2, stop_after=5))
    assert out is None
    resumed, out = run_task(tmp_path / "cut", task(epochs=2))
    assert out is not None
    assert without_times(resumed.read_metrics()) == without_times(reference.read_metrics())


def test_exact_backward_and_shine_both_learn_digits(tmp_path):
    results = {}
    for name, backward in {"ift": IFT(max_iter=20, tol=1e-8), "shine": Shine()}.items():
        t = task(data=DigitsData(image_size=8), backward=backward, epochs=3)
        t = ImageClassification(
            **{
                **t.__dict__,
                "model": MDEQConfig.tiny(image_size=8, in_channels=1),
                "batch_size": 32,
                "pretrain_steps": 40,
            }
        )
        _, summary = run_task(tmp_path / name, t)
        results[name] = summary
    assert results["ift"]["final_test_top1"] > 85.0
    assert results["shine"]["final_test_top1"] > 85.0
    # the whole point: SHINE's backward is far cheaper than the iterative one
    assert results["shine"]["median_backward_ms"] < 0.2 * results["ift"]["median_backward_ms"]


def test_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(ValueError, match="lower batch_size"):
        ImageClassification(**{**task().__dict__, "batch_size": 1024}).build()


@pytest.mark.slow
def test_train_py_runs_the_digits_experiment(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "+experiment=digits",
            "method=shine_fallback",
            "trainer.epochs=1",
            "trainer.pretrain_steps=10",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(
        (
            tmp_path
            / "digits_shine_fallback"
            / "trainer.epochs=1,trainer.pretrain_steps=10"
            / "seed=0"
            / "summary.json"
        ).read_text()
    )
    assert summary["method"] == "shine_fallback" and summary["n_steps"] == 44
    assert 0.0 <= summary["fallback_frac_mean"] <= 1.0
