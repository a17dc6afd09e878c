"""The interface between ``train.py`` and an experiment."""

from __future__ import annotations

from typing import Any, Protocol

from shine.harness.runtime.run_dir import RunDirectory


class Task(Protocol):
    """An experiment that writes its records into a run directory.

    ``train.py`` instantiates the task from the configuration (with its solvers, data, ... as
    objects), calls :meth:`RunDirectory.start` and then :meth:`run`.
    """

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Run (or resume) the experiment.

        Args:
            run_dir: a started run directory: the task logs records with
                ``run_dir.log_metrics`` and checkpoints with ``run_dir.save_checkpoint``, and
                resumes from ``run_dir.load_checkpoint()``.

        Returns:
            The final metrics when the experiment is complete (``train.py`` writes them to
            ``summary.json``), or ``None`` when it stopped early and must be resumed.
        """
        ...
