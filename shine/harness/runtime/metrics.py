"""Append-only JSON-lines metrics file: one JSON object per logged record.

Every record carries the integer ``step`` it belongs to and the wall-clock ``wall_time`` (Unix
seconds) at which it was written. Several records may share a step (e.g. one per variant of an
experiment at the same seed). The file is flushed after every record so that a killed run loses at
most the record being written; :meth:`JsonlMetrics.truncate_after` removes the records a resumed
run is about to produce again. :meth:`JsonlMetrics.repair` (run before it on resume) deletes
nothing but a torn last line: a damaged line elsewhere (disk or copy error, a second writer) is
moved to ``metrics.corrupt.jsonl`` with its byte offset, and reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON data: tensors/numpy values become lists or scalars.

    Non-finite floats are encoded (strict JSON has none): NaN becomes ``None``, infinities the
    strings ``"inf"``/``"-inf"``. Mappings and sequences are converted recursively.
    """
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _record(raw: bytes) -> dict[str, Any] | None:
    """The metrics record on the line ``raw`` (a JSON object with an integer ``step``) or None."""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("step"), int) else None


def _parses(raw: bytes) -> bool:
    """Whether ``raw`` is a metrics record."""
    return _record(raw) is not None


def make_record(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One record, ``{"step": step, "wall_time": now, **metrics}`` made JSON-ready.

    Raises:
        ValueError: if ``metrics`` uses the reserved keys ``step`` or ``wall_time``.
    """
    reserved = {"step", "wall_time"} & set(metrics)
    if reserved:
        raise ValueError(f"metric names {sorted(reserved)} are reserved")
    return {"step": int(step), "wall_time": time.time(), **to_jsonable(dict(metrics))}


class JsonlMetrics:
    """The ``metrics.jsonl`` file of a run.

    Args:
        path: location of the file (created on the first append).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def corrupt_path(self) -> Path:
        """``metrics.corrupt.jsonl`` beside the file: damaged lines moved out of it."""
        return self.path.with_name(self.path.stem + ".corrupt.jsonl")

    def repair(self) -> tuple[int, bool]:
        """Move damaged lines out of the file; truncate a torn last line.

        A line that does not parse as a JSON object is *torn* if it is the last one and lacks its
        newline (a record cut by a kill: it is dropped), else *damaged*: it is appended, with its
        byte offset in the file, to :attr:`corrupt_path` as ``{"offset": n, "line": "..."}`` and
        removed from the file, with a warning. The file is rewritten atomically.

        Returns:
            ``(number of damaged lines moved, whether a torn last line was dropped)``.
        """
        if not self.path.exists():
            return 0, False
        data = self.path.read_bytes()
        kept: list[bytes] = []
        damaged: list[dict[str, Any]] = []
        torn = False
        offset = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            start, offset = offset, offset + len(raw) + 1
            if i == len(lines) - 1:  # after the last newline: empty, or a torn record
                if raw.strip():
                    if _parses(raw):
                        kept.append(raw)  # a complete record that lost only its newline
                    else:
                        torn = True
                        logger.warning(
                            "%s: dropping a torn last line (%d bytes at offset %d)",
                            self.path,
                            len(raw),
                            start,
                        )
                continue
            if not raw.strip():
                continue
            if _parses(raw):
                kept.append(raw)
            else:
                damaged.append({"offset": start, "line": raw.decode("utf-8", "replace")})
        if not damaged and not torn and (not data or data.endswith(b"\n")):
            return 0, False
        if damaged:
            with self.corrupt_path.open("a", encoding="utf-8") as fh:
                for entry in damaged:
                    fh.write(json.dumps({"file": self.path.name, **entry}) + "\n")
            logger.warning(
                "%s: %d damaged line(s) (offsets %s) moved to %s",
                self.path,
                len(damaged),
                ", ".join(str(d["offset"]) for d in damaged),
                self.corrupt_path,
            )
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.writelines(line + b"\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(damaged), torn

    def append(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record ``{"step": step, "wall_time": now, **metrics}`` and flush it.

        Args:
            step: the step (iteration, epoch, seed index, ...) the record belongs to.
            metrics: JSON-serialisable values; 0-d tensors and numpy scalars are converted, NaN is
                written as ``null`` and infinities as the strings ``"inf"``/``"-inf"``.

        Returns:
            The record as written.

        Raises:
            ValueError: if ``metrics`` uses the reserved keys ``step`` or ``wall_time``.
        """
        record = make_record(step, metrics)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        return record

    def read(self) -> list[dict[str, Any]]:
        """Return all complete records, in file order.

        Unparsable lines are skipped and reported: a torn last line, or a damaged one that
        :meth:`repair` would move out.
        """
        if not self.path.exists():
            return []
        records = []
        lines = self.path.read_bytes().split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            record = _record(raw)
            if record is None:
                kind = "torn last" if i == len(lines) - 1 else "damaged"
                logger.warning("skipping a %s line (line %d) of %s", kind, i + 1, self.path)
            else:
                records.append(record)
        return records

    def truncate_after(self, step: int | None) -> int:
        """Keep only the records with ``record["step"] <= step`` (all removed if ``step`` is None).

        The file is rewritten atomically (temporary file + ``os.replace``).

        Args:
            step: last step whose records are known to be complete (the checkpointed step), or
                ``None`` when the run restarts from scratch.

        Returns:
            The number of records removed.
        """
        if not self.path.exists():
            return 0
        self.repair()  # damaged lines are moved aside, never dropped with the rest
        records = self.read()
        kept = [r for r in records if step is not None and int(r["step"]) <= step]
        removed = len(records) - len(kept)
        if removed == 0:
            return 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if removed:
            logger.info("removed %d metric records written after step %s", removed, step)
        return removed
