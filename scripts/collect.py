"""Collection step: gather the runs of one paper artefact into one tidy CSV.

    python scripts/collect.py ARTEFACT [--runs DIR ...] [--out DIR | --update-committed]
                              [--include-incomplete] [--allow-shrink]

Finds every run directory (a directory holding ``config.yaml``) under the roots given by
``--runs`` (default ``$SHINE_RUNS`` or ``runs``) whose config ``tags`` contain the artefact's
tag, and writes ``<out>/<ARTEFACT>/runs.csv`` (``<out>`` defaults to ``$SHINE_RUNS/collected``;
the committed tables under ``experiments/`` are written only with ``--update-committed`` or an
explicit ``--out``) together with its ``summary.csv`` (bi-level figures, Fig. 3, Fig. E.3), and
refuses to replace a table by one with fewer runs in some (data set, method, mode) group unless
``--allow-shrink``: one row per (run, logged record), columns
``artefact``, the identity columns read from ``config.yaml`` (bi-level: ``dataset, loss, method,
seed``), the metric columns read from ``metrics.jsonl`` (bi-level: ``step, time, test_loss,
outer_loss, log_lambda, inner_iters, inner_time, backward_time, backward_iters, rejected``),
``status`` (``complete``, or ``diverged`` for a run stopped by non-finite values: the figure
scripts leave those out and say how many) and ``run_dir`` (relative to its root). Rules:

* only complete runs (``summary.json`` present) unless ``--include-incomplete``;
* unparsable ``metrics.jsonl`` lines (a run killed mid-write) are skipped with a warning;
* list-valued metrics (``log_lambda``) keep their first component; a missing metric (the
  ``outer_loss`` of step 0) is an empty cell;
* two run directories with the same identity (e.g. a run and its ``.bak-<timestamp>`` copy):
  the newest (``summary.json`` mtime, else ``metrics.jsonl`` mtime) is kept, with a warning;
* rows sorted by the identity columns then ``step``; written atomically (tmp + replace), so the
  same runs always give the same bytes.

New artefacts are one entry of :data:`ARTEFACTS`. The DEQ artefacts (``fig3``, ``table_e1``,
``table_e2``, ``table_e3``, ``fig_e3``) build their rows with a function of the run directory
(``Artefact.rows_fn``, see ``shine/analysis/deq_results.py``): one row per training run (from its
``metrics.jsonl``: final top-1, median forward / backward ms, equilibrium epoch time), per timed
method, per contractivity run or per (batch, method) of the inversion study; duplicate rows (same
identity, e.g. a run launched alone and again in a sweep) keep the newest run's. Exit codes: 0
done, 2 no run found (the message names the command that produces the runs) or unknown artefact.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shine.analysis import bilevel_results, deq_results
from shine.analysis.tables import cell, to_csv_text, write_atomic

logger = logging.getLogger("collect")

# identity of a bi-level run: column -> dotted config paths tried in order (first non-null wins)
BILEVEL_IDENTITY: dict[str, tuple[str, ...]] = {
    "dataset": ("task.dataset.name", "dataset.name"),
    "loss": ("task.loss",),
    "method": ("task.method_name", "task.method.name", "method.name"),
    # faithful (the authors' code) or robust (ours); empty for runs made before modes existed
    "mode": ("task.method.mode", "method.mode"),
    "seed": ("seed", "task.seed"),
}
BILEVEL_METRICS: tuple[str, ...] = (
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
)
FIG1_SWEEP = (
    "python train.py -m +sweep=fig1 [dataset=news20|real_sim|synthetic_news] "
    "[method.mode=faithful|robust]"
)
#: the methods of the paper's Figure 1 (Figure E.1 adds HOAG limited backward and random search)
FIG1_METHODS = ("hoag", "shine", "shine_refine", "jacobian_free", "grid_search")


@dataclass(frozen=True)
class Artefact:
    """How to collect one paper artefact.

    Attributes:
        tag: runs whose config ``tags`` contain it belong to the artefact.
        produced_by: the command that produces the runs (quoted when none is found).
        identity: column -> dotted ``config.yaml`` paths tried in order; together they identify
            a run (duplicates share them) and, in this order, sort the rows.
        metrics: keys of the ``metrics.jsonl`` records kept as columns, in order (list values:
            first component; missing: empty cell).
        require: keys a record must have to become a row (others are ignored).
        unique_key: if set, records of one run repeating this key keep only the last one.
        order: metric column sorting the rows of one run (after the identity columns).
        extra_tags: runs tagged with one of these belong to the artefact too.
        rows_fn: ``(run directory, config) -> rows`` replacing the per-record rows (identity
            columns then come from the rows, not from ``identity``'s config paths, and
            duplicates are removed per row).
        methods: if set, only runs of these methods (the ``method`` identity column) belong to
            the artefact (Figure 1 and Figure E.1 share one sweep).
    """

    tag: str
    produced_by: str
    identity: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: BILEVEL_IDENTITY)
    metrics: tuple[str, ...] = BILEVEL_METRICS
    require: tuple[str, ...] = ("step",)
    unique_key: str | None = "step"
    order: str | None = "step"
    extra_tags: tuple[str, ...] = ()
    rows_fn: Callable[[Path, Mapping[str, Any]], list[dict[str, Any]]] | None = None
    methods: tuple[str, ...] | None = None

    @property
    def columns(self) -> list[str]:
        """The CSV header."""
        return ["artefact", *self.identity, *self.metrics, "status", "run_dir"]


def deq_artefacts() -> dict[str, Artefact]:
    """The DEQ artefacts (rows built by ``shine/analysis/deq_results.py``)."""
    train = (
        "python train.py -m +sweep=fig3_digits && python train.py -m +sweep=fig3_digits_refine "
        "(cifar/imagenet: fig3_cifar[_refine], fig3_imagenet[_refine]); or single runs "
        "python train.py +experiment=digits method=METHOD"
    )
    deq = {
        "identity": {c: () for c in deq_results.DEQ_IDENTITY},
        "metrics": deq_results.DEQ_METRICS,
        "rows_fn": deq_results.deq_rows,
        "require": (),
        "unique_key": None,
        "order": None,
    }
    return {
        "fig3": Artefact(tag="deq", produced_by=train, **deq),
        "table_e3": Artefact(
            tag="deq",
            produced_by="python train.py -m +sweep=table_e3_digits (table_e3_cifar on GPUs), "
            "with the runs of fig3 (original, Jacobian-Free, SHINE)",
            **deq,
        ),
        "table_e2": Artefact(
            tag="table_e2",
            extra_tags=("deq",),
            produced_by="python train.py +experiment=digits_timing (cifar_timing, "
            "imagenet_timing on a GPU), plus the training runs of fig3 for the epoch times",
            **deq,
        ),
        "table_e1": Artefact(
            tag="table_e1",
            produced_by="python train.py -m +experiment=digits_contractivity "
            "method=original,jacobian_free,shine",
            identity={c: () for c in deq_results.E1_IDENTITY},
            metrics=deq_results.E1_METRICS,
            rows_fn=deq_results.contractivity_rows,
            require=(),
            unique_key=None,
            order=None,
        ),
        "fig_e3": Artefact(
            tag="fig_e3",
            produced_by="python train.py +experiment=digits_opa_inversion_deq",
            identity={c: () for c in deq_results.E3_IDENTITY},
            metrics=deq_results.E3_METRICS,
            rows_fn=deq_results.inversion_rows,
            require=(),
            unique_key=None,
            order="batch",
        ),
    }


ARTEFACTS: dict[str, Artefact] = {
    "fig1": Artefact(tag="fig1", produced_by=FIG1_SWEEP, methods=FIG1_METHODS),
    "fig_e1": Artefact(tag="fig_e1", produced_by=FIG1_SWEEP),
    "fig2_left": Artefact(
        tag="fig2_left",
        produced_by="python train.py -m +sweep=fig2_left [dataset=news20|synthetic_news] "
        "[method.mode=faithful|robust]",
    ),
    "fig_e2": Artefact(
        tag="fig_e2",
        produced_by="python train.py -m +sweep=fig_e2 [dataset=news20|synthetic_news] "
        "[method.mode=faithful|robust]",
    ),
    "demo": Artefact(tag="demo", produced_by="python train.py -m +sweep=demo_bilevel"),
    **deq_artefacts(),
}


class CollectError(RuntimeError):
    """Nothing to collect (no matching run) or an unknown artefact."""


@dataclass
class Run:
    """One run directory of an artefact."""

    path: Path
    root: Path
    config: dict[str, Any]
    complete: bool

    @property
    def mtime(self) -> float:
        """Modification time of ``summary.json`` (complete run) or of ``metrics.jsonl``."""
        for name in ("summary.json", "metrics.jsonl", "config.yaml"):
            p = self.path / name
            if p.is_file():
                return p.stat().st_mtime
        return 0.0

    @property
    def status(self) -> str:
        """``complete`` / ``diverged`` from ``summary.json`` (``incomplete`` without one)."""
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "incomplete"
        return str(summary.get("status", "complete"))

    @property
    def rel(self) -> str:
        """The run directory relative to its root when possible (POSIX separators)."""
        try:
            return self.path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return self.path.as_posix()


def get_artefact(name: str) -> Artefact:
    """The registry entry of ``name``.

    Raises:
        CollectError: on an unknown name (the message lists the valid ones).
    """
    if name not in ARTEFACTS:
        raise CollectError(f"unknown artefact {name!r}; valid: {', '.join(ARTEFACTS)}")
    return ARTEFACTS[name]


def default_roots() -> list[Path]:
    """``[$SHINE_RUNS]`` or ``[runs]``."""
    return [Path(os.environ.get("SHINE_RUNS", "runs"))]


def lookup(config: Mapping[str, Any], paths: Sequence[str]) -> Any:
    """The first non-null value of the dotted ``paths`` in ``config`` (``None`` if none)."""
    for dotted in paths:
        node: Any = config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def find_run_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a ``config.yaml``, sorted.

    A run directory is not searched further (its ``checkpoints/`` holds no run).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if "config.yaml" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        else:
            dirnames.sort()
    return sorted(found)


def load_config(path: Path) -> dict[str, Any] | None:
    """The parsed ``config.yaml`` of a run directory, ``None`` (with a warning) if unreadable."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        logger.warning("skipping %s: unreadable config.yaml (%s)", path, err)
        return None
    return config if isinstance(config, dict) else None


