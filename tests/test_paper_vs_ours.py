"""scripts/paper_vs_ours.py: the side-by-side table of the paper's numbers and ours."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from script_modules import load_script

from shine.analysis import deq_results

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
paper_vs_ours = load_script("paper_vs_ours")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _value(rows, artefact, method, quantity, source, dataset=None) -> str:
    """The one value of (artefact, method, quantity, source[, data-set prefix])."""
    key = (artefact, method, quantity, source)
    found = [
        r["value"]
        for r in rows
        if (r["artefact"], r["method"], r["quantity"], r["source"]) == key
        and (dataset is None or r["dataset"].startswith(dataset))
    ]
    assert len(found) == 1, (key, dataset, found)
    return found[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("pvo") / "paper_vs_ours"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "scripts/paper_vs_ours.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 20  # ~0.5 s; generous for a loaded machine
    return out.with_suffix(".md"), out.with_suffix(".csv")


def test_committed_side_by_side_is_up_to_date(generated):
    md, csv_path = generated
    assert md.read_text() == (EXPERIMENTS / "paper_vs_ours.md").read_text(), (
        "experiments/paper_vs_ours.md is stale: run `make figures` (or scripts/paper_vs_ours.py)"
    )
    assert csv_path.read_text() == (EXPERIMENTS / "paper_vs_ours.csv").read_text()


def test_every_artefact_has_both_sides_labelled(generated):
    md, csv_path = generated
    rows = _rows(csv_path)
    text = md.read_text()
    bilevel = {"fig1", "fig_e1", "fig2_left", "fig_e2"}
    authors = {"fig1", "fig_e1", "fig2_left"}  # the authors' code run on the same data
    for name, title in paper_vs_ours.TITLES.items():
        assert f"## {title}" in text
        sides = {r["source"] for r in rows if r["artefact"] == name}
        if name in bilevel:
            expected = {"paper", "ours (faithful)", "ours (robust)"}
            assert sides == expected | ({"authors' code"} if name in authors else set()), name
        else:
            assert sides == {"paper", "ours"}, name
    for row in rows:  # every value says its data set / scale
        assert row["dataset"], row
    ours_data = {r["dataset"] for r in rows if r["source"].startswith(("ours", "authors"))}
    assert all("CPU" in d for d in ours_data), ours_data
    assert "Not collected yet" not in text


def test_numbers_come_from_the_paper_and_the_committed_tables(generated):
    _, csv_path = generated
    rows = _rows(csv_path)
    # paper: Fig. 3 points and Table E.2 from deq_results, Tables E.1 / E.3 from the tables
    cifar = deq_results.PAPER_FIG3["cifar"]
    assert (
        float(_value(rows, "fig3", "Original", "top-1 (%)", "paper", "CIFAR"))
        == (cifar[("original", deq_results.FULL)][0])
    )
    assert float(_value(rows, "fig3", "SHINE", "top-1 (%)", "paper", "CIFAR")) == 93.144
    assert float(_value(rows, "fig3", "SHINE (fallback)", "top-1 (%)", "paper", "ImageNet")) == (
        70.374
    )
    assert float(_value(rows, "table_e3", "SHINE (Adj. Broyden/OPA)", "top-1 (%)", "paper")) == (
        93.04
    )
    nonlinear = "authors' nonlinear spectral radius"
    assert float(_value(rows, "table_e1", "Original", nonlinear, "paper")) == 230.5
    epoch = paper_vs_ours.EPOCH
    label = deq_results.TABLE_E2_ROWS["original"][0]
    assert float(_value(rows, "table_e2", label, epoch, "paper", "ImageNet")) == 3 * 3600 + 38 * 60
    assert float(_value(rows, "fig1", "SHINE vs HOAG", "time to 1 %: HOAG / SHINE", "paper")) == 2

    # ours: the committed summaries, and ratios computed from them
    fig3 = {(r["family"], r["n"]): r for r in _rows(EXPERIMENTS / "fig3" / "summary.csv")}
    shine, orig = fig3[("shine", "0")], fig3[("original", "full")]
    assert _value(rows, "fig3", "SHINE", "top-1 (%)", "ours") == shine["top1_mean"]
    speedup = float(
        _value(rows, "fig3", "SHINE vs original", "backward: original / SHINE", "ours")
    )
    assert speedup == pytest.approx(float(orig["backward_ms"]) / float(shine["backward_ms"]))
    for mode in ("faithful", "robust"):
        fig1 = {
            r["method"]: r
            for r in _rows(EXPERIMENTS / "fig1" / "summary.csv")
            if r["dataset"] == "synthetic_news" and r["mode"] == mode
        }
        source, quantity = f"ours ({mode})", "time to 1 %: HOAG / SHINE"
        ratio = float(_value(rows, "fig1", "SHINE vs HOAG", quantity, source, "synthetic"))
        assert ratio == pytest.approx(
            float(fig1["hoag"]["median_time_to_1pct"])
            / float(fig1["shine"]["median_time_to_1pct"])
        )
    theirs = {r["method"]: r for r in _rows(EXPERIMENTS / "authors_code" / "fig1" / "summary.csv")}
    quantity = "median final held-out loss"
    assert (
        _value(rows, "fig1", "hoag", quantity, "authors' code")
        == (theirs["hoag"]["median_final_test_loss"])
    )
    e3 = {r["method"]: r for r in _rows(EXPERIMENTS / "fig_e3" / "summary.csv")}
    opa = "shine_adjoint_broyden_opa"
    assert _value(rows, "fig_e3", opa, "median cos(a, b)", "ours") == e3[opa]["cos_median"]


def test_follows_the_tables_and_reports_missing_ones(tmp_path):
    exp = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, exp)
    summary = exp / "fig3" / "summary.csv"
    text = summary.read_text()
    summary.write_text(text.replace("SHINE,5,97.3333", "SHINE,5,42.5"))
    shutil.rmtree(exp / "table_e1")
    md, csv_path = paper_vs_ours.run(exp, tmp_path / "out")
    rows = _rows(csv_path)
    assert _value(rows, "fig3", "SHINE", "top-1 (%)", "ours") == "42.5"
    assert not [r for r in rows if r["artefact"] == "table_e1"]
    assert "Not collected yet" in md.read_text()
    assert paper_vs_ours.fmt(13080.0) == "13080" and paper_vs_ours.fmt(97.333, 0.78) == (
        "97.33 ± 0.78"
    )
