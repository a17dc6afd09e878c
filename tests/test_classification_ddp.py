"""Data-parallel image classification (DDP, gloo on CPU): 2 processes train like 1, rank 0 writes.

The launch environment (torchrun, srun steps, batch scripts) is read without processes; the
end-to-end checks run the tiny MDEQ under ``torchrun --standalone --nproc_per_node=2``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shine.backward import Shine
from shine.data import SyntheticImages
from shine.harness.runtime.distributed import (
    DistInfo,
    LaunchEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    detect_launch,
    first_host,
    init_distributed,
    shutdown,
)
from shine.harness.tasks import ImageClassification
from shine.models import MDEQConfig
from shine.solvers import Broyden

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "helpers" / "ddp_classification_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (pytest may itself run in a job)."""
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------ launch environment


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu017") == "gpu017"
    assert first_host("gpu[017-020,031]") == "gpu017"
    assert first_host("gpu[3,5-6],cpu[1-2]") == "gpu3"
    assert first_host("rack[2-3]-node[08-09]") == "rack2-node08"
    with pytest.raises(ValueError):
        first_host("")


def test_torchrun_variables_take_precedence():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    assert detect_launch(env) == LaunchEnv(3, 4, 1, "10.0.0.1", 29500, "torchrun")


def test_srun_step_with_one_task_per_gpu():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[017-020]",
        "SLURM_JOB_NODELIST": "gpu[016-020]",
        "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
        "SLURM_JOB_ID": "1234567",
    }
    launch = detect_launch(env)
    assert launch == LaunchEnv(5, 8, 1, "gpu017", 15000 + 1234567 % 20000, "slurm")
    # exported values win; without node lists, the launch node is the last resort
    assert detect_launch({**env, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_port == 1234
    bare = {k: v for k, v in env.items() if not k.endswith("NODELIST")}
    assert detect_launch(bare).master_addr == "10.1.2.3"
    assert detect_launch({**bare, "SLURM_JOB_NODELIST": "n[1-2]"}).master_addr == "n1"


def test_batch_script_and_plain_shell_are_single_processes():
    # sbatch's own environment has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, no step
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[1-4]"}
    assert detect_launch(batch) == LaunchEnv()
    assert detect_launch({}) == LaunchEnv()
    with pytest.raises(ValueError, match="rank 2 of 2"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2"})


def test_single_process_needs_no_process_group(monkeypatch):
    for key in (*LAUNCH_VARS, "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert init_distributed() == DistInfo(0, 1, 0, True)
    assert not torch.distributed.is_initialized()
    assert all_reduce_mean({"loss": 2, "acc": 0.5}) == {"loss": 2.0, "acc": 0.5}
    assert all_reduce_sum({"n": 3}) == {"n": 3.0}
    barrier()
    shutdown()


# ------------------------------------------------------------------ stepper, one process


def stepper(rank=0, world_size=1, **kw):
    task = ImageClassification(
        data=SyntheticImages(n_train=32, n_test=20, image_shape=(1, 8, 8)),
        model=MDEQConfig.tiny(image_size=8, in_channels=1, dropout=0.3),
        solver=Broyden(max_iter=4, tol=1e-3, memory=4),
        backward=Shine(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        batch_size=8,
        eval_batch_size=8,
        distributed=False,
        **kw,
    )
    out = task.build()
    # what build() passes in a data-parallel run (no process group: the reductions are no-ops)
    out.rank, out.world_size = rank, world_size
    return out


def test_evaluation_shards_are_whole_test_batches():
    for limit, world in [(None, 2), (None, 3), (2, 3), (None, 4)]:
        batches = list(stepper(eval_limit=limit)._eval_batches())
        shards = [list(stepper(r, world, eval_limit=limit)._eval_batches()) for r in range(world)]
        # rank r evaluates test batches r, r + world, ... exactly as one process does
        for r, shard in enumerate(shards):
            assert len(shard) == len(batches[r::world])
            for (x, y), (x1, y1) in zip(shard, batches[r::world], strict=True):
                assert torch.equal(x, x1) and torch.equal(y, y1)


def test_dropout_masks_differ_across_ranks_and_repeat_on_resume():
    def mask(rank, world):
        s = stepper(rank, world)
        s.step_index = 5
        x, _ = s._next_batch()
        s.model.train()
        gen = s._dropout_generator()
        s.model.features(x[:4], unrolled=True, generator=gen)
        return s.model.f.dropout_modules()[0].mask.clone()

    assert stepper()._dropout_generator() is None  # one process: the global generator
    assert torch.equal(mask(1, 2), mask(1, 2))  # a function of (seed, step, rank)
    assert not torch.equal(mask(0, 2), mask(1, 2))


# ------------------------------------------------------------------ end to end


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return payload["state"]["stepper"]["model"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    # 2 unrolled + 4 equilibrium steps of global batch 8, evaluations at steps 0, 4, 6; "ift:cut"
    # stops after 3 steps and resumes in the same processes (both ranks from one checkpoint)
    run([sys.executable, str(WORKER), "one", "ift", "shine"], tmp_path)
    run([*TORCHRUN, str(WORKER), "two", "ift", "shine", "ift:cut"], tmp_path)
    # IFT solves both sides to ~1e-12: the batch split changes rounding only (observed 4e-16).
    # SHINE's estimate carries the rounding of its last secant pairs, ~1e-16 / tol relative
    # (tol = 1e-9 in the worker), which the batch split changes (observed 7e-9)
    tolerances = {"ift": (1e-9, 1e-12, 1e-12), "shine": (1e-5, 1e-8, 1e-8)}
    for one, two in [("ift", "ift"), ("shine", "shine"), ("ift", "ift_cut")]:
        rtol, atol, loss_rtol = tolerances[one]
        a, b = final_model(tmp_path / "one" / one), final_model(tmp_path / "two" / two)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=key)
        ra, rb = records(tmp_path / "one" / one), records(tmp_path / "two" / two)
        assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(7))
        assert [r["unrolled"] for r in rb[1:]] == [True, True, False, False, False, False]
        for x, y in zip(ra, rb, strict=True):
            for key in ("loss", "test_loss", "acc", "test_top1"):
                assert (key in x) == (key in y)
                if key in x:
                    assert y[key] == pytest.approx(x[key], rel=loss_rtol), (two, x["step"], key)
        summary = json.loads((tmp_path / "two" / two / "summary.json").read_text())
        assert summary["n_steps"] == 6 and summary["n_starts"] == (2 if two == "ift_cut" else 1)
    # the exact comparison is meaningful: every equilibrium was solved to the tight tolerance
    deq = [r for r in records(tmp_path / "two" / "ift") if r["step"] > 2]
    assert all(r["fwd_converged_frac"] == 1.0 and r["bwd_residual_max"] < 1e-10 for r in deq)


@pytest.mark.slow
def test_train_py_under_torchrun_writes_one_run_directory(tmp_path):
    args = [
        "train.py",
        "+experiment=digits",
        "method=shine",
        "trainer.epochs=1",
        "trainer.pretrain_steps=4",
        "task.max_steps=6",
        "trainer.checkpoint_every=2",
        f"paths.log_dir={tmp_path}",
    ]
    # interrupted after 3 steps, then resumed: both ranks must restart from the same checkpoint
    run([*TORCHRUN, *args, "task.trainer.stop_after=3"], REPO)
    # named by the overrides that change results (stop_after and checkpoint_every do not)
    overrides = "task.max_steps=6,trainer.epochs=1,trainer.pretrain_steps=4"
    run_dir = tmp_path / "digits_shine" / overrides / "seed=0"
    assert not (run_dir / "summary.json").exists()
    assert [r["step"] for r in records(run_dir)] == [0, 1, 2, 3]
    run([*TORCHRUN, *args], REPO)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_shine"]
    assert sorted(p.name for p in (tmp_path / "digits_shine").iterdir()) == [overrides]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["seed=0"]
    rows = records(run_dir)
    assert [r["step"] for r in rows] == list(range(7))  # one record per step, none twice
    assert [r["unrolled"] for r in rows[1:]] == [True] * 4 + [False] * 2
    assert all("test_top1" in rows[i] for i in (0, 6))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_steps"] == 6 and summary["n_starts"] == 2 and summary["method"] == "shine"
    log = (run_dir / "train.log").read_text()
    assert "process 0 of 2" in log and "process 1 of 2" not in log  # rank 1 kept out of it
    assert "resuming after step 2" in log
    assert log.count("data parallel over 2 processes: 16 samples per process") == 2


@pytest.mark.slow
def test_run_interrupted_on_two_processes_resumes_on_one(tmp_path):
    # the global batches do not depend on the number of processes, so a run cut on 2 processes
    # and resumed on 1 (e.g. requeued on a smaller allocation) ends as the 1-process run
    run([sys.executable, str(WORKER), "one", "ift"], tmp_path)
    run([*TORCHRUN, str(WORKER), "two", "ift:stop"], tmp_path)
    moved = tmp_path / "two" / "ift_moved"
    assert [r["step"] for r in records(moved)] == [0, 1, 2, 3]
    run([sys.executable, str(WORKER), "two", "ift:finish"], tmp_path)
    a, b = final_model(tmp_path / "one" / "ift"), final_model(moved)
    for key in a:  # IFT solves both sides to ~1e-12: the batch split changes rounding only
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12, msg=key)
    ra, rb = records(tmp_path / "one" / "ift"), records(moved)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(7))
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "test_loss", "acc", "test_top1"):
            assert (key in x) == (key in y)
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-12), (x["step"], key)
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["n_steps"] == 6 and summary["n_starts"] == 2