def find_runs(
    artefact: Artefact, roots: Iterable[Path], include_incomplete: bool = False
) -> tuple[list[Run], int]:
    """Runs tagged for ``artefact`` under ``roots``.

    Returns:
        ``(runs, n_incomplete_skipped)``; duplicates are not yet removed.
    """
    runs, n_skipped = [], 0
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            logger.warning("runs root %s does not exist", root)
            continue
        for path in find_run_dirs(root):
            config = load_config(path)
            if config is None:
                continue
            tags = config.get("tags") or []
            wanted = (artefact.tag, *artefact.extra_tags)
            if not isinstance(tags, list) or not any(t in tags for t in wanted):
                continue
            if artefact.methods is not None:
                method = lookup(config, artefact.identity.get("method", ()))
                if method not in artefact.methods:
                    continue
            complete = (path / "summary.json").is_file()
            if not complete and not include_incomplete:
                logger.info("skipping incomplete run %s (no summary.json)", path)
                n_skipped += 1
                continue
            runs.append(Run(path=path, root=root, config=config, complete=complete))
    return runs, n_skipped


def identity_of(run: Run, artefact: Artefact) -> dict[str, Any]:
    """The identity columns of a run (``seed`` as int when it is one)."""
    ident = {col: lookup(run.config, paths) for col, paths in artefact.identity.items()}
    if isinstance(ident.get("seed"), str) and ident["seed"].lstrip("-").isdigit():
        ident["seed"] = int(ident["seed"])
    return ident


