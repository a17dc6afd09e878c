"""Append-only JSON-lines metrics file: one JSON object per logged record.

Every record carries the integer ``step`` it belongs to and the wall-clock ``wall_time`` (Unix
seconds) at which it was written. Several records may share a step (e.g. one per variant of an
experiment at the same seed). The file is flushed after every record so that a killed run loses at
most the record being written; :meth:`JsonlMetrics.truncate_after` removes the records a resumed
run is about to produce again, and drops a torn last line.
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
        """Return all complete records, in file order (an unparsable torn last line is skipped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a torn line in %s", self.path)
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
        records = self.read()
        kept = [r for r in records if step is not None and int(r["step"]) <= step]
        removed = len(records) - len(kept)
        raw_lines = len(self.path.read_text(encoding="utf-8").splitlines())
        if raw_lines == len(kept):
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
