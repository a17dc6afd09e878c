"""Export wandb runs as run directories of this repository's contract, for ``collect.py``.

    WANDB_API_KEY=... python scripts/wandb_export.py ENTITY/PROJECT --out DIR
        [--tag TAG ...] [--filters JSON] [--overwrite]
    python scripts/collect.py ARTEFACT --runs DIR

The runs a ``logger=wandb`` run mirrored (``shine/harness/runtime/wandb_mirror.py``: the resolved
config as the wandb config, every metrics record's numbers, booleans, strings and lists of numbers
(as
``key/0``, ``key/1``, ...) at its ``step``, the final metrics in the summary) become run
directories under ``DIR``:

* ``config.yaml``: the wandb config (wandb's own ``_``-prefixed keys dropped), i.e. the run's
  resolved configuration, ``tags`` included, which is what ``collect.py`` selects runs by;
* ``metrics.jsonl``: one record per history row, ``{"step": _step, "wall_time": _timestamp,
  ...metrics}`` (from ``run.scan_history()``; ``key/i`` components joined back into lists);
* ``summary.json``: the wandb summary plus ``status``, ``metric_keys``, ``wall_time_s`` (wandb's
  ``_runtime``) and ``source`` (the wandb run paths), written only for a complete run (see below),
  so that ``collect.py`` treats the others as incomplete (``--include-incomplete`` keeps them);
* ``wandb_source.json``: where the directory came from (its presence marks a directory this
  script may rewrite; a directory without it is never touched).

Layout: a run goes to the directory it had locally, ``paths.output_dir`` relative to
``paths.log_dir`` in its config (e.g. ``sweeps/fig1/method=shine,seed=3``), so the ``run_dir``
column of the collected table is the local one; runs whose config lacks these paths go to
``wandb/<run id>``. A run resumed after an interruption (SLURM requeue) opened a second wandb run
for the same directory: the runs of one directory are merged in creation order, the records of a
later run replacing those at and after its first step (as the resume truncated
``metrics.jsonl``), the config and summary taken from the last one.

Complete: the last wandb run of a directory has state ``finished`` and a summary key that no
history row holds (the final metrics ``WandbMirror.finish`` writes; a run stopped early only has
wandb's copy of the last logged values).

Limits (of what the mirror sends, not of this script): nested record fields (dicts, lists of
non-numbers) are not mirrored, and records sharing a step are merged into one history row by
wandb (the DEQ timing and inversion runs log several records per step: Table E.2's timing rows
and Fig. E.3 need the run directories).

The API key is read from the ``WANDB_API_KEY`` environment variable only and never written
anywhere; tests pass a fake API object to :func:`export_runs` (no network).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import yaml

from shine.analysis.tables import write_atomic
from shine.harness.runtime.metrics import to_jsonable
from shine.harness.runtime.wandb_mirror import unflatten_record

logger = logging.getLogger("wandb_export")

SOURCE_FILE = "wandb_source.json"
#: summary.json fields written by this script (a metric of the same name is kept under
#: ``metric/<name>`` with a warning)
PROVENANCE = ("status", "metric_keys", "wall_time_s", "source")
#: non-finite floats as wandb's JSON may return them
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ExportError(RuntimeError):
    """No API key, a malformed project path, or an output directory that is not an export."""


class WandbRun(Protocol):
    """The attributes of a ``wandb.apis.public.Run`` this script reads."""

    id: str
    name: str | None
    tags: Sequence[str]
    config: Mapping[str, Any]
    summary: Any

    def scan_history(self) -> Iterable[Mapping[str, Any]]:
        """The history rows (``_step``, ``_timestamp``, ``_runtime`` and the logged values)."""
        ...


class WandbApi(Protocol):
    """The part of ``wandb.Api`` this script uses."""

    def runs(self, path: str, filters: Mapping[str, Any] | None = None) -> Iterable[WandbRun]:
        """The runs of ``entity/project`` matching ``filters`` (MongoDB-style)."""
        ...


@dataclass
class ExportedRun:
    """One exported run directory."""

    path: Path
    wandb_ids: list[str]
    complete: bool
    n_records: int


def make_api(timeout: int = 60) -> WandbApi:
    """A ``wandb.Api`` authenticated with ``WANDB_API_KEY`` from the environment.

    Raises:
        ExportError: when ``WANDB_API_KEY`` is not set (no netrc, no prompt, nothing stored).
    """
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        raise ExportError(
            "the wandb export needs an API key in the WANDB_API_KEY environment variable "
            "(export WANDB_API_KEY=...; it is read from the environment only and never written)"
        )
    import wandb  # lazy: slow to import, and unused by tests (they pass a fake API)

    return wandb.Api(api_key=key, timeout=timeout)


def build_filters(tags: Sequence[str] = (), filters: Mapping[str, Any] | None = None) -> dict:
    """The wandb filter of ``--tag`` (any of the tags) and ``--filters`` (both must hold)."""
    parts: list[dict[str, Any]] = []
    if tags:
        parts.append({"tags": {"$in": list(tags)}})
    if filters:
        parts.append(dict(filters))
    if not parts:
        return {}
    return parts[0] if len(parts) == 1 else {"$and": parts}


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict of a mapping or a wandb summary object (``keys()`` + ``[]``), recursively."""
    if isinstance(obj, Mapping):
        items = obj.items()
    elif hasattr(obj, "keys"):
        items = ((k, obj[k]) for k in obj.keys())
    else:
        return {}
    return {str(k): as_dict(v) if _is_mapping_like(v) else v for k, v in items}


