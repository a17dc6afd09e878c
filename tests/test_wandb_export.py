"""scripts/wandb_export.py: wandb runs -> run directories -> scripts/collect.py, with no network.

The wandb runs are made by the real ``WandbMirror`` (with a fake ``wandb`` module) from real
run directories of ``train.py``, so the export sees exactly what a ``logger=wandb`` run sends;
a fake public API serves them back to the exporter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from script_modules import load_script

from shine.harness.runtime import RunDirectory, WandbMirror
from shine.harness.runtime.wandb_mirror import flatten_record, unflatten_record

ROOT = Path(__file__).resolve().parents[1]
collect = load_script("collect")
wandb_export = load_script("wandb_export")


class FakeWandbRun:
    """A wandb run as the SDK fills it (``init``/``log``/``summary``/``finish``) and the public
    API reads it back (``config``, ``summary``, ``scan_history()``, ``name``, ``id``, ``tags``)."""

    def __init__(self, index: int, config: dict | None, name: str | None, tags: list | None):
        self.id = f"run{index:03d}"
        self.name = name
        self.tags = list(tags or [])
        self.created_at = f"2026-01-01T00:00:{index:02d}Z"
        self.path = ["team", "shine", self.id]
        self.state = "running"
        self._config = dict(config or {})
        self._rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    # SDK side
    def log(self, values: dict[str, Any], step: int) -> None:
        # wandb merges values logged at the same step into one history row
        if not self._rows or self._rows[-1]["_step"] != step:
            self._rows.append({"_step": step, "_timestamp": 1.7e9 + step, "_runtime": 0.1 * step})
        self._rows[-1].update(values)
        self.summary.update(values)  # wandb keeps the last value of every logged key

    def finish(self) -> None:
        self.state = "finished"
        self.summary.update(
            {"_runtime": 12.5, "_step": self._rows[-1]["_step"] if self._rows else 0}
        )

    # public API side
    @property
    def config(self) -> dict[str, Any]:
        return {**self._config, "_wandb": {"value": {"cli_version": "0.31.0"}}}

    def scan_history(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._rows]


class FakeApi:
    """``wandb.Api().runs(path, filters=...)`` over a list of fake runs (tag filter applied)."""

    def __init__(self, runs: list[FakeWandbRun]):
        self._runs = runs
        self.calls: list[tuple[str, Any]] = []

    def runs(self, path: str, filters: dict | None = None) -> list[FakeWandbRun]:
        self.calls.append((path, filters))
        wanted = ((filters or {}).get("tags") or {}).get("$in")
        return [r for r in self._runs if wanted is None or set(wanted) & set(r.tags)]


@pytest.fixture
def fake_wandb(monkeypatch):
    """A fake ``wandb`` module whose ``init`` records the runs it opens."""
    runs: list[FakeWandbRun] = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        run = FakeWandbRun(len(runs), kwargs.get("config"), kwargs.get("name"), kwargs.get("tags"))
        runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def mirror_run(path: Path) -> None:
    """Send a finished run directory through the real WandbMirror, as train.py's run did."""
    config = yaml.safe_load((path / "config.yaml").read_text())
    mirror = WandbMirror(mode="offline", name=path.name, tags=config["tags"])
    mirror.start(path, config=config)
    for line in (path / "metrics.jsonl").read_text().splitlines():
        mirror.log(json.loads(line))
    summary = json.loads((path / "summary.json").read_text())
    mirror.finish(RunDirectory.final_metrics(summary))


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> Path:
    """Real train.py runs: the demo's bi-level sweep (HOAG, SHINE, JF) on breast cancer, seed 0."""
    runs = tmp_path_factory.mktemp("local") / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "+sweep=demo_bilevel",
            "dataset=breast_cancer_split",
            "method.mode=faithful",
            "seed=0",
            f"paths.log_dir={runs}",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


