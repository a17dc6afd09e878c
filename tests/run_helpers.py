"""Running a task through a run directory the way train.py does, for the task tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shine.harness.runtime import RunDirectory


def run_task(path: Path, task: Any) -> tuple[RunDirectory, dict | None]:
    """Start (or resume) ``task`` in ``path``; finish the run when it completes.

    Returns the run directory and the task's summary (``None`` when it stopped early).
    """
    run_dir = RunDirectory(path)
    run_dir.start("config: test\n")
    out = task.run(run_dir)
    if out is not None:
        run_dir.finish(out)
    else:
        run_dir.close()
    return run_dir, out
