"""Writing the collected tables: CSV cells and text, atomic writes, durations as text.

Shared by ``scripts/collect.py`` (the tidy tables of ``experiments/``), ``scripts/tables_deq.py``,
``scripts/paper_vs_ours.py`` and ``scripts/wandb_export.py``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cell(value: Any) -> str:
    """CSV text of a value: lists -> first component, ``None`` -> empty, floats -> repr."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def to_csv_text(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """The CSV text (newline line endings) of ``rows``, one :func:`cell` per column."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fmt_duration(seconds: Any) -> str:
    """``4min40`` under an hour, ``3h38`` above, ``12.3s`` under a minute (empty for NaN)."""
    if seconds is None or not math.isfinite(float(seconds)):
        return ""
    s = float(seconds)
    if s < 60:
        return f"{s:.3g}s"
    if s < 3600:
        m, r = divmod(round(s), 60)
        return f"{m}min{r:02d}"
    h, r = divmod(round(s / 60), 60)
    return f"{h}h{r:02d}"


__all__ = ["cell", "fmt_duration", "to_csv_text", "write_atomic"]
