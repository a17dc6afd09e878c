"""The run contract: one directory per run, resumable, never silently overwritten.

Layout of a run directory::

    config.yaml            resolved configuration (text given by the caller)
    overrides.yaml         the command-line overrides it was started with (for error messages)
    metrics.jsonl          one JSON object per logged record: {"step", "wall_time", ...}
    checkpoints/last.pt    last checkpoint, written atomically, loaded with weights_only=True
    checkpoints/prev.pt    the checkpoint before it (kept in case the last one is damaged)
    summary.json           final metrics + provenance; its presence marks the run as ended
                           (``status``: ``complete`` or ``diverged``)
    train.log              the log of every invocation (written by train.py)
    wandb_id               the wandb run id, so that a resumed run continues the same wandb run
    .lock, .lock.json      the writer's lock and its holder (see shine.harness.runtime.lock)

A run that is interrupted (killed, pre-empted, requeued) is resumed by starting it again on the
same directory: :meth:`RunDirectory.start` loads the checkpoint and drops the metric records
written after the checkpointed step, so the resumed run appends exactly what is missing. It
refuses to resume with another configuration (:class:`ConfigMismatchError`, keys in
:data:`RESULT_NEUTRAL_KEYS` excepted) and names a damaged checkpoint
(:class:`CorruptCheckpointError`). One process writes a directory at a time
(:meth:`RunDirectory.acquire`).

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
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from shine.harness.runtime.lock import RunLock
from shine.harness.runtime.metrics import JsonlMetrics, make_record, to_jsonable
from shine.harness.runtime.provenance import environment_info, git_state
from shine.harness.runtime.wandb_mirror import WandbMirror

logger = logging.getLogger(__name__)

#: configuration keys (dotted) that do not change what a run computes: a run may be resumed or
#: found complete with other values of these (where it writes, how it logs, how often it
#: checkpoints, how many CPU threads it uses); any other difference refuses the resume
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "hydra",
    "paths",
    "logger",
    "overwrite",
    "tags",
    "sweep_name",
    "trainer.num_threads",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.stop_after",
    "task.stop_after",
    "trainer.num_workers",
    "task.trainer.log_every",
    "task.trainer.checkpoint_every",
    "task.trainer.stop_after",
    "task.trainer.num_threads",
)


class ConfigMismatchError(RuntimeError):
    """The configuration differs from the one the run directory was started with."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded."""


