"""scripts/collect.py and scripts/fig_bilevel.py on fake run directories (no training)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from script_modules import load_script

from shine.analysis import bilevel_results
from shine.analysis import style as plot_style

ROOT = Path(__file__).resolve().parents[1]
collect = load_script("collect")
demo_summary = load_script("demo_summary")
fig_bilevel = load_script("fig_bilevel")

DATASETS = {"breast_cancer": 50.0, "news20": 200.0}  # data set -> scale of the best loss
METHODS = {"hoag": (0.6, 0.9), "shine": (1.0, 0.4), "jacobian_free": (0.3, 0.5)}  # rate, dt
SEEDS = (0, 1, 2)
N_STEPS = 6  # steps 0..5
EXPECTED_COLUMNS = [
    "artefact",
    "dataset",
    "loss",
    "method",
    "mode",
    "seed",
    "step",
    "time",
    "test_loss",
    "outer_loss",
    "log_lambda",
    "inner_iters",
    "inner_time",
    "backward_time",
    "backward_iters",
    "rejected",
    "status",
    "run_dir",
]


def _config(dataset, method, seed, tags, loss="logistic", mode=None):
    """A resolved config.yaml as train.py writes it (the keys collect.py reads, and more)."""
    ds = {"_target_": "shine.data.X", "train_fraction": 0.9, "name": dataset}
    meth = {"_target_": "shine.bilevel.HOAG", "name": method, "max_iter": 29}
    if mode is not None:
        meth["mode"] = mode
    return {
        "dataset": ds,
        "method": meth,
        "task": {
            "_target_": "shine.harness.tasks.HyperparameterOptimization",
            "dataset": ds,
            "method": meth,
            "method_name": None,
            "loss": loss,
            "seed": seed,
        },
        "experiment_name": "fig1",
        "sweep_name": "fig1",
        "seed": seed,
        "overwrite": False,
        "tags": list(tags),
    }


def _records(dataset, method, seed, offset=0.0):
    """Realistic decreasing held-out losses: best + a exp(-rate step), plus noise by seed."""
    rate, dt = METHODS.get(method, (0.8, 0.5))
    best = DATASETS[dataset] * (1 + 0.05 * seed)
    records = []
    for step in range(N_STEPS):
        rec = {
            "step": step,
            "wall_time": 1.7e9 + step,
            "time": step * dt * (1 + 0.1 * seed),
            "step_time": dt if step else 0.0,
            "test_loss": best * (1 + 0.5 * math.exp(-rate * step)) + offset,
        }
        if step:
            rec.update(
                outer_loss=0.1 * rec["test_loss"],
                inner_iters=20 - step,
                inner_evals=25,
                inner_time=0.8 * dt,
                backward_time=0.01,
                backward_iters=0 if method != "hoag" else 7,
                hypergradient=[0.5 / step],
                rejected=step == 3,
                log_lambda=[-2.0 - 0.5 * step, 1.0],
            )
        records.append(rec)
    return records


def make_run(path, dataset, method, seed, tags=("bilevel", "fig1", "fig_e1"), **kw):
    """Write a run directory; ``complete`` controls summary.json, ``truncate`` a cut last line."""
    complete, truncate, offset = (kw.get(k) for k in ("complete", "truncate", "offset"))
    path.mkdir(parents=True)
    config = _config(dataset, method, seed, tags, mode=kw.get("mode"))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps(r) for r in _records(dataset, method, seed, offset or 0.0)]
    text = "\n".join(lines) + "\n"
    if truncate:
        text += '{"step": 6, "wall_time": 1700000006.0, "time": 1.'
    (path / "metrics.jsonl").write_text(text)
    (path / "checkpoints").mkdir()
    if complete is not False:
        (path / "summary.json").write_text(json.dumps({"method": method, "status": "complete"}))
    return path


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """2 data sets x 3 methods x 3 seeds of the fig1 sweep, plus the awkward cases."""
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "sweeps" / "fig1"
    for dataset in DATASETS:
        for method in METHODS:
            for seed in SEEDS:
                make_run(
                    sweep / f"dataset={dataset},method={method},seed={seed}",
                    dataset,
                    method,
                    seed,
                    truncate=(dataset, method, seed) == ("news20", "shine", 2),
                )
    # interrupted run (no summary.json): skipped unless --include-incomplete
    make_run(sweep / "dataset=news20,method=hoag,seed=3", "news20", "hoag", 3, complete=False)
    # an older copy of a run (what overwrite=true leaves): same identity, the newest wins
    old = make_run(
        sweep / "dataset=news20,method=shine,seed=0.bak-20250101-000000",
        "news20",
        "shine",
        0,
        offset=1000.0,
    )
    past = (old / "summary.json").stat().st_mtime - 3600
    os.utime(old / "summary.json", (past, past))
    # a run of another artefact: never collected for fig1
    make_run(
        root / "fig2_left" / "seed=0", "news20", "shine_opa", 0, tags=("bilevel", "fig2_left")
    )
    return root


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


# ----------------------------------------------------------------------------- collect.py
def test_collect_writes_the_tidy_table(runs_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="collect"):
        path, rows = collect.collect("fig1", [runs_root], tmp_path / "experiments")
    assert path == tmp_path / "experiments" / "fig1" / "runs.csv"
    table = _read_csv(path)
    assert list(table[0]) == EXPECTED_COLUMNS
    # 18 complete runs x 6 steps; the truncated line, the incomplete run, the old copy and the
    # fig2_left run contribute nothing
    assert len(table) == len(DATASETS) * len(METHODS) * len(SEEDS) * N_STEPS == len(rows)
    assert {r["artefact"] for r in table} == {"fig1"}
    assert {r["loss"] for r in table} == {"logistic"}
    assert {r["method"] for r in table} == set(METHODS)
    assert {r["seed"] for r in table} == {"0", "1", "2"}
    assert not any(".bak-" in r["run_dir"] or "fig2_left" in r["run_dir"] for r in table)
    # deterministic order: dataset, loss, method, seed, step
    keys = [(r["dataset"], r["method"], int(r["seed"]), int(r["step"])) for r in table]
    assert keys == sorted(keys)
    first = table[0]
    assert first["dataset"] == "breast_cancer" and first["method"] == "hoag"
    assert first["step"] == "0" and first["time"] == "0.0"
    assert first["outer_loss"] == "" and first["log_lambda"] == ""  # not logged at step 0
    assert first["run_dir"] == "sweeps/fig1/dataset=breast_cancer,method=hoag,seed=0"
    second = table[1]
    assert float(second["log_lambda"]) == -2.5  # first component of the list
    assert second["rejected"] == "False" and second["inner_iters"] == "19"
    assert float(second["test_loss"]) == pytest.approx(
        _records("breast_cancer", "hoag", 0)[1]["test_loss"]
    )
    # the newest of the duplicates is kept (no +1000 offset)
    dup = [r for r in table if (r["dataset"], r["method"], r["seed"]) == ("news20", "shine", "0")]
    assert {r["run_dir"] for r in dup} == {"sweeps/fig1/dataset=news20,method=shine,seed=0"}
    assert max(float(r["test_loss"]) for r in dup) < 1000
    messages = "\n".join(caplog.messages)
    assert "unparsable line" in messages and "metrics.jsonl:7" in messages
    assert "keeping the newest" in messages and ".bak-20250101" in messages
    assert "1 incomplete run(s)" in messages


def test_collect_include_incomplete(runs_root, tmp_path):
    _, rows = collect.collect("fig1", [runs_root], tmp_path, include_incomplete=True)
    assert len(rows) == len(DATASETS) * len(METHODS) * len(SEEDS) * N_STEPS + N_STEPS
    assert {r["seed"] for r in rows if r["method"] == "hoag" and r["dataset"] == "news20"} == {
        0,
        1,
        2,
        3,
    }


def test_collect_cli_is_deterministic_and_matches_the_function(runs_root, tmp_path):
    res = _run("collect.py", "fig_e1", "--runs", runs_root, "--out", tmp_path / "cli")
    assert res.returncode == 0, res.stderr
    assert "fig_e1: 18 runs, 108 rows" in res.stdout
    assert "news20" in res.stdout and "3 seeds (0, 1, 2)" in res.stdout
    assert "WARNING" in res.stderr and "unparsable line" in res.stderr
    cli_bytes = (tmp_path / "cli" / "fig_e1" / "runs.csv").read_bytes()
    path, _ = collect.collect("fig_e1", [runs_root], tmp_path / "fn")
    again, _ = collect.collect("fig_e1", [runs_root], tmp_path / "fn")
    assert path.read_bytes() == cli_bytes == again.read_bytes()
    assert not list((tmp_path / "fn" / "fig_e1").glob("*.tmp"))


def test_committed_tables_are_written_only_when_told_and_never_shrunk(runs_root, tmp_path):
    shine_runs = tmp_path / "shine_runs"
    env = {"SHINE_RUNS": str(shine_runs)}
    # by default into $SHINE_RUNS/collected, with the summary beside the table
    res = _run("collect.py", "fig1", "--runs", runs_root, env=env)
    assert res.returncode == 0, res.stderr
    table = shine_runs / "collected" / "fig1" / "runs.csv"
    assert table.is_file() and (table.parent / "summary.csv").is_file()
    # an explicit --out, and the summary is rewritten with the table
    out = tmp_path / "experiments"
    path, _ = collect.collect("fig1", [runs_root], out)
    summary = out / "fig1" / "summary.csv"
    summary.write_text("stale\n")
    collect.collect("fig1", [runs_root], out)
    assert summary.read_text().startswith("artefact,dataset,loss,method,mode")
    # one run only: the table would lose runs of every group, refused and left untouched
    one = tmp_path / "one"
    (one / "run").parent.mkdir()
    shutil.copytree(next(p.parent for p in runs_root.rglob("summary.json")), one / "run")
    before = path.read_bytes()
    with pytest.raises(collect.CollectError, match="would lose runs") as err:
        collect.collect("fig1", [one], out)
    assert "--allow-shrink" in str(err.value) and path.read_bytes() == before
    res = _run("collect.py", "fig1", "--runs", one, "--out", out)
    assert res.returncode == 2 and "would lose runs" in res.stderr
    collect.collect("fig1", [one], out, allow_shrink=True)
    assert path.read_bytes() != before


def test_diverged_runs_are_marked_and_left_out_of_the_figures(runs_root, tmp_path, caplog):
    runs = tmp_path / "runs"
    shutil.copytree(runs_root, runs)
    for summary in runs.rglob("summary.json"):
        if summary.parent.name.endswith("method=shine,seed=1"):
            data = json.loads(summary.read_text())
            summary.write_text(json.dumps({**data, "status": "diverged"}))
    path, rows = collect.collect("fig1", [runs], tmp_path / "out")
    diverged = {r["run_dir"] for r in rows if r["status"] == "diverged"}
    assert diverged and all("method=shine,seed=1" in d for d in diverged)
    table = bilevel_results.read_table(path)
    kept, left_out = bilevel_results.drop_diverged(table)
    assert left_out == len(diverged) and all(r["status"] == "complete" for r in kept)
    summary = {(r["dataset"], r["method"]): r for r in bilevel_results.summarize(kept, "fig1")}
    assert all(r["n_seeds"] == 2 for (d, m), r in summary.items() if m == "shine")


def test_collect_without_runs_exits_2_naming_the_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run("collect.py", "fig1", "--out", tmp_path / "x", env={"SHINE_RUNS": str(empty)})
    assert res.returncode == 2
    assert "no complete run tagged 'fig1'" in res.stderr and str(empty) in res.stderr
    assert "python train.py -m +sweep=fig1" in res.stderr
    assert not (tmp_path / "x").exists()
    # only an incomplete run: the message points at --include-incomplete
    make_run(empty / "fig2_left" / "seed=0", "news20", "hoag", 0, ("fig2_left",), complete=False)
    with pytest.raises(collect.CollectError, match="--include-incomplete"):
        collect.build_rows("fig2_left", [empty])


def test_collect_unknown_artefact_lists_the_valid_ones(tmp_path):
    res = _run("collect.py", "fig9", "--runs", tmp_path)
    assert res.returncode == 2
    for name in ("fig1", "fig_e1", "fig2_left", "fig_e2"):
        assert name in res.stderr
    with pytest.raises(collect.CollectError, match="valid: fig1, fig_e1, fig2_left, fig_e2"):
        collect.get_artefact("fig9")


def test_registry_entries_are_generic():
    for name, artefact in collect.ARTEFACTS.items():
        assert artefact.columns[0] == "artefact" and artefact.columns[-1] == "run_dir"
        assert "python train.py" in artefact.produced_by, name
    assert collect.ARTEFACTS["fig1"].columns == EXPECTED_COLUMNS


# ----------------------------------------------------------------------------- fig_bilevel.py
def _tiny_rows():
    """Hand-checkable table: 3 seeds of hoag, shine and jacobian_free on one data set."""
    data = {
        # method: {seed: (losses, times)}
        "hoag": {
            0: ([10, 5, 2.0, 1.0], [0, 1, 2, 3]),
            1: ([20, 4, 2.01, 2.0], [0, 2, 4, 6]),
            2: ([8, 6, 5, 4.5], [0, 1, 2, 3]),
        },
        "shine": {
            0: ([10, 3, 1.005, 1.0005], [0, 0.5, 1, 1.5]),
            1: ([20, 2.5, 2.1, 2.05], [0, 1, 2, 3]),
            2: ([8, 4.02, 4.001, 4.0], [0, 0.5, 1, 1.5]),
        },
        "jacobian_free": {s: ([10, 9, 8, 7], [0, 1, 2, 3]) for s in range(3)},
    }
    rows = []
    for method, seeds in data.items():
        for seed, (losses, times) in seeds.items():
            for step, (loss, t) in enumerate(zip(losses, times, strict=True)):
                rows.append(
                    dict(
                        dataset="toy", loss="logistic", method=method, seed=seed, step=step,
                        time=float(t), test_loss=float(loss),
                    )
                )  # fmt: skip
    return rows


def test_summary_matches_a_hand_computation():
    # per-seed best over all methods: seed 0 -> 1.0 (hoag), 1 -> 2.0 (hoag), 2 -> 4.0 (shine)
    summary = {r["method"]: r for r in bilevel_results.summarize(_tiny_rows(), "fig1")}
    assert list(summary) == ["hoag", "shine", "jacobian_free"]  # legend order, absent skipped
    hoag, shine, jf = summary["hoag"], summary["shine"], summary["jacobian_free"]
    assert hoag["n_seeds"] == shine["n_seeds"] == 3
    # hoag: within 1 % at t = 3, 4, never -> median 4; within 0.1 % at 3, 6, never -> 6
    assert hoag["median_time_to_1pct"] == 4.0 and hoag["median_time_to_0p1pct"] == 6.0
    assert hoag["n_seeds_reaching_1pct"] == 2 and hoag["median_final_test_loss"] == 2.0
    assert hoag["median_total_time"] == 3.0 and hoag["median_best_test_loss"] == 2.0
    # shine: 1 % at t = 1, never, 0.5 -> 1; 0.1 % at 1.5, never, 1 -> 1.5
    assert shine["median_time_to_1pct"] == 1.0 and shine["median_time_to_0p1pct"] == 1.5
    assert shine["median_final_test_loss"] == 2.05
    # jacobian_free never gets within 1 %: NaN, 0 seeds
    assert math.isnan(jf["median_time_to_1pct"]) and jf["n_seeds_reaching_1pct"] == 0


def test_modes_are_separate_curves_summary_rows_and_legend_entries(tmp_path):
    rows = _tiny_rows()
    robust = [dict(r, mode="robust", time=r["time"] / 2) for r in rows if r["method"] == "shine"]
    faithful = [dict(r, mode="faithful") for r in rows]
    summary = bilevel_results.summarize(faithful + robust, "fig1")
    keys = [(r["method"], r["mode"]) for r in summary]
    assert keys == [
        ("hoag", "faithful"),
        ("shine", "faithful"),
        ("shine", "robust"),
        ("jacobian_free", "faithful"),
    ]
    by_key = {(r["method"], r["mode"]): r for r in summary}
    assert by_key[("shine", "robust")]["median_time_to_1pct"] == 0.5  # half the time
    assert by_key[("shine", "faithful")]["median_time_to_1pct"] == 1.0
    assert bilevel_results.series_label(("shine", "robust")) == "SHINE (ours), robust"
    assert bilevel_results.series_label(("shine", "authors")) == "SHINE, authors' code"
    # every method and mode of the table is drawn, also one the figure spec does not list
    extra = [dict(r, method="shine_opa") for r in robust]
    paths = fig_bilevel.plot(faithful + robust + extra, "fig1", tmp_path / "f")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_fig1_table_holds_the_paper_methods_and_fig_e1_all(tmp_path):
    for method in ("hoag", "hoag_limited", "shine", "random_search"):
        for mode in ("faithful", "robust"):
            run = tmp_path / "runs" / f"method={method},method.mode={mode},seed=0"
            make_run(run, "news20", method, 0, mode=mode, complete=True)
    fig1 = {(r["method"], r["mode"]) for r in collect.build_rows("fig1", [tmp_path / "runs"])}
    assert fig1 == {(m, mode) for m in ("hoag", "shine") for mode in ("faithful", "robust")}
    e1 = {r["method"] for r in collect.build_rows("fig_e1", [tmp_path / "runs"])}
    assert e1 == {"hoag", "hoag_limited", "shine", "random_search"}


def test_curve_is_the_median_and_band_over_seeds():
    grouped = bilevel_results.group(_tiny_rows())[("toy", "logistic")]
    best = bilevel_results.best_per_seed(grouped)
    assert best == {0: 1.0, 1: 2.0, 2: 4.0}
    assert bilevel_results.default_eps(best) == pytest.approx(0.02)
    c = bilevel_results.curve(grouped[("shine", "")], best, eps=0.1, band=(0.25, 0.75))
    assert c["step"].tolist() == [0, 1, 2, 3] and c["n"].tolist() == [3, 3, 3, 3]
    sub1 = np.array([3 - 1, 2.5 - 2, 4.02 - 4]) + 0.1
    assert c["median"][1] == pytest.approx(0.6) == pytest.approx(np.median(sub1))
    assert c["lo"][1] == pytest.approx(np.quantile(sub1, 0.25))
    assert c["hi"][1] == pytest.approx(np.quantile(sub1, 0.75))
    assert c["time"][1] == 0.5  # median of 0.5, 1, 0.5


def test_figure_and_summary_from_collected_runs(runs_root, tmp_path, caplog):
    path, _ = collect.collect("fig1", [runs_root], tmp_path / "experiments")
    rows = bilevel_results.read_table(path)
    with caplog.at_level(logging.WARNING, logger="fig_bilevel"):
        paths = fig_bilevel.plot(rows, "fig2_left", tmp_path / "figures" / "fig2_left")
    assert [p.name for p in paths] == ["fig2_left.pdf", "fig2_left.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "no run of shine_opa" in caplog.text
    # CLI: default summary next to the table
    res = _run("fig_bilevel.py", "fig1", "--table", path, "--out", tmp_path / "figs")
    assert res.returncode == 0, res.stderr
    for suffix in (".pdf", ".png"):
        assert (tmp_path / "figs" / f"fig1{suffix}").stat().st_size > 1000
    summary = _read_csv(path.parent / "summary.csv")
    assert [(r["dataset"], r["method"]) for r in summary] == [
        (d, m) for d in ("news20", "breast_cancer") for m in ("hoag", "shine", "jacobian_free")
    ]
    assert {r["n_seeds"] for r in summary} == {"3"}
    assert list(summary[0]) == bilevel_results.SUMMARY_COLUMNS
    assert "news20" in res.stdout and "t(1%)" in res.stdout


def test_figure_error_paths(tmp_path):
    res = _run("fig_bilevel.py", "fig9")
    assert res.returncode == 2 and "fig1, fig_e1, fig2_left, fig_e2" in res.stderr
    res = _run("fig_bilevel.py", "fig1", "--table", tmp_path / "missing.csv")
    assert res.returncode == 2
    assert "not found" in res.stderr and "python scripts/collect.py fig1" in res.stderr


def test_saved_figures_are_byte_identical_across_saves(tmp_path):
    # no creation date or producer in the files: regenerating a figure from the same table
    # leaves the committed files untouched
    def draw(stem):
        fig, axes = plot_style.figure(1, 1)
        axes[0, 0].semilogy([1, 2, 3], [1.0, 0.1, 0.01], marker="o", label="SHINE")
        axes[0, 0].legend()
        return plot_style.save(fig, stem)

    first, second = draw(tmp_path / "a" / "f"), draw(tmp_path / "b" / "f")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.suffix
    assert b"CreationDate" not in first[0].read_bytes()  # the PDF (saves within one second agree)


def test_demo_summary_states_the_speed_up_of_each_mode(tmp_path, capsys):
    # summary.csv as fig_bilevel.py writes it, one row per (method, mode)
    summary = tmp_path / "demo" / "demo" / "summary.csv"
    summary.parent.mkdir(parents=True)
    times = {("hoag", "faithful"): (0.3, 0.6), ("shine", "faithful"): (0.2, 0.4)}
    times |= {("hoag", "robust"): (1.0, 2.0), ("shine", "robust"): (0.25, 0.5)}
    times |= {("jacobian_free", "robust"): (0.1, float("nan"))}
    lines = [",".join(bilevel_results.SUMMARY_COLUMNS)]
    for (method, mode), (t1, t01) in times.items():
        row = {c: "" for c in bilevel_results.SUMMARY_COLUMNS}
        row |= {"method": method, "mode": mode, "n_seeds": "3", "median_final_test_loss": "600"}
        row |= {"median_time_to_1pct": str(t1), "median_time_to_0p1pct": str(t01)}
        lines.append(",".join(row[c] for c in bilevel_results.SUMMARY_COLUMNS))
    summary.write_text("\n".join(lines) + "\n")
    run = tmp_path / "sweeps" / "demo_bilevel" / "method=shine,seed=0"
    run.mkdir(parents=True)
    config = {"method": {"name": "shine", "mode": "faithful", "inner_memory": "restart"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for method in demo_summary.DEQ:
        digits = tmp_path / f"digits_{method}" / "seed=0"
        digits.mkdir(parents=True)
        result = {"final_test_top1": 97.0, "median_backward_ms": 2.0, "train_time_s": 10.0}
        (digits / "summary.json").write_text(json.dumps(result))
    assert demo_summary.main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up of SHINE over HOAG (faithful): 1.50x to 1 %, 1.50x to 0.1 %" in out
    assert "speed-up of SHINE over HOAG (robust): 4.00x to 1 %, 4.00x to 0.1 %" in out
    assert "L-BFGS memory across outer steps: restart" in out
    assert demo_summary.main(["--runs", str(tmp_path / "nowhere")]) == 2