def _sort_key(values: Iterable[Any]) -> tuple:
    """Order ``None`` < numbers < strings, so mixed columns still sort deterministically."""
    key = []
    for v in values:
        if v is None:
            key.append((0, 0, ""))
        elif isinstance(v, bool | int | float):
            key.append((1, float(v), ""))
        else:
            key.append((2, 0, str(v)))
    return tuple(key)


def deduplicate(runs: list[Run], artefact: Artefact) -> list[Run]:
    """Keep one run per identity: the newest, warning about the others."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        ident = identity_of(run, artefact)
        groups.setdefault(_sort_key(ident.values()), []).append(run)
    kept = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: (r.mtime, r.path.as_posix()), reverse=True)
        if len(group) > 1:
            ident = identity_of(group[0], artefact)
            logger.warning(
                "%d runs for %s: keeping the newest %s, ignoring %s",
                len(group),
                ", ".join(f"{k}={v}" for k, v in ident.items()),
                group[0].path,
                ", ".join(str(r.path) for r in group[1:]),
            )
        kept.append(group[0])
    return kept


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a ``metrics.jsonl`` (:func:`deq_results.read_jsonl`), warning when
    the file is missing (the run then contributes no rows)."""
    if not path.is_file():
        logger.warning("%s is missing: the run contributes no rows", path)
        return []
    return deq_results.read_jsonl(path)