def _drop_keys(config: Any, keys: Sequence[str]) -> Any:
    """A copy of the nested mapping ``config`` without the dotted ``keys``."""
    if not isinstance(config, Mapping):
        return config
    out = {}
    for name, value in config.items():
        nested = [k.split(".", 1)[1] for k in keys if "." in k and k.split(".", 1)[0] == name]
        if name in keys:
            continue
        out[name] = _drop_keys(value, nested) if nested else value
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The lines that differ between two configurations, result-neutral keys left out.

    Returns:
        ``["- key: old", "+ key: new", ...]`` (empty when they compute the same thing).
    """
    a = yaml.safe_dump(_drop_keys(old, RESULT_NEUTRAL_KEYS), sort_keys=True).splitlines()
    b = yaml.safe_dump(_drop_keys(new, RESULT_NEUTRAL_KEYS), sort_keys=True).splitlines()
    diff = difflib.unified_diff(a, b, "stored", "now", lineterm="", n=1)
    return [line for line in diff if line[:3] not in ("+++", "---")]


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
    PREVIOUS_CHECKPOINT = "checkpoints/prev.pt"
    WANDB_ID = "wandb_id"

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
        self._lock = RunLock(self.path)
        #: set by a signal handler (train.py): the trainer checkpoints and stops at the next step
        self.stop_requested = False
        self.stop_reason = ""
        #: the step after which a stop request interrupted the run (set by the trainer)
        self.interrupted_at: int | None = None
        #: combines the stop flags of the processes of a data-parallel run (``flag -> any``)
        self.stop_sync: Callable[[bool], bool] | None = None

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

    @property
    def previous_checkpoint_path(self) -> Path:
        """``<run>/checkpoints/prev.pt``."""
        return self.path / self.PREVIOUS_CHECKPOINT

    def is_complete(self) -> bool:
        """Whether the run ended (``summary.json`` exists: completed or diverged)."""
        return self.summary_path.is_file()

    def status(self) -> str | None:
        """``"complete"``, ``"diverged"`` (from ``summary.json``), or ``None`` if not ended."""
        if not self.is_complete():
            return None
        return str(self.read_summary().get("status", "complete"))

    # ------------------------------------------------------------------ one writer
    def acquire(self) -> None:
        """Take the writer's lock (no-op when read-only); see :class:`~.lock.RunLock`.

        Raises:
            shine.harness.runtime.lock.RunLockedError: another live process writes this directory.
        """
        if not self.read_only:
            self._lock.acquire()

    def release(self) -> None:
        """Release the writer's lock (no-op if not held)."""
        self._lock.release()

    def request_stop(self, reason: str) -> None:
        """Ask the running task to checkpoint and stop after its current step."""
        self.stop_requested = True
        self.stop_reason = reason

    def should_stop(self) -> bool:
        """Whether to stop after the current step (a stop was requested).

        In a data-parallel run, on any rank: :attr:`stop_sync` combines the ranks' flags, and
        every rank must call it at the same step.
        """
        if self.stop_sync is not None:
            return self.stop_sync(self.stop_requested)
        return self.stop_requested

    def config_changes(self, config: Mapping[str, Any]) -> list[str]:
        """:func:`config_diff` of the stored ``config.yaml`` and ``config`` (empty without one)."""
        if not self.config_path.is_file():
            return []
        stored = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        return config_diff(stored, config)

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Compare ``config`` with the stored ``config.yaml`` (result-neutral keys excepted).

        Raises:
            ConfigMismatchError: with the differing lines, if they differ.
        """
        diff = self.config_changes(config)
        if diff:
            overrides = stored_overrides(self.path)
            command = "python train.py " + " ".join(overrides) if overrides else None
            raise ConfigMismatchError(
                f"{self.path} was started with another configuration:\n"
                + "\n".join(f"    {line}" for line in diff[:40])
                + "\nTo continue it, run its original command"
                + (f" ({command})" if command else " (see its config.yaml)")
                + "; to start it anew with this configuration, pass overwrite=true (the old "
                "directory is kept as a backup)."
            )

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
        held = self._lock.held
        self._lock.release()  # the lock file moves with the directory: take a new one
        os.replace(self.path, backup)
        self.path.mkdir(parents=True)
        if held:
            self._lock.acquire()
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
        payload = self._load_payload()
        if payload is not None:
            self.check_config(config if config is not None else yaml.safe_load(config_yaml))
        _atomic_write_text(self.config_path, config_yaml)
        _atomic_write_text(self.path / "overrides.yaml", yaml.safe_dump(list(overrides)))
        self._overrides = list(overrides)
        self._t0 = time.perf_counter()
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
        if self.mirror is not None and self.mirror.enabled:
            id_path = self.path / self.WANDB_ID
            if payload is not None and id_path.is_file():
                run_id = id_path.read_text(encoding="utf-8").strip()
            else:
                run_id = secrets.token_hex(8)
                _atomic_write_text(id_path, run_id + "\n")
            self.mirror.start(self.path, config, run_id=run_id)
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
        self._lock.heartbeat()
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
        if path.is_file():  # keep the previous good checkpoint
            os.replace(path, self.previous_checkpoint_path)
        os.replace(tmp, path)
        self._lock.heartbeat()
        return path

    @staticmethod
    def _read_checkpoint(path: Path) -> dict[str, Any]:
        # weights_only: a checkpoint is data, never code to execute
        return torch.load(path, map_location="cpu", weights_only=True)

    def _load_payload(self) -> dict[str, Any] | None:
        """The last checkpoint's payload (``None`` without one).

        Raises:
            CorruptCheckpointError: if ``last.pt`` cannot be read; the message names it, the
                state of ``prev.pt`` and the two ways out.
        """
        last, prev = self.checkpoint_path, self.previous_checkpoint_path
        if not last.is_file():
            if prev.is_file():  # killed between the two renames of save_checkpoint
                logger.warning("%s missing: resuming from %s", last, prev)
                return self._read_checkpoint(prev)
            return None
        try:
            return self._read_checkpoint(last)
        except Exception as err:  # noqa: BLE001 - any failure to read it is a damaged file
            hint = f"it has no predecessor ({prev} missing)"
            if prev.is_file():
                try:
                    step = int(self._read_checkpoint(prev)["step"])
                    hint = (
                        f"the previous checkpoint {prev} (step {step}) is intact: move the "
                        f"damaged one away (mv {last} {last}.damaged) and run the same command "
                        "to resume from it"
                    )
                except Exception:  # noqa: BLE001
                    hint = f"the previous checkpoint {prev} is damaged too"
            raise CorruptCheckpointError(
                f"checkpoint {last} cannot be read ({type(err).__name__}: {err}); {hint}; or "
                "pass overwrite=true to start the run anew (the old directory is kept as a "
                "backup)."
            ) from err

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
        self,
        metrics: Mapping[str, Any],
        *,
        source_dir: str | os.PathLike[str] | None = None,
        status: str = "complete",
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``summary.json`` (which marks the run as ended) and close the mirror.

        Read-only: writes nothing and returns the summary.

        Args:
            metrics: the final metrics of the run.
            source_dir: a directory of the code's git checkout, for the revision (default: cwd).
            status: ``"complete"``, or ``"diverged"`` for a run stopped by non-finite values.
            details: what the status needs (for ``diverged``: step, cause, last finite values),
                stored under ``status_details``.

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
            "status": status,
            "status_details": to_jsonable(dict(details or {})),
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


def stored_overrides(path: str | os.PathLike[str]) -> list[str]:
    """The command-line overrides a run directory was started with (``overrides.yaml``)."""
    file = Path(path) / "overrides.yaml"
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return [str(v) for v in values] if isinstance(values, list) else []