def test_export_then_collect_gives_the_local_rows(local_runs, fake_wandb, tmp_path):
    run_dirs = collect.find_run_dirs(local_runs)
    assert len(run_dirs) == 3
    for path in run_dirs:
        mirror_run(path)
    api = FakeApi(fake_wandb)
    out = tmp_path / "export"
    exported = wandb_export.export_runs("team/shine", out, api=api, tags=["demo"])

    assert api.calls == [("team/shine", {"tags": {"$in": ["demo"]}})]
    assert len(exported) == 3 and all(e.complete for e in exported)
    for path in run_dirs:  # the local layout, the local config
        rel = path.relative_to(local_runs)
        assert yaml.safe_load((out / rel / "config.yaml").read_text()) == yaml.safe_load(
            (path / "config.yaml").read_text()
        )
        final = RunDirectory.final_metrics(json.loads((path / "summary.json").read_text()))
        exported_summary = json.loads((out / rel / "summary.json").read_text())
        kept = {k: v for k, v in final.items() if v is not None}
        assert {k: exported_summary.get(k) for k in kept} == kept  # scalars and lists
        assert set(final) - set(exported_summary) == set(final) - set(kept)  # nulls

    artefact = collect.get_artefact("demo")
    local = collect.build_rows("demo", [local_runs])
    remote = collect.build_rows("demo", [out])
    assert len(remote) == len(local) == 3 * 30  # 3 methods x steps 0..29

    def table(rows, skip=()):
        cols = [c for c in artefact.columns if c not in skip]
        return [[collect.cell(row.get(c)) for c in cols] for row in rows]

    # every column comes back, the list-valued log_lambda through its key/i components
    assert table(remote) == table(local)
    lambdas = [row.get("log_lambda") for row in remote]
    assert lambdas == [row.get("log_lambda") for row in local]
    assert sum(isinstance(x, float) for x in lambdas) >= len(lambdas) - 3  # None: step 0

    # the CLI of collect.py reads the export as any runs root
    proc = subprocess.run(
        [sys.executable, "scripts/collect.py", "demo", "--runs", str(out), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo: 3 runs, 90 rows" in proc.stdout


def _fake_run(index, config, steps, final=None, state="finished"):
    run = FakeWandbRun(index, config, f"r{index}", config.get("tags"))
    for step in steps:
        run.log({"test_loss": 10.0 - step + index / 10, "rejected": False}, step=step)
    if final:
        for key, value in final.items():
            run.summary[key] = value
    if state == "finished":
        run.finish()
    run.state = state
    return run


CONFIG = {
    "tags": ["bilevel", "demo"],
    "seed": 1,
    "paths": {"log_dir": "runs", "output_dir": "/scratch/me/shine/runs/demo_bilevel/seed=1"},
}


def test_resumed_run_is_merged_and_incomplete_runs_get_no_summary(tmp_path):
    first = _fake_run(0, CONFIG, range(0, 4))  # stopped by a requeue: no final metrics
    resumed = _fake_run(1, CONFIG, range(2, 6), final={"final_test_loss": 5.1, "n_steps": 5})
    other = {**CONFIG, "seed": 2, "paths": {"log_dir": "runs", "output_dir": "runs/x/seed=2"}}
    crashed = _fake_run(2, other, range(0, 3), state="crashed")
    stopped = _fake_run(3, {**other, "paths": {}}, range(0, 3))  # finished, only logged values
    api = FakeApi([resumed, crashed, first, stopped])  # creation order is restored by the export
    exported = wandb_export.export_runs("team/shine", tmp_path, api=api)

    by_path = {e.path.relative_to(tmp_path).as_posix(): e for e in exported}
    assert set(by_path) == {"demo_bilevel/seed=1", "x/seed=2", f"wandb/{stopped.id}"}
    merged = by_path["demo_bilevel/seed=1"]
    assert merged.wandb_ids == [first.id, resumed.id] and merged.complete
    records = [json.loads(x) for x in (merged.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["test_loss"] for r in records[:2]] == [10.0, 9.0]  # first run's
    assert [r["test_loss"] for r in records[2:4]] == [8.1, 7.1]  # the resumed run's
    summary = json.loads((merged.path / "summary.json").read_text())
    assert summary["final_test_loss"] == 5.1 and summary["status"] == "complete"
    assert summary["source"] == {"wandb": ["team/shine/run000", "team/shine/run001"]}
    for name in ("x/seed=2", f"wandb/{stopped.id}"):
        assert not by_path[name].complete
        assert not (tmp_path / name / "summary.json").exists()
    runs, n_incomplete = collect.find_runs(collect.get_artefact("demo"), [tmp_path])
    assert [r.rel for r in runs] == ["demo_bilevel/seed=1"] and n_incomplete == 2


def test_never_overwrites_a_local_run_and_refreshes_an_export_on_request(tmp_path):
    local = tmp_path / "demo_bilevel" / "seed=1"
    local.mkdir(parents=True)
    (local / "config.yaml").write_text("tags: [demo]\n")
    api = FakeApi([_fake_run(0, CONFIG, range(3), final={"final_test_loss": 1.0})])
    with pytest.raises(wandb_export.ExportError, match="not a wandb export"):
        wandb_export.export_runs("team/shine", tmp_path, api=api)
    assert (local / "config.yaml").read_text() == "tags: [demo]\n"

    out = tmp_path / "export"
    wandb_export.export_runs("team/shine", out, api=api)
    with pytest.raises(wandb_export.ExportError, match="--overwrite"):
        wandb_export.export_runs("team/shine", out, api=api)
    (exported,) = wandb_export.export_runs("team/shine", out, api=api, overwrite=True)
    assert exported.complete


def test_missing_api_key_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(wandb_export.ExportError, match="WANDB_API_KEY"):
        wandb_export.export_runs("team/shine", tmp_path)
    assert wandb_export.main(["team/shine", "--out", str(tmp_path / "o")]) == 2
    assert "WANDB_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(wandb_export.ExportError, match="ENTITY/PROJECT"):
        wandb_export.export_runs("shine", tmp_path, api=FakeApi([]))


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (
            {"log_dir": "runs", "output_dir": "/a/runs/sweeps/fig1/method=shine,seed=3"},
            "sweeps/fig1/method=shine,seed=3",
        ),
        ({"log_dir": "/s/runs", "output_dir": "/s/runs/fig1/seed=0"}, "fig1/seed=0"),
        ({"log_dir": "/s/runs", "output_dir": "/t/s/runs/fig1/seed=0"}, "wandb/abc"),
        ({"log_dir": "runs", "output_dir": "/a/runs/../../etc"}, "wandb/abc"),
        ({"log_dir": "runs", "output_dir": "/a/runs"}, "wandb/abc"),
        ({}, "wandb/abc"),
    ],
)
def test_run_subdir(paths, expected):
    assert wandb_export.run_subdir({"paths": paths}, "abc").as_posix() == expected


def test_filters_and_history_values():
    assert wandb_export.build_filters() == {}
    assert wandb_export.build_filters(["a", "b"], {"state": "finished"}) == {
        "$and": [{"tags": {"$in": ["a", "b"]}}, {"state": "finished"}]
    }
    rows = [{"_step": 1, "_timestamp": 5.0, "x": "NaN", "y": None}, {"_runtime": 3.0}]
    (record,) = wandb_export.history_records(rows)
    assert record["step"] == 1 and record["wall_time"] == 5.0 and "y" not in record
    assert record["x"] != record["x"]  # NaN


def test_flatten_record_round_trip():
    record = {
        "step": 3,
        "wall_time": 1.5,
        "loss": 0.25,
        "ok": True,
        "method": "shine",
        "log_lambda": [-2.0, 1.0, 3],
        "opa/prescribed/cos_median": 0.9,
        "nested": {"a": 1},
        "missing": None,
    }
    row = flatten_record(record)
    assert row == {
        "loss": 0.25,
        "ok": True,
        "method": "shine",
        "log_lambda/0": -2.0,
        "log_lambda/1": 1.0,
        "log_lambda/2": 3,
        "opa/prescribed/cos_median": 0.9,
    }
    assert unflatten_record(row) == {
        k: v for k, v in record.items() if k not in ("step", "wall_time", "nested", "missing")
    }
    # incomplete index runs and keys that exist on their own are left alone
    assert unflatten_record({"a/1": 1.0}) == {"a/1": 1.0}
    assert unflatten_record({"a": 2.0, "a/0": 1.0}) == {"a": 2.0, "a/0": 1.0}