def rows_of_run(run: Run, artefact: Artefact, name: str) -> list[dict[str, Any]]:
    """The rows of one run (raw values, not yet formatted)."""
    records = read_records(run.path / "metrics.jsonl")
    records = [r for r in records if all(k in r for k in artefact.require)]
    if artefact.unique_key is not None:
        by_key: dict[Any, dict[str, Any]] = {}
        for r in records:
            k = cell(r.get(artefact.unique_key))
            if k in by_key:
                logger.warning(
                    "%s: %s=%s logged twice, keeping the last", run.path, artefact.unique_key, k
                )
            by_key[k] = r
        records = list(by_key.values())
    ident = identity_of(run, artefact)
    status = run.status
    rows = []
    for record in records:
        row: dict[str, Any] = {"artefact": name, **ident}
        for key in artefact.metrics:
            value = record.get(key)
            if isinstance(value, list | tuple):
                value = value[0] if value else None
            row[key] = value
        row["status"] = status
        row["run_dir"] = run.rel
        rows.append(row)
    return rows


def custom_rows(runs: list[Run], artefact: Artefact, name: str) -> list[dict[str, Any]]:
    """Rows of ``artefact.rows_fn`` over ``runs``; of duplicate rows the newest run's is kept."""
    assert artefact.rows_fn is not None
    key_cols = [*artefact.identity, *([artefact.order] if artefact.order else [])]
    kept: dict[tuple, tuple[Run, dict[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: (r.mtime, r.path.as_posix())):
        for row in artefact.rows_fn(run.path, run.config):
            row = {"artefact": name, **row, "status": run.status, "run_dir": run.rel}
            key = _sort_key(cell(row.get(c)) for c in key_cols)
            if key in kept and kept[key][0] is not run:
                logger.warning(
                    "%s: duplicate of %s (%s), keeping the newer run",
                    run.path,
                    kept[key][0].path,
                    ", ".join(f"{c}={cell(row.get(c))}" for c in key_cols),
                )
            kept[key] = (run, row)
    return [row for _, row in kept.values()]


def build_rows(
    name: str, roots: Iterable[Path] | None = None, include_incomplete: bool = False
) -> list[dict[str, Any]]:
    """All rows of artefact ``name``, deduplicated and sorted.

    Raises:
        CollectError: unknown artefact, or no (complete) run found.
    """
    artefact = get_artefact(name)
    roots = [Path(r) for r in (roots or default_roots())]
    runs, n_incomplete = find_runs(artefact, roots, include_incomplete)
    where = ", ".join(str(r) for r in roots)
    if not runs:
        hint = (
            f" ({n_incomplete} incomplete run(s) found: finish them, or pass --include-incomplete)"
            if n_incomplete
            else ""
        )
        raise CollectError(
            f"no complete run tagged {artefact.tag!r} under {where}{hint}. "
            f"Produce them with:\n    {artefact.produced_by}\n"
            "(or point --runs / SHINE_RUNS at the directory holding them)"
        )
    if n_incomplete:
        logger.warning(
            "%d incomplete run(s) tagged %r skipped (no summary.json; --include-incomplete "
            "keeps them)",
            n_incomplete,
            artefact.tag,
        )
    if artefact.rows_fn is not None:
        rows = custom_rows(runs, artefact, name)
    else:
        rows = [
            row for run in deduplicate(runs, artefact) for row in rows_of_run(run, artefact, name)
        ]
    sort_cols = [*artefact.identity, *([artefact.order] if artefact.order else [])]
    rows.sort(key=lambda row: _sort_key(row.get(c) for c in sort_cols))
    return rows


def seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (dataset, loss, method): number of seeds and of rows."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row.get("dataset"), row.get("loss"), row.get("method"))
        g = groups.setdefault(key, {"seeds": set(), "rows": 0})
        g["seeds"].add(row.get("seed"))
        g["rows"] += 1
    lines = []
    for key in sorted(groups, key=_sort_key):
        dataset, loss, method = (cell(k) or "-" for k in key)
        g = groups[key]
        seeds = sorted(g["seeds"], key=lambda s: _sort_key([s]))
        lines.append(
            f"  {dataset:<22} {loss:<9} {method:<15} {len(seeds):>3} seeds "
            f"({', '.join(cell(s) for s in seeds)}), {g['rows']} rows"
        )
    return lines


#: where tables go unless told otherwise (never over the committed ones by accident)
def default_out() -> Path:
    """``${SHINE_RUNS:-runs}/collected``."""
    return default_roots()[0] / "collected"


COMMITTED = Path(__file__).resolve().parents[1] / "experiments"


def _runs_by_group(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, set]:
    groups: dict[tuple, set] = {}
    for row in rows:
        key = tuple(cell(row.get(c)) for c in ("dataset", "loss", "method", "mode", "n"))
        groups.setdefault(key, set()).add(cell(row.get("run_dir")))
    return groups


def shrinkage(old_csv: Path, rows: list[dict[str, Any]]) -> list[str]:
    """How the new ``rows`` would shrink the table ``old_csv``: one line per group (data set,
    loss, method, mode, n) that loses runs, or the total row count; empty if it does not."""
    if not old_csv.is_file():
        return []
    with old_csv.open(encoding="utf-8", newline="") as fh:
        old = list(csv.DictReader(fh))
    before, after = _runs_by_group(old), _runs_by_group(rows)
    lost = []
    for key, runs in sorted(before.items()):
        n_new = len(after.get(key, ()))
        if n_new < len(runs):
            label = ", ".join(k for k in key if k) or "(all)"
            lost.append(f"{label}: {len(runs)} runs -> {n_new}")
    if not lost and len(rows) < len(old):
        lost.append(f"{len(old)} rows -> {len(rows)}")
    return lost


def write_summary(name: str, table: Path) -> Path | None:
    """Rewrite the ``summary.csv`` beside ``table`` from it (bi-level figures, Fig. 3, Fig. E.3);
    ``None`` for the artefacts whose summaries are made by other scripts (the DEQ tables)."""
    if name in ("fig1", "fig_e1", "fig2_left", "fig_e2", "demo"):
        rows, _ = bilevel_results.drop_diverged(bilevel_results.read_table(table))
        summary = bilevel_results.summarize(rows, name)
        return bilevel_results.write_summary(summary, table.parent / "summary.csv")
    if name in ("fig3", "fig_e3"):
        rows = deq_results.read_table(table)
        stats = (
            deq_results.fig3_points(rows, "backward")
            if name == "fig3"
            else deq_results.e3_summary(rows)
        )
        if not stats:
            return None
        path = table.parent / "summary.csv"
        deq_results.write_csv(path, stats, list(stats[0]))
        return path
    return None


def collect(
    name: str,
    roots: Iterable[Path] | None = None,
    out: Path | None = None,
    include_incomplete: bool = False,
    allow_shrink: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Collect artefact ``name`` into ``<out>/<name>/runs.csv`` (and its ``summary.csv``).

    Args:
        name: the artefact.
        roots: where to look for run directories (default :func:`default_roots`).
        out: output root (default :func:`default_out`; the committed tables are
            ``experiments/``).
        include_incomplete: also collect runs without ``summary.json``.
        allow_shrink: replace an existing table even if the new one has fewer runs in some
            group (else :class:`CollectError`).

    Returns:
        ``(path of the CSV, its rows)``.

    Raises:
        CollectError: unknown artefact, no run found, or a table that would shrink.
    """
    artefact = get_artefact(name)
    rows = build_rows(name, roots, include_incomplete)
    path = Path(out if out is not None else default_out()) / name / "runs.csv"
    lost = shrinkage(path, rows)
    if lost and not allow_shrink:
        raise CollectError(
            f"{path} would lose runs:\n    " + "\n    ".join(lost) + "\n(the runs found are "
            "not all the runs of the table: point --runs at every root holding them, or pass "
            "--allow-shrink to replace it anyway)"
        )
    write_atomic(path, to_csv_text(rows, artefact.columns))
    write_summary(name, path)
    return path, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Collect the runs of one paper artefact into <out>/<artefact>/runs.csv.",
    )
    parser.add_argument("artefact", help=f"one of: {', '.join(ARTEFACTS)}")
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=None,
        help="roots searched for run directories (default: $SHINE_RUNS or runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output root (default: $SHINE_RUNS/collected, or runs/collected)",
    )
    parser.add_argument(
        "--update-committed",
        action="store_true",
        help="write the committed table experiments/<artefact>/runs.csv (and its summary.csv)",
    )
    parser.add_argument(
        "--allow-shrink",
        action="store_true",
        help="replace a table even if it loses runs (e.g. after deleting a method on purpose)",
    )
    parser.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also collect runs without summary.json (interrupted or still running)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped runs too")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.artefact not in ARTEFACTS:
        parser.error(f"unknown artefact {args.artefact!r}; valid: {', '.join(ARTEFACTS)}")
    if args.update_committed and args.out is not None:
        parser.error("--update-committed writes under experiments/; do not pass --out with it")
    out = COMMITTED if args.update_committed else args.out
    try:
        path, rows = collect(
            args.artefact, args.runs, out, args.include_incomplete, args.allow_shrink
        )
    except CollectError as err:
        print(f"collect.py: error: {err}", file=sys.stderr)
        return 2
    n_runs = len({row["run_dir"] for row in rows})
    print(f"{args.artefact}: {n_runs} runs, {len(rows)} rows -> {path}")
    for line in seed_summary(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
