"""DEQ rows of the collection step, method labels and the paper's reference numbers.

Used by ``scripts/collect.py`` (row builders of the DEQ artefacts ``fig3``, ``table_e1``,
``table_e2``, ``table_e3``, ``fig_e3``), ``scripts/fig_deq.py``, ``scripts/tables_deq.py`` and
``scripts/paper_vs_ours.py``. Reads run directories only (``config.yaml``, ``metrics.jsonl``,
``summary.json``); no Hydra.

Method labels: a run's ``method`` is its ``task.method_name`` (training) or the key of
``task.backwards`` (timing); ``family`` is its family in :mod:`shine.analysis.methods`
(``shine_refine`` -> ``shine``, ``original_limited`` -> ``original``), whose label and colour
the DEQ figures and tables show; ``n`` is the number of backward iterations
read from the backward config: ``"0"`` for SHINE / Jacobian-Free, ``backward.n_steps`` for
refine, ``backward.max_iter`` for the limited original backward and ``"full"`` for the original
one (``b_thres`` iterations).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shine.analysis import methods
from shine.analysis.methods import family_of

logger = logging.getLogger("deq_results")
# Fig. 3 summaries warn under the name of the figure script, as they always did
fig_logger = logging.getLogger("fig_deq")

#: data-set class (``_target_`` suffix) -> data-set column
DATASETS = {
    "DigitsData": "digits",
    "CIFAR10Data": "cifar",
    "ImageNetData": "imagenet",
    "SyntheticImages": "synthetic",
}
#: the n of the original method's full backward
FULL = "full"
#: Fig. 3 markers per n (the authors' paper_plot.py)
MARKERS = {"0": "o", "1": "^", "2": "s", "5": "p", "7": "v", "10": "D", FULL: "*"}

# ----------------------------------------------------------------------- paper reference numbers
#: Fig. 3 (official cifar/imagenet_aggreg_results.csv, zaccharieramzi/shine): (family, n) ->
#: (top-1 %, median backward ms). CIFAR: mean of 5 seeds; ImageNet: 1 seed.
PAPER_FIG3: dict[str, dict[tuple[str, str], tuple[float, float]]] = {
    "cifar": {
        ("original", FULL): (93.512, 209.0),
        ("jacobian_free", "0"): (93.092, 12.9),
        ("shine", "0"): (93.144, 16.0),
        ("shine", "5"): (93.544, 96.6),
        ("jacobian_free", "5"): (93.476, 86.5),
        ("original", "5"): (93.622, 86.4),
    },
    "imagenet": {
        ("original", FULL): (75.53, 798.0),
        ("shine_fallback", "0"): (70.374, 35.3),
        ("jacobian_free", "0"): (72.594, 13.5),
        ("original", "5"): (72.638, 212.0),
        ("shine", "5"): (74.21, 187.0),
        ("jacobian_free", "5"): (74.518, 186.0),
    },
}
#: Table E.2 rows: key -> (label, family, n); epochs in seconds (CIFAR m:s, ImageNet h:m)
TABLE_E2_ROWS: dict[str, tuple[str, str, str]] = {
    "original": ("Original (Bai et al., 2020)", "original", FULL),
    "jacobian_free": ("Jacobian-Free (Fung et al., 2021)", "jacobian_free", "0"),
    "shine": ("SHINE Fallback (ours)", "shine", "0"),
    "shine_refine": ("SHINE Fallback refine (5, ours)", "shine", "5"),
    "jacobian_free_refine": ("Jacobian-Free refine (5)", "jacobian_free", "5"),
    "original_limited": ("Original limited backprop", "original", "5"),
}
#: paper Table E.2: dataset -> row key -> (forward ms, backward ms, epoch s)
PAPER_TABLE_E2: dict[str, dict[str, tuple[float, float, float]]] = {
    "cifar": {
        "original": (256, 210, 4 * 60 + 40),
        "jacobian_free": (249, 12.9, 3 * 60 + 10),
        "shine": (218, 16.0, 3 * 60 + 20),
        "shine_refine": (272, 96.6, 3 * 60 + 50),
        "jacobian_free_refine": (260, 86.5, 3 * 60 + 40),
        "original_limited": (281, 86.4, 3 * 60 + 50),
    },
    "imagenet": {
        "original": (644, 798, (3 * 60 + 38) * 60),
        "jacobian_free": (621, 13.5, (2 * 60 + 2) * 60),
        "shine": (622, 35.3, (2 * 60 + 13) * 60),
        "shine_refine": (622, 212, (2 * 60 + 44) * 60),
        "jacobian_free_refine": (620, 186, (2 * 60 + 43) * 60),
        "original_limited": (653, 187, (2 * 60 + 40) * 60),
    },
}
#: paper Table E.1 (CIFAR): method -> nonlinear spectral radius
PAPER_TABLE_E1 = {"original": 230.5, "jacobian_free": 193.7, "shine": 234.2}
#: Table E.3 rows: method -> label; paper values (CIFAR): (top-1 %, epoch s)
TABLE_E3_ROWS = {
    "original": "Original",
    "jacobian_free": "Jacobian-Free",
    "shine": "SHINE (Broyden)",
    "shine_adjoint_broyden": "SHINE (Adj. Broyden)",
    "shine_opa": "SHINE (Adj. Broyden/OPA)",
}
PAPER_TABLE_E3 = {
    "original": (93.51, 4 * 60 + 40),
    "jacobian_free": (93.09, 3 * 60 + 10),
    "shine": (93.14, 3 * 60 + 20),
    "shine_adjoint_broyden": (92.89, 4 * 60),
    "shine_opa": (93.04, 4 * 60 + 40),
}

# ----------------------------------------------------------------------- columns
DEQ_IDENTITY = ("kind", "dataset", "method", "n", "seed")
DEQ_METRICS = (
    "family",
    "final_top1",
    "best_top1",
    "median_forward_ms",
    "median_backward_ms",
    "median_implicit_ms",
    "epoch_time_s",
    "epoch_time_all_s",
    "train_time_s",
    "epochs",
    "n_steps",
    "n_batches",
    "device",
    "checkpoint",
)
E1_IDENTITY = ("dataset", "method", "seed")
E1_METRICS = (
    "nonlinear_spectral_radius",
    "spectral_radius",
    "spectral_radius_max",
    "spectral_norm",
    "contractive_frac",
    "eq_residual_rel_median",
    "n_images",
    "n_iter_nonlinear",
    "n_iter_power",
    "state_dim",
    "checkpoint",
)
E3_IDENTITY = ("dataset", "method", "seed")
E3_METRICS = (
    "batch",
    "cos",
    "norm_ratio",
    "cos_sample_mean",
    "fwd_nstep",
    "fwd_residual_max",
    "exact_residual_max",
    "opa_updates",
)


# ----------------------------------------------------------------------- labels
def _target_name(node: Any) -> str:
    if isinstance(node, Mapping):
        return str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return ""


def dataset_of(config: Mapping[str, Any]) -> str | None:
    """The data-set column of a run: from the data class, else the experiment name prefix."""
    task = config.get("task") or {}
    for node in (task.get("data"), config.get("dataset")):
        name = DATASETS.get(_target_name(node))
        if name:
            return name
    exp = str(config.get("experiment_name", ""))
    return exp.split("_", 1)[0] or None


def backward_n(node: Any, method: str) -> int | str:
    """Backward iterations ``n`` of a backward-strategy config (see the module docstring).

    An int, or ``"full"`` for the original (unlimited) backward.
    """
    name = _target_name(node)
    if name == "IFT":
        return int(node["max_iter"]) if "limited" in method else FULL
    if name == "Refine":
        return int(node.get("n_steps", 0))
    if name == "Fallback":
        return backward_n(node.get("primary"), method)
    if name == "Diagnose":
        return backward_n(node.get("strategy"), method)
    return 0


def label(family: str, n: int | str) -> str:
    """Legend / table label, e.g. ``SHINE refine (5)``."""
    base = methods.label(family, methods.DEQ)
    n = str(n)
    if n in (FULL, "0"):
        return base
    return f"{base} {'limited' if family == 'original' else 'refine'} ({n})"


# ----------------------------------------------------------------------- run reading
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object records of a ``metrics.jsonl`` (``[]`` when missing).

    Unparsable lines (a run killed mid-write) and lines that are not JSON objects are skipped
    with a warning. Shared with ``collect.py``.
    """
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unparsable line skipped (truncated run?)", path, lineno)
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                logger.warning("%s:%d: not a JSON object, skipped", path, lineno)
    return out


