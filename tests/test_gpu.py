"""CUDA paths: the same numbers on the GPU as on the CPU, synchronised timing, CUDA memory.

Marked ``gpu`` and skipped without a CUDA device (``make test-gpu`` runs them with
``make bench-deq``). Every comparison is against the CPU in float64 or in the dtype the CPU
computes the same thing in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deq_problems import TanhMap, make_problem

from shine.backward import IFT, Fallback, JacobianFree, Refine, Shine
from shine.deq import DEQLayer
from shine.solvers import LBFGS, AdjointBroyden, Broyden

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
DT = torch.float64


def test_broyden_and_adjoint_broyden_agree_with_the_cpu():
    prob = make_problem(dim=16, batch=3, contraction=0.8)
    for solver in (
        Broyden(max_iter=40, tol=1e-10, memory=40),
        AdjointBroyden(max_iter=40, tol=1e-10, memory=40),
    ):
        cpu = solver(prob.g, torch.zeros_like(prob.x))
        prob_gpu = make_problem(dim=16, batch=3, contraction=0.8)
        prob_gpu.f, prob_gpu.x = prob_gpu.f.to(CUDA), prob_gpu.x.to(CUDA)
        gpu = solver(prob_gpu.g, torch.zeros_like(prob_gpu.x))
        assert gpu.value.device.type == "cuda" and gpu.inverse.U.device.type == "cuda"
        torch.testing.assert_close(gpu.value.cpu(), cpu.value, rtol=1e-9, atol=1e-11)
        v = torch.randn(3, 16, dtype=DT)
        torch.testing.assert_close(
            gpu.inverse.rmatvec(v.to(CUDA)).cpu(), cpu.inverse.rmatvec(v), rtol=1e-8, atol=1e-10
        )


def test_lbfgs_agrees_with_the_cpu():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, dtype=DT, generator=gen)
    A = A @ A.T + 30 * torch.eye(30, dtype=DT)
    b = torch.randn(30, dtype=DT, generator=gen)

    def make_fun(device):
        a, c = A.to(device), b.to(device)
        return lambda z: (0.5 * z @ a @ z - c @ z, a @ z - c)

    solver = LBFGS(max_iter=100, tol=1e-10, memory=10)
    cpu = solver(make_fun("cpu"), torch.zeros(30, dtype=DT))
    gpu = solver(make_fun(CUDA), torch.zeros(30, dtype=DT, device=CUDA))
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "backward",
    [IFT(max_iter=60, tol=1e-12), Shine(), JacobianFree(), Refine(init=Shine(), n_steps=5)]
    + [Fallback(primary=Shine(), fallback=JacobianFree(), ratio=1.3)],
    ids=lambda b: type(b).__name__,
)
def test_deq_layer_gradients_agree_with_the_cpu(backward):
    def grads(device):
        f = TanhMap(8, contraction=0.6, seed=2).to(device)
        x = torch.randn(3, 8, dtype=DT, generator=torch.Generator().manual_seed(7)).to(device)
        x.requires_grad_(True)
        layer = DEQLayer(f, Broyden(max_iter=60, tol=1e-12, memory=60), backward)
        z = layer(x)
        return [g.cpu() for g in torch.autograd.grad((z**2).sum(), [f.W, x])]

    for g_gpu, g_cpu in zip(grads(CUDA), grads("cpu"), strict=True):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-8, atol=1e-10)


def test_layer_refuses_or_follows_mixed_devices():
    # parameters on the GPU and an input on the CPU: the layer must not silently compute on
    # two devices (torch raises on the first mixed operation)
    f = TanhMap(8, contraction=0.6, seed=2).to(CUDA)
    layer = DEQLayer(f, Broyden(max_iter=20, tol=1e-8), Shine())
    with pytest.raises(RuntimeError, match="device"):
        layer(torch.randn(2, 8, dtype=DT))


def run_train(args, runs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args, f"paths.log_dir={runs}"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_classification_on_cuda_times_synchronised_steps_and_reports_memory(tmp_path):
    runs = tmp_path / "runs"
    args = ["+experiment=digits", "method=shine", "trainer.device=cuda", "trainer.epochs=1"]
    args += ["trainer.pretrain_steps=4", "task.eval_limit=64"]
    proc = run_train(args, runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = runs.glob("digits_shine/*/seed=0/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    deq = [r for r in records if r.get("step", 0) > 0 and not r.get("unrolled", True)]
    assert deq and all(r["peak_mem_mb"] > 0 for r in deq)
    assert all(0 < r["backward_time"] <= r["backward_total_time"] for r in deq)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallelism needs 2 GPUs")
def test_nccl_data_parallel_matches_one_process(tmp_path):
    runs = tmp_path / "runs"
    args = ["+experiment=digits", "method=shine", "trainer.device=cuda", "trainer.epochs=1"]
    args += ["trainer.pretrain_steps=4", "task.eval_limit=64"]
    one = run_train(args, runs / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["train.py", *args, f"paths.log_dir={runs / 'two'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    (a,) = (runs / "one").glob("digits_shine/*/seed=0/summary.json")
    (b,) = (runs / "two").glob("digits_shine/*/seed=0/summary.json")
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    assert abs(sa["final_train_loss"] - sb["final_train_loss"]) < 1e-3
