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
        self, run_dir: str | os.PathLike[str], config: Mapping[str, Any] | None = None
    ) -> None:
        """Open the wandb run (no-op when disabled).

        Args:
            run_dir: the run directory; used as wandb's ``dir`` unless one was given.
            config: the resolved run configuration, stored as the wandb run config.

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
        )
        logger.info("wandb mirror started (%s mode) in %s", self.mode, directory)

    def log(self, record: Mapping[str, Any]) -> None:
        """Mirror one metrics record (its numeric and boolean values) at its ``step``."""
        if self._run is None:
            return
        values = {
            k: v
            for k, v in record.items()
            if k not in ("step", "wall_time") and isinstance(v, (numbers.Number, bool))
        }
        self._run.log(values, step=int(record["step"]))

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write the final metrics to the wandb summary and close the run (no-op if not open)."""
        if self._run is None:
            return
        if summary:
            for key, value in summary.items():
                if isinstance(value, (numbers.Number, bool, str)):
                    self._run.summary[key] = value
        self._run.finish()
        self._run = None