def read_summary(path: Path) -> dict[str, Any] | None:
    """The parsed ``summary.json`` of a run directory, ``None`` if absent or unreadable."""
    file = path / "summary.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("%s: unreadable summary.json", file)
        return None


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else math.nan


def epoch_times(records: Sequence[Mapping[str, Any]], first_epochs: int = 6) -> dict[str, Any]:
    """Epoch time of the equilibrium training from the per-step records of a training run.

    The paper's Table E.2 / E.3 epoch time is the mean over the first 6 epochs of equilibrium
    training (pretraining excluded): here ``mean(step_time of the first 6 x steps_per_epoch
    equilibrium steps) x steps_per_epoch`` (the trainer's ``step_time`` excludes evaluation).

    Returns:
        ``epoch_time_s`` (NaN without equilibrium steps), ``steps_per_epoch``.
    """
    steps = [r for r in records if int(r.get("step", 0)) > 0 and "step_time" in r]
    spe = 0
    for r in steps:
        if float(r.get("epoch") or 0) > 0:
            spe = int(round(int(r["step"]) / float(r["epoch"])))
            break
    eq = [float(r["step_time"]) for r in steps if r.get("unrolled") is False]
    if spe <= 0 or not eq:
        return {"epoch_time_s": math.nan, "steps_per_epoch": spe}
    eq = eq[: first_epochs * spe]
    return {"epoch_time_s": float(np.mean(eq)) * spe, "steps_per_epoch": spe}