def _is_mapping_like(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, str)
    )


def user_keys(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` without wandb's own ``_``-prefixed keys (``_wandb``, ``_step``, ...)."""
    return {k: v for k, v in mapping.items() if not str(k).startswith("_")}


def _value(value: Any) -> Any:
    """A history value: wandb's ``"NaN"`` / ``"Infinity"`` strings back to floats."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def history_records(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records of wandb history rows (rows without ``_step`` are skipped)."""
    records = []
    for row in rows:
        if row.get("_step") is None:
            continue
        record: dict[str, Any] = {"step": int(row["_step"])}
        if row.get("_timestamp") is not None:
            record["wall_time"] = float(row["_timestamp"])
        values = {k: _value(v) for k, v in user_keys(row).items() if v is not None}
        record.update(unflatten_record(values))
        records.append(record)
    records.sort(key=lambda r: r["step"])
    return records


def merge_resumed(histories: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The records of one run directory from its wandb runs, oldest first.

    A resumed run starts logging after its checkpoint's step: its records replace the earlier
    runs' records from its first step on.
    """
    merged: list[dict[str, Any]] = []
    for records in histories:
        if records:
            first = records[0]["step"]
            merged = [r for r in merged if r["step"] < first]
            merged.extend(records)
    return merged


def _safe_parts(parts: Sequence[str]) -> tuple[str, ...] | None:
    """``parts`` if they form a relative path that stays below the output root, else ``None``."""
    if not parts or any(p in ("", ".", "..") or "/" in p or "\\" in p or "\0" in p for p in parts):
        return None
    return tuple(parts)


def run_subdir(config: Mapping[str, Any], run_id: str) -> PurePosixPath:
    """Where a run goes under the output root: its local directory relative to ``log_dir``.

    ``paths.output_dir`` relative to ``paths.log_dir`` (absolute, or relative: its last
    occurrence inside ``output_dir``); ``wandb/<run id>`` when they are missing or unrelated.
    """
    paths = config.get("paths") if isinstance(config.get("paths"), Mapping) else {}
    out, log = paths.get("output_dir"), paths.get("log_dir")
    if isinstance(out, str) and isinstance(log, str) and out and log:
        out_parts = PurePosixPath(out).parts
        log_parts = PurePosixPath(log).parts
        n = len(log_parts)
        for i in range(len(out_parts) - n - 1, -1, -1):
            if out_parts[i : i + n] == log_parts and (i == 0 or not log.startswith("/")):
                rel = _safe_parts(out_parts[i + n :])
                if rel is not None:
                    return PurePosixPath(*rel)
                break
    rid = _safe_parts([str(run_id)])
    if rid is None:
        raise ExportError(f"wandb run id {run_id!r} is not usable as a directory name")
    return PurePosixPath("wandb", *rid)


def _run_path(run: WandbRun, project: str) -> str:
    path = getattr(run, "path", None)
    if isinstance(path, list | tuple) and path:
        return "/".join(str(p) for p in path)
    return f"{project}/{run.id}"


def _prepare_dir(path: Path, overwrite: bool) -> None:
    """Check that ``path`` may be written: new, or an earlier export (with ``overwrite``)."""
    if not path.exists():
        return
    if not (path / SOURCE_FILE).is_file():
        raise ExportError(
            f"{path} exists and is not a wandb export (no {SOURCE_FILE}): refusing to touch it; "
            "export to another --out"
        )
    if not overwrite:
        raise ExportError(f"{path} holds an earlier export: pass --overwrite to refresh it")


def write_run_dir(
    path: Path,
    config: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None,
    source: Mapping[str, Any],
) -> None:
    """Write one run directory (``summary.json`` only when ``summary`` is given)."""
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / SOURCE_FILE, json.dumps(dict(source), indent=2, sort_keys=True) + "\n")
    write_atomic(
        path / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
    )
    lines = [json.dumps(to_jsonable(dict(r))) + "\n" for r in records]
    write_atomic(path / "metrics.jsonl", "".join(lines))
    summary_path = path / "summary.json"
    if summary is not None:
        write_atomic(summary_path, json.dumps(to_jsonable(dict(summary)), indent=2) + "\n")
    elif summary_path.exists():
        summary_path.unlink()


def final_summary(
    run: WandbRun, history_keys: set[str], run_paths: Sequence[str]
) -> dict[str, Any] | None:
    """The ``summary.json`` of a directory whose newest wandb run is ``run``; None: incomplete."""
    raw = as_dict(run.summary)
    metrics = unflatten_record(user_keys(raw))
    state = getattr(run, "state", "finished")
    if state != "finished" or not set(metrics) - history_keys:
        return None
    out = {}
    for key, value in metrics.items():
        if key in PROVENANCE:
            logger.warning("%s: summary key %r renamed metric/%s", run.id, key, key)
            key = f"metric/{key}"
        out[key] = value
    runtime = raw.get("_runtime")
    return {
        **out,
        "status": "complete",
        "metric_keys": sorted(out),
        "wall_time_s": float(runtime) if isinstance(runtime, int | float) else None,
        "source": {"wandb": list(run_paths)},
    }


def export_runs(
    project: str,
    out: Path,
    *,
    api: WandbApi | None = None,
    tags: Sequence[str] = (),
    filters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[ExportedRun]:
    """Export the runs of ``project`` (``entity/project``) under ``out``.

    Args:
        project: ``entity/project``.
        out: output root (``collect.py --runs out`` reads it).
        api: a ``wandb.Api``-like object; ``None`` makes one from ``WANDB_API_KEY``.
        tags: keep the runs holding any of these wandb tags.
        filters: a wandb (MongoDB-style) filter, combined with ``tags``.
        overwrite: refresh directories written by an earlier export.

    Returns:
        The exported directories, sorted by path.

    Raises:
        ExportError: no API key, a malformed ``project``, or an output directory that exists
            and is not an earlier export (or is one and ``overwrite`` is false).
    """
    if project.count("/") != 1 or not all(project.split("/")):
        raise ExportError(f"expected ENTITY/PROJECT, got {project!r}")
    if api is None:
        api = make_api()
    runs = list(api.runs(project, filters=build_filters(tags, filters) or None))
    groups: dict[PurePosixPath, list[tuple[str, int, WandbRun, dict[str, Any]]]] = {}
    for index, run in enumerate(runs):
        config = user_keys(as_dict(run.config))
        created = str(getattr(run, "created_at", "") or "")
        groups.setdefault(run_subdir(config, run.id), []).append((created, index, run, config))
    exported = []
    for subdir in sorted(groups):
        group = sorted(groups[subdir], key=lambda item: (item[0], item[1]))
        path = Path(out, *subdir.parts)
        _prepare_dir(path, overwrite)
        histories = [history_records(run.scan_history()) for _, _, run, _ in group]
        records = merge_resumed(histories)
        history_keys = {k for recs in histories for r in recs for k in r}
        run_paths = [_run_path(run, project) for _, _, run, _ in group]
        last_run, last_config = group[-1][2], group[-1][3]
        summary = final_summary(last_run, history_keys, run_paths)
        if len(group) > 1:
            logger.info("%s: merged %d wandb runs (resumed run)", path, len(group))
        source = {"project": project, "runs": run_paths, "names": [r.name for _, _, r, _ in group]}
        write_run_dir(path, last_config, records, summary, source)
        exported.append(
            ExportedRun(
                path=path,
                wandb_ids=[r.id for _, _, r, _ in group],
                complete=summary is not None,
                n_records=len(records),
            )
        )
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 done, 2 error)."""
    parser = argparse.ArgumentParser(
        description="Export wandb runs as run directories that scripts/collect.py reads."
    )
    parser.add_argument("project", help="ENTITY/PROJECT")
    parser.add_argument("--out", type=Path, required=True, help="output root")
    parser.add_argument(
        "--tag", action="append", default=[], help="keep runs with this tag (repeatable: any)"
    )
    parser.add_argument(
        "--filters",
        type=json.loads,
        default=None,
        help='wandb filter as JSON, e.g. \'{"state": "finished"}\'',
    )
    parser.add_argument("--overwrite", action="store_true", help="refresh an earlier export")
    parser.add_argument("-v", "--verbose", action="store_true", help="log merged runs too")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        exported = export_runs(
            args.project, args.out, tags=args.tag, filters=args.filters, overwrite=args.overwrite
        )
    except ExportError as err:
        print(f"wandb_export.py: error: {err}", file=sys.stderr)
        return 2
    n_complete = sum(e.complete for e in exported)
    print(
        f"{len(exported)} run directories ({n_complete} complete) from {args.project} -> "
        f"{args.out}\ncollect them with: python scripts/collect.py ARTEFACT --runs {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
