"""Optional mirror of a run's metrics to Weights & Biases.

The run directory (``metrics.jsonl``, ``summary.json``) is always the record of a run; the mirror
only copies it to wandb when enabled. ``wandb`` is imported lazily, so a disabled mirror costs
nothing, and it never asks for credentials: ``online`` mode reads the API key from the
``WANDB_API_KEY`` environment variable only; ``offline`` mode writes a local wandb run (under
``dir``) that ``wandb sync`` can upload later, with no network.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Mode = Literal["disabled", "offline", "online"]
_MODES = ("disabled", "offline", "online")
_SCALARS = (numbers.Number, bool, str)


def _is_number_list(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(x, numbers.Number) and not isinstance(x, bool) for x in value)
    )


def flatten_record(
    record: Mapping[str, Any], skip: Sequence[str] = ("step", "wall_time")
) -> dict[str, Any]:
    """The wandb history row of a metrics record.

    Numbers, booleans and strings are kept; a list of numbers ``key: [a, b]`` becomes the
    components ``key/0: a, key/1: b`` (wandb plots scalars only); other values (nested
    structures, ``None``) and the keys in ``skip`` (the record's bookkeeping) are left out.
    :func:`unflatten_record` is the inverse.
    """
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, _SCALARS):
            row[key] = value
        elif _is_number_list(value):
            row.update({f"{key}/{i}": x for i, x in enumerate(value)})
    return row


def unflatten_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_record`: ``key/0 .. key/n-1`` back into the list ``key``.

    Only complete runs of indices ``0..n-1`` are merged (and only when ``key`` itself is not a
    field of the row); anything else is returned unchanged.
    """
    groups: dict[str, dict[int, Any]] = {}
    for key, value in row.items():
        base, sep, index = str(key).rpartition("/")
        if sep and base and index.isdigit() and str(int(index)) == index:
            groups.setdefault(base, {})[int(index)] = value
    out = dict(row)
    for base, parts in groups.items():
        if base in row or sorted(parts) != list(range(len(parts))):
            continue
        for i in range(len(parts)):
            del out[f"{base}/{i}"]
        out[base] = [parts[i] for i in range(len(parts))]
    return out


class WandbMirror:
    """Copies every metrics record (and the final summary) to a wandb run.

    Args:
        mode: ``"disabled"`` (nothing happens, wandb is not imported), ``"offline"`` (local run
            files only) or ``"online"`` (needs ``WANDB_API_KEY`` in the environment).
        project: wandb project name.
        entity: wandb entity (user or team); ``None`` for the key's default.
        name: display name of the run.
        group: wandb group (e.g. the experiment name).
        tags: wandb tags.
        dir: directory under which wandb writes its files (``<dir>/wandb/``); ``None`` lets the
            mirror use the run directory given to :meth:`start`.

    Raises:
        ValueError: on an unknown ``mode``.
    """

    def __init__(
        self,
        mode: Mode = "disabled",
        project: str = "shine",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"wandb mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.project = project
        self.entity = entity
        self.name = name
        self.group = group
        self.tags = list(tags)
        self.dir = dir
        self._run: Any = None

    @property
    def enabled(self) -> bool:
        """Whether records are mirrored (mode is not ``disabled``)."""
        return self.mode != "disabled"

    def start(
        self,
        run_dir: str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        """Open the wandb run (no-op when disabled).

        Args:
            run_dir: the run directory; used as wandb's ``dir`` unless one was given.
            config: the resolved run configuration, stored as the wandb run config.
            run_id: the wandb run id; a resumed run passes the id it started with
                (``resume="allow"``), so that wandb continues the same run.

        Raises:
            RuntimeError: in ``online`` mode when ``WANDB_API_KEY`` is not set.
        """
        if not self.enabled or self._run is not None:
            return
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError(
                "wandb online mode needs the WANDB_API_KEY environment variable; "
                "use logger.mirror.mode=offline to log locally and `wandb sync` later"
            )
        import wandb  # lazy: ~0.7 s, and unused when the mirror is disabled

        directory = Path(self.dir if self.dir is not None else run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            name=self.name,
            group=self.group,
            tags=self.tags or None,
            dir=str(directory),
            config=dict(config) if config is not None else None,
            id=run_id,
            resume="allow" if run_id is not None else None,
        )
        logger.info("wandb mirror started (%s mode) in %s", self.mode, directory)

    def log(self, record: Mapping[str, Any]) -> None:
        """Mirror one metrics record at its ``step`` (see :func:`flatten_record`)."""
        if self._run is None:
            return
        self._run.log(flatten_record(record), step=int(record["step"]))

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write the final metrics to the wandb summary and close the run (no-op if not open)."""
        if self._run is None:
            return
        if summary:
            for key, value in flatten_record(summary, skip=()).items():
                self._run.summary[key] = value
        self._run.finish()
        self._run = None
