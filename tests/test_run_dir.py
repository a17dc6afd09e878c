"""The run contract, library side: metrics, checkpoints, completion, overwrite, summary, wandb."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from shine.harness.runtime import JsonlMetrics, RunDirectory, WandbMirror, git_state
from shine.harness.runtime.run_dir import CorruptCheckpointError


class NotData:
    """A class instance: not loadable with ``weights_only=True``."""


def test_metrics_append_records_step_and_time(tmp_path):
    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    metrics.append(0, {"loss": torch.tensor(1.5), "ok": True, "bad": float("nan")})
    metrics.append(1, {"loss": 0.5, "vec": torch.arange(3)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 0 and isinstance(first["wall_time"], float)
    assert first["loss"] == 1.5 and first["ok"] is True and first["bad"] is None
    assert json.loads(lines[1])["vec"] == [0, 1, 2]
    with pytest.raises(ValueError, match="reserved"):
        metrics.append(2, {"step": 3})


def test_metrics_truncation_drops_records_after_step_and_torn_lines(tmp_path):
    metrics = JsonlMetrics(tmp_path / "metrics.jsonl")
    for step in range(4):
        metrics.append(step, {"a": step})
        metrics.append(step, {"b": step})  # several records may share a step
    with metrics.path.open("a") as fh:
        fh.write('{"step": 4, "a"')  # a record torn by a kill
    assert metrics.truncate_after(1) == 4
    assert [r["step"] for r in metrics.read()] == [0, 0, 1, 1]
    assert metrics.truncate_after(1) == 0
    metrics.truncate_after(None)
    assert metrics.read() == []


def start(path, **kwargs):
    run_dir = RunDirectory(path, **kwargs)
    return run_dir, run_dir.start("a: 1\n", overrides=["a=1"])


def test_fresh_start_writes_config_and_resume_truncates_metrics(tmp_path):
    run_dir, state = start(tmp_path / "run")
    assert state is None
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"
    for step in range(3):
        run_dir.log_metrics(step, {"x": step})
        run_dir.save_checkpoint({"next": step + 1, "rng": torch.get_rng_state()}, step=step)
    run_dir.log_metrics(3, {"x": 3})  # killed before the checkpoint of step 3

    resumed, state = start(tmp_path / "run")
    assert state["next"] == 3 and isinstance(state["rng"], torch.Tensor)
    assert [r["x"] for r in resumed.read_metrics()] == [0, 1, 2]
    resumed.log_metrics(3, {"x": 3})
    assert [r["step"] for r in resumed.read_metrics()] == [0, 1, 2, 3]


def test_fresh_start_without_checkpoint_discards_stale_metrics(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    run_dir.log_metrics(0, {"x": 0})
    again, state = start(tmp_path / "run")
    assert state is None and again.read_metrics() == []


def test_checkpoint_is_atomic_and_loaded_weights_only(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    path = run_dir.save_checkpoint({"w": torch.ones(2)}, step=0)
    assert path == tmp_path / "run" / "checkpoints" / "last.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left
    assert torch.equal(run_dir.load_checkpoint()["w"], torch.ones(2))
    run_dir.save_checkpoint({"obj": NotData()}, step=1)
    # the previous checkpoint is kept; the one holding code is refused, naming both
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "prev.pt"]
    with pytest.raises(CorruptCheckpointError, match="prev.pt \\(step 0\\) is intact") as err:
        run_dir.load_checkpoint()
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert str(path) in str(err.value) and "overwrite=true" in str(err.value)


def test_complete_run_detection_and_refusal_to_restart(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    assert not run_dir.is_complete()
    run_dir.finish({"acc": 0.5})
    assert run_dir.is_complete()
    with pytest.raises(RuntimeError, match="complete"):
        RunDirectory(tmp_path / "run").start("a: 1\n")


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    run_dir.log_metrics(0, {"x": 0})
    run_dir.finish({"x": 0})
    backup = run_dir.move_aside()
    assert backup.parent == tmp_path and backup.name.startswith("run.bak-")
    assert (backup / "summary.json").is_file() and (backup / "metrics.jsonl").is_file()
    assert run_dir.path.is_dir() and not run_dir.has_results()
    second = run_dir.move_aside()
    assert second != backup and second.exists() and backup.exists()


def test_summary_fields(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    run_dir.save_checkpoint({}, step=0)
    summary = run_dir.finish({"acc": torch.tensor(0.25), "n": 3})
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["status"] == "complete"
    assert RunDirectory.final_metrics(summary) == {"acc": 0.25, "n": 3}
    assert summary["acc"] == 0.25 and summary["metric_keys"] == ["acc", "n"]
    assert summary["wall_time_s"] >= 0 and summary["n_starts"] == 1
    assert summary["start_time"] <= summary["end_time"]
    assert summary["overrides"] == ["a=1"]
    assert set(summary["env"]) >= {"python", "torch", "numpy", "hostname"}
    assert summary["env"]["torch"] == torch.__version__
    assert set(summary["git"]) == {"revision", "dirty"}


def test_resumed_run_accumulates_wall_time_and_counts_starts(tmp_path):
    run_dir, _ = start(tmp_path / "run")
    run_dir._elapsed_before = 10.0  # as if the first process had run for 10 s
    run_dir.save_checkpoint({}, step=0)
    resumed, _ = start(tmp_path / "run")
    summary = resumed.finish({})
    assert summary["wall_time_s"] >= 10.0 and summary["n_starts"] == 2


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"revision": None, "dirty": None}


def test_wandb_disabled_writes_nothing(tmp_path):
    mirror = WandbMirror(mode="disabled", dir=tmp_path / "wb")
    run_dir, _ = start(tmp_path / "run", mirror=mirror)
    run_dir.log_metrics(0, {"x": 1.0})
    run_dir.finish({"x": 1.0})
    assert not (tmp_path / "wb").exists() and not (tmp_path / "run" / "wandb").exists()


def test_wandb_online_without_key_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        WandbMirror(mode="online").start(tmp_path)


def test_wandb_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        WandbMirror(mode="sometimes")


def test_wandb_offline_mirrors_records_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    mirror = WandbMirror(mode="offline", project="shine-test", tags=["test"])
    run_dir, _ = start(tmp_path / "run", mirror=mirror)
    for step in range(3):
        run_dir.log_metrics(step, {"loss": 1.0 / (step + 1), "variant": "a"})
    run_dir.finish({"loss": 0.25})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no wandb event file written"


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_read_only_follower_writes_nothing_and_keeps_its_snapshot(tmp_path):
    # a non-main rank of a data-parallel run: resumes the writer's checkpoint, writes nothing
    missing = RunDirectory(tmp_path / "none", read_only=True)
    assert missing.start("a: 1\n") is None and not (tmp_path / "none").exists()

    writer = RunDirectory(tmp_path / "run")
    writer.start("a: 1\n")
    for step in range(3):
        writer.log_metrics(step, {"loss": float(step)})
    writer.save_checkpoint({"w": torch.ones(2)}, step=1)
    writer.log_metrics(3, {"loss": 3.0})
    writer = RunDirectory(tmp_path / "run")
    assert writer.start("a: 1\n")["w"].sum() == 2  # resumed: records after step 1 dropped

    before = snapshot(tmp_path / "run")
    follower = RunDirectory(tmp_path / "run", mirror=WandbMirror("disabled"), read_only=True)
    state = follower.start("a: 2\n", overrides=["x=1"])
    assert state["w"].sum() == 2 and follower.mirror is None
    assert [r["step"] for r in follower.read_metrics()] == [0, 1]
    record = follower.log_metrics(2, {"loss": 2.5})
    assert record["step"] == 2 and record["loss"] == 2.5
    with pytest.raises(ValueError, match="reserved"):
        follower.log_metrics(3, {"wall_time": 1.0})
    assert [r["step"] for r in follower.read_metrics()] == [0, 1, 2]
    follower.save_checkpoint({"w": torch.zeros(2)}, step=2)
    summary = follower.finish({"acc": 1.0})
    assert summary["acc"] == 1.0 and summary["n_starts"] == 2 and summary["overrides"] == ["x=1"]
    follower.close()
    with pytest.raises(RuntimeError, match="read-only"):
        follower.move_aside()
    assert snapshot(tmp_path / "run") == before and not follower.is_complete()

    writer.save_checkpoint({"w": torch.full((2,), 5.0)}, step=2)  # the writer moves on
    assert follower.load_checkpoint()["w"].sum() == 2  # the follower keeps what it resumed from