def training_row(path: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The row of one training run (``kind = train``), ``None`` without any step record."""
    task = config.get("task") or {}
    records = read_jsonl(path / "metrics.jsonl")
    steps = [r for r in records if int(r.get("step", 0)) > 0]
    if not steps:
        return None
    method = str(task.get("method_name") or config.get("experiment_name"))
    evals = [r for r in records if "test_top1" in r]
    deq = [r for r in steps if r.get("unrolled") is False]
    summary = read_summary(path) or {}
    epochs = (config.get("trainer") or {}).get("epochs", task.get("epochs"))
    train_time = float(steps[-1].get("time", math.nan))
    row = {
        "kind": "train",
        "dataset": dataset_of(config),
        "method": method,
        "family": family_of(method),
        "n": backward_n(task.get("backward", config.get("backward")), method),
        "seed": config.get("seed", task.get("seed")),
        "final_top1": float(evals[-1]["test_top1"]) if evals else math.nan,
        "best_top1": max((float(r["test_top1"]) for r in evals), default=math.nan),
        "median_forward_ms": 1e3 * _median([float(r["forward_time"]) for r in deq]),
        # the paper's backward time: the whole loss.backward() (backward_total_time)
        "median_backward_ms": 1e3
        * _median([float(r["backward_total_time"]) for r in deq if "backward_total_time" in r]),
        "median_implicit_ms": 1e3
        * _median([float(r["backward_time"]) for r in deq if "backward_time" in r]),
        "train_time_s": train_time,
        "epochs": epochs,
        "epoch_time_all_s": train_time / float(epochs) if epochs else math.nan,
        "n_steps": len(steps),
        "complete": bool(summary),
    }
    row["epoch_time_s"] = epoch_times(records)["epoch_time_s"]
    return row


def timing_rows(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per timed method of a ``DEQTiming`` run (``kind = timing``)."""
    task = config.get("task") or {}
    backwards = task.get("backwards") or {}
    records = [r for r in read_jsonl(path / "metrics.jsonl") if "method" in r]
    summary = read_summary(path) or {}
    rows = []
    for method in backwards:
        recs = [r for r in records if r.get("method") == method]
        if not recs:
            continue
        rows.append(
            {
                "kind": "timing",
                "dataset": dataset_of(config),
                "method": method,
                "family": family_of(method),
                "n": backward_n(backwards[method], method),
                "seed": config.get("seed", task.get("seed")),
                "median_forward_ms": _median([float(r["forward_ms"]) for r in recs]),
                "median_backward_ms": _median([float(r["backward_ms"]) for r in recs]),
                "median_implicit_ms": _median(
                    [float(r["implicit_ms"]) for r in recs if "implicit_ms" in r]
                ),
                "n_batches": len(recs),
                "device": summary.get("device_name", task.get("device")),
                "checkpoint": recs[0].get("checkpoint"),
            }
        )
    return rows


def deq_rows(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a DEQ training or timing run (others: none)."""
    target = _target_name(config.get("task"))
    if target == "ImageClassification":
        row = training_row(path, config)
        return [row] if row is not None else []
    if target == "DEQTiming":
        return timing_rows(path, config)
    return []


def contractivity_rows(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row of a ``DEQContractivity`` run (from ``summary.json``; none if incomplete)."""
    if _target_name(config.get("task")) != "DEQContractivity":
        return []
    summary = read_summary(path)
    if summary is None:
        return []
    task = config.get("task") or {}
    row = {
        "dataset": dataset_of(config),
        "method": summary.get("method", task.get("method_name")),
        "seed": config.get("seed", task.get("seed")),
    }
    row.update({k: summary.get(k) for k in E1_METRICS})
    return [row]


def inversion_rows(path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (batch, method) record of a ``DEQInversion`` run."""
    if _target_name(config.get("task")) != "DEQInversion":
        return []
    task = config.get("task") or {}
    base = {"dataset": dataset_of(config), "seed": config.get("seed", task.get("seed"))}
    rows = []
    for rec in read_jsonl(path / "metrics.jsonl"):
        if "method" not in rec or "cos" not in rec:
            continue
        row = {**base, "method": rec["method"]}
        row.update({k: rec.get(k) for k in E3_METRICS})
        rows.append(row)
    return rows


def read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a collected CSV (all values as strings)."""
    import csv

    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def to_float(value: Any) -> float:
    """A CSV cell as a float (empty -> NaN)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------- figure summaries
#: the families of Fig. 3 (labels and colours: :mod:`shine.analysis.methods`)
FIG3_FAMILIES = ("original", "shine", "shine_fallback", "jacobian_free")
#: the inverse estimates compared in Fig. E.3, in legend order (``method`` of the inversion rows)
E3_METHODS = (
    "jacobian_free",
    "shine_broyden",
    "shine_adjoint_broyden",
    "shine_adjoint_broyden_opa",
)


def n_key(n: Any) -> tuple[int, float]:
    """Sort key of an ``n`` cell: numbers first, ``full`` last."""
    s = str(n)
    return (1, math.inf) if s == FULL else (0, float(s))


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (formatted with ``%.6g``) as CSV."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c)
            out.append(f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v)))
        writer.writerow(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")


def fig3_points(rows: list[dict[str, str]], x: str = "backward") -> list[dict[str, Any]]:
    """Aggregate training rows per (dataset, family, n): mean/std top-1, median time, seeds."""
    column = {"backward": "median_backward_ms", "implicit": "median_implicit_ms"}[x]
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    diverged = [r for r in rows if r.get("status") == "diverged"]
    if diverged:
        fig_logger.warning(
            "%d diverged run(s) left out of Fig. 3: %s",
            len(diverged),
            ", ".join(sorted(r.get("run_dir", "?") for r in diverged)),
        )
    for r in rows:
        if r.get("kind") != "train" or r.get("family") not in FIG3_FAMILIES:
            continue
        if r.get("status") == "diverged":
            continue
        groups.setdefault((r["dataset"], r["family"], r["n"]), []).append(r)
    points = []
    for (dataset, family, n), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][:2], n_key(kv[0][2]))
    ):
        top1 = np.array([to_float(r["final_top1"]) for r in rs])
        times = np.array([to_float(r[column]) for r in rs])
        paper = PAPER_FIG3.get(dataset, {}).get((family, n))
        points.append(
            {
                "dataset": dataset,
                "family": family,
                "n": n,
                "label": label(family, n),
                "seeds": len(rs),
                "top1_mean": float(np.nanmean(top1)),
                "top1_std": float(np.nanstd(top1)) if len(rs) > 1 else 0.0,
                "backward_ms": float(np.nanmedian(times)),
                "paper_top1": paper[0] if paper else None,
                "paper_backward_ms": paper[1] if paper else None,
            }
        )
    return points


def e3_summary(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per (dataset, method): batches, median / 10 % / 90 % of the cosine and of the ratio."""
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        for method in E3_METHODS:
            rs = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not rs:
                continue
            cos = np.array([to_float(r["cos"]) for r in rs])
            ratio = np.array([to_float(r["norm_ratio"]) for r in rs])
            out.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "batches": len(rs),
                    "cos_median": float(np.nanmedian(cos)),
                    "cos_q10": float(np.nanquantile(cos, 0.1)),
                    "cos_q90": float(np.nanquantile(cos, 0.9)),
                    "norm_ratio_median": float(np.nanmedian(ratio)),
                    "norm_ratio_q10": float(np.nanquantile(ratio, 0.1)),
                    "norm_ratio_q90": float(np.nanquantile(ratio, 0.9)),
                }
            )
    return out
