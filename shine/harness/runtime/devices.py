"""Device and dtype helpers for objects configured with plain strings."""

from __future__ import annotations

import torch


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Return the ``torch.dtype`` named by ``dtype`` (``"float64"``, ``"torch.float32"``, ...).

    Raises:
        ValueError: if the name is not a torch dtype.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return resolved


def synchronize(device: str | torch.device) -> None:
    """Wait for the kernels queued on ``device`` (no-op on the CPU): frames every timed part."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
