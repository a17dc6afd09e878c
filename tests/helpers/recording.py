"""Objective wrappers for tests that count or inspect a solver's evaluations."""

from __future__ import annotations

from collections.abc import Callable

import torch


def recorded(fun: Callable) -> tuple[Callable, list[torch.Tensor]]:
    """``fun`` and the list of the points it was called at (copies, in call order)."""
    calls: list[torch.Tensor] = []

    def wrapped(z: torch.Tensor):
        calls.append(z.clone())
        return fun(z)

    return wrapped, calls
