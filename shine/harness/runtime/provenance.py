"""Where and with what a run was produced: software versions, host and git revision."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _git(args: list[str], cwd: Path) -> str | None:
    """Run ``git``; return its stripped stdout, or ``None`` if git or the repository is absent."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(source_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Git revision of the code and whether it has uncommitted changes.

    Args:
        source_dir: a directory inside the repository (default: the current directory).

    Returns:
        ``{"revision": sha or None, "dirty": bool or None}``; both are ``None`` when ``source_dir``
        is not inside a git repository or git is not installed. ``dirty`` counts modified tracked
        files and untracked, non-ignored files (run outputs are git-ignored).
    """
    cwd = Path(source_dir) if source_dir is not None else Path.cwd()
    revision = _git(["rev-parse", "HEAD"], cwd)
    if revision is None:
        return {"revision": None, "dirty": None}
    status = _git(["status", "--porcelain"], cwd)
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def environment_info() -> dict[str, Any]:
    """Python, torch and numpy versions, CUDA availability, host name and platform."""
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
