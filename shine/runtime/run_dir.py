"""The run contract: one directory per run, resumable, never silently overwritten.

Layout of a run directory::

    config.yaml            resolved configuration (text given by the caller)
    metrics.jsonl          one JSON object per logged record: {"step", "wall_time", ...}
    checkpoints/last.pt    last checkpoint, written atomically, loaded with weights_only=True
    summary.json           final metrics + provenance; its presence marks the run as complete

A run that is interrupted (killed, pre-empted, requeued) is resumed by starting it again on the
same directory: :meth:`RunDirectory.start` loads the checkpoint and drops the metric records
written after the checkpointed step, so the resumed run appends exactly what is missing.

In a multi-process (data-parallel) run, rank 0 owns the directory; the other ranks open it with
``read_only=True`` (a *follower*): it loads the checkpoint to resume from but never writes (see
:class:`RunDirectory`).
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from shine.runtime.metrics import JsonlMetrics, make_record, to_jsonable
from shine.runtime.provenance import environment_info, git_state
from shine.runtime.wandb_mirror import WandbMirror

logger = logging.getLogger(__name__)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDirectory:
    """A run's output directory and everything written to it.

    Typical use (``train.py``)::

        run_dir = RunDirectory(output_dir, mirror=WandbMirror("disabled"))
        if run_dir.is_complete():
            ...  # report where the results are, or move_aside() when overwriting
        state = run_dir.start(config_yaml)          # None on a fresh start
        for step in range(first, n):
            run_dir.log_metrics(step, {...})
            run_dir.save_checkpoint({...}, step=step)
        run_dir.finish(final_metrics)

    Args:
        path: the directory (created by :meth:`start` if needed).
        mirror: optional :class:`WandbMirror` receiving a copy of every record.
        read_only: a follower of the directory, for the non-main ranks of a multi-process run:
            nothing is created, written, truncated, moved or mirrored. :meth:`start` loads the
            checkpoint (and the metric records up to its step) once; :meth:`load_checkpoint`
            returns that snapshot, so the follower resumes from exactly the checkpoint its
            rank-0 writer resumed from if it starts after the writer's :meth:`start` and before
            the writer saves the next checkpoint (``train.py`` orders them with barriers).
            :meth:`log_metrics` keeps the records in memory (:meth:`read_metrics` returns the
            snapshot plus them), :meth:`save_checkpoint`, :meth:`finish` and :meth:`close` write
            nothing (:meth:`finish` still returns the summary it would have written).
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoints/last.pt"

    def __init__(
        self,
        path: str | os.PathLike[str],
        mirror: WandbMirror | None = None,
        *,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.mirror = None if read_only else mirror
        self.metrics = JsonlMetrics(self.path / self.METRICS)
        # follower snapshot, set by start(): (checkpoint state, metric records)
        self._snapshot: tuple[dict[str, Any] | None, list[dict[str, Any]]] | None = None
        self._t0: float | None = None
        self._elapsed_before = 0.0
        self._started_at: str | None = None
        self._n_starts = 0
        self._overrides: list[str] = []

    # ------------------------------------------------------------------ paths and status
    @property
    def config_path(self) -> Path:
        """``<run>/config.yaml``."""
        return self.path / self.CONFIG

    @property
    def summary_path(self) -> Path:
        """``<run>/summary.json``."""
        return self.path / self.SUMMARY

    @property
    def checkpoint_path(self) -> Path:
        """``<run>/checkpoints/last.pt``."""
        return self.path / self.CHECKPOINT

    def is_complete(self) -> bool:
        """Whether the run finished (``summary.json`` exists)."""
        return self.summary_path.is_file()

    def has_results(self) -> bool:
        """Whether anything of a previous run (config, metrics, checkpoint, summary) is present."""
        return any(
            p.exists()
            for p in (self.config_path, self.metrics.path, self.checkpoint_path, self.summary_path)
        )

    def move_aside(self) -> Path:
        """Rename the directory to a timestamped backup next to it and recreate it empty.

        Nothing is deleted: the previous run ends up in ``<name>.bak-YYYYmmdd-HHMMSS[-k]``.

        Returns:
            The backup path.

        Raises:
            FileNotFoundError: if the directory does not exist.
            RuntimeError: on a read-only directory.
        """
        if self.read_only:
            raise RuntimeError(f"{self.path} is open read-only; only its writer moves it aside")
        if not self.path.exists():
            raise FileNotFoundError(self.path)
        stem = f"{self.path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
        backup = self.path.with_name(stem)
        k = 0
        while backup.exists():
            k += 1
            backup = self.path.with_name(f"{stem}-{k}")
        os.replace(self.path, backup)
        self.path.mkdir(parents=True)
        logger.warning("moved the previous run %s aside to %s", self.path, backup)
        return backup

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        config_yaml: str,
        *,
        config: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Begin (or resume) the run.

        Writes ``config.yaml``, loads the checkpoint if there is one, truncates ``metrics.jsonl``
        to the checkpointed step (to nothing on a fresh start) and starts the mirror. Read-only:
        only loads the checkpoint and the records up to its step (see the class docstring).

        Args:
            config_yaml: the resolved configuration as YAML text.
            config: the same configuration as a mapping, for the mirror.
            overrides: the command-line overrides that produced it (recorded in the summary).

        Returns:
            The task state of the checkpoint (as given to :meth:`save_checkpoint`), or ``None``
            on a fresh start.

        Raises:
            RuntimeError: if the run is already complete (check :meth:`is_complete` first).
        """
        if self.is_complete():
            raise RuntimeError(
                f"{self.path} holds a complete run (summary.json); move it aside to rerun it"
            )
        if self.read_only:
            return self._start_follower(overrides)
        self.path.mkdir(parents=True, exist_ok=True)
        self._warn_on_config_change(config_yaml)
        _atomic_write_text(self.config_path, config_yaml)
        self._overrides = list(overrides)
        self._t0 = time.perf_counter()
        payload = self._load_payload()
        if payload is None:
            self.metrics.truncate_after(None)
            self._started_at = _now_iso()
            self._elapsed_before = 0.0
            self._n_starts = 1
            state = None
        else:
            self.metrics.truncate_after(int(payload["step"]))
            self._started_at = payload["started_at"]
            self._elapsed_before = float(payload["elapsed_s"])
            self._n_starts = int(payload["n_starts"]) + 1
            state = payload["state"]
            logger.info("resuming %s after step %d", self.path, payload["step"])
        if self.mirror is not None:
            self.mirror.start(self.path, config)
        return state

    def _start_follower(self, overrides: Sequence[str]) -> dict[str, Any] | None:
        self._overrides = list(overrides)
        self._t0 = time.perf_counter()
        payload = self._load_payload()
        last = None if payload is None else int(payload["step"])
        records = [r for r in self.metrics.read() if last is not None and int(r["step"]) <= last]
        if payload is None:
            self._started_at, self._elapsed_before, self._n_starts = _now_iso(), 0.0, 1
            state = None
        else:
            self._started_at = payload["started_at"]
            self._elapsed_before = float(payload["elapsed_s"])
            self._n_starts = int(payload["n_starts"]) + 1
            state = payload["state"]
        self._snapshot = (state, records)
        return state

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record to ``metrics.jsonl`` (and to the mirror); return the record.

        Read-only: the record is kept in memory only.

        Args:
            step: the step the record belongs to (records may share a step).
            metrics: JSON-serialisable values (see :meth:`JsonlMetrics.append`).
        """
        if self.read_only:
            record = make_record(step, metrics)
            if self._snapshot is not None:
                self._snapshot[1].append(record)
            return record
        record = self.metrics.append(step, metrics)
        if self.mirror is not None:
            self.mirror.log(record)
        return record

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` in order.

        Read-only after :meth:`start`: the records up to the loaded checkpoint's step, then those
        logged by this process.
        """
        if self.read_only and self._snapshot is not None:
            return list(self._snapshot[1])
        return self.metrics.read()

    def elapsed(self) -> float:
        """Wall time of the run in seconds, summed over all its (resumed) processes."""
        current = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return self._elapsed_before + current

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: Mapping[str, Any], *, step: int) -> Path:
        """Atomically write ``checkpoints/last.pt``.

        ``state`` must be loadable with ``torch.load(weights_only=True)``: tensors, numbers,
        strings, booleans, ``None`` and (nested) dicts, lists and tuples of them. RNG states are
        tensors (``torch.get_rng_state()``), numpy arrays are not: convert them.

        Args:
            state: what the task needs to continue after ``step``.
            step: the last step whose metric records are all written; on resume, records with a
                larger step are dropped.

        Returns:
            The checkpoint path (read-only: nothing is written).
        """
        if self.read_only:
            return self.checkpoint_path
        payload = {
            "step": int(step),
            "state": dict(state),
            "elapsed_s": self.elapsed(),
            "started_at": self._started_at or _now_iso(),
            "n_starts": self._n_starts,
        }
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def _load_payload(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        # weights_only: a checkpoint is data, never code to execute
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Return the task state of the last checkpoint, or ``None`` if there is none.

        Loads with ``torch.load(..., weights_only=True)`` onto the CPU; move tensors to the
        device yourself. Read-only after :meth:`start`: the state loaded by :meth:`start`.

        Raises:
            pickle.UnpicklingError: if the file holds objects other than plain data.
        """
        if self.read_only and self._snapshot is not None:
            return self._snapshot[0]
        payload = self._load_payload()
        return None if payload is None else payload["state"]

    # ------------------------------------------------------------------ end of run
    def finish(
        self, metrics: Mapping[str, Any], *, source_dir: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """Write ``summary.json`` (which marks the run complete) and close the mirror.

        Read-only: writes nothing and returns the summary.

        Args:
            metrics: the final metrics of the run.
            source_dir: a directory of the code's git checkout, for the revision (default: cwd).

        Returns:
            The summary as written: every final metric as a top-level key (e.g.
            ``opa/prescribed/cos_median``), ``metric_keys`` (their names), ``status``,
            ``wall_time_s`` (summed over resumed processes), ``n_starts``, ``start_time``,
            ``end_time``, ``git`` (revision, dirty), ``env`` (python/torch/numpy versions,
            hostname, ...), ``overrides``.

        Raises:
            ValueError: if a metric name collides with one of the provenance fields.
        """
        final = to_jsonable(dict(metrics))
        info = {
            "status": "complete",
            "metric_keys": sorted(final),
            "wall_time_s": self.elapsed(),
            "n_starts": self._n_starts,
            "start_time": self._started_at or _now_iso(),
            "end_time": _now_iso(),
            "git": git_state(source_dir),
            "env": environment_info(),
            "overrides": self._overrides,
        }
        clash = sorted(set(final) & set(info))
        if clash:
            raise ValueError(f"metric names {clash} are reserved in summary.json; rename them")
        summary = {**final, **info}
        if self.read_only:
            return summary
        _atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")
        if self.mirror is not None:
            self.mirror.finish(final)
        return summary

    def close(self) -> None:
        """Close the mirror without marking the run complete (e.g. when stopping early)."""
        if self.mirror is not None:
            self.mirror.finish()

    def read_summary(self) -> dict[str, Any]:
        """Return the parsed ``summary.json`` of a complete run."""
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    @staticmethod
    def final_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
        """The final metrics of a parsed summary (without the provenance fields)."""
        return {k: summary[k] for k in summary["metric_keys"]}

    def _warn_on_config_change(self, config_yaml: str) -> None:
        if not self.config_path.is_file() or not self.checkpoint_path.is_file():
            return
        old = self.config_path.read_text(encoding="utf-8")
        if old == config_yaml:
            return
        diff = difflib.unified_diff(
            old.splitlines(), config_yaml.splitlines(), "previous", "now", lineterm="", n=0
        )
        lines = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        logger.warning(
            "resuming %s with a different configuration:\n%s", self.path, "\n".join(lines[:40])
        )
