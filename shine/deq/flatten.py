"""Packing of (multi-scale) DEQ states into one ``(B, D)`` tensor and back.

A Multiscale DEQ state is a list of tensors ``[(B, C_i, H_i, W_i)]``; the solvers work on one
vector per sample. ``D = Σ_i C_i·H_i·W_i`` (61,440 for MDEQ-CIFAR "LARGE").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

State = Tensor | list[Tensor] | tuple[Tensor, ...]


@dataclass(frozen=True)
class StatePacker:
    """Flattens a state (a tensor or a sequence of tensors sharing the batch size) to ``(B, D)``.

    Attributes:
        shapes: per-sample shape of each component.
        kind: ``"tensor"``, ``"list"`` or ``"tuple"`` (what :meth:`unflatten` returns).
    """

    shapes: tuple[tuple[int, ...], ...]
    kind: str

    @classmethod
    def like(cls, state: State) -> StatePacker:
        """The packer of states shaped like ``state``.

        Raises:
            ValueError: on an empty sequence or components with different batch sizes.
        """
        if isinstance(state, Tensor):
            if state.dim() < 1:
                raise ValueError("a DEQ state needs a batch dimension, got a scalar tensor")
            return cls((tuple(state.shape[1:]),), "tensor")
        if not isinstance(state, Sequence) or len(state) == 0:
            raise ValueError("a DEQ state is a tensor or a non-empty list/tuple of tensors")
        batch = {t.shape[0] for t in state}
        if len(batch) != 1:
            raise ValueError(f"all state components must share the batch size, got {batch}")
        kind = "tuple" if isinstance(state, tuple) else "list"
        return cls(tuple(tuple(t.shape[1:]) for t in state), kind)

    @property
    def sizes(self) -> list[int]:
        """Number of entries per sample of each component."""
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def dim(self) -> int:
        """``D``, entries per sample of the whole state."""
        return sum(self.sizes)

    def flatten(self, state: State) -> Tensor:
        """Pack ``state`` into ``(B, D)`` (a view for a single contiguous tensor)."""
        if isinstance(state, Tensor):
            return state.reshape(state.shape[0], -1)
        return torch.cat([t.reshape(t.shape[0], -1) for t in state], dim=1)

    def unflatten(self, z: Tensor) -> State:
        """Unpack ``z: (B, D)`` into the original structure (views, no copy)."""
        B = z.shape[0]
        if self.kind == "tensor":
            return z.view(B, *self.shapes[0])
        parts = [
            p.view(B, *s) for p, s in zip(z.split(self.sizes, dim=1), self.shapes, strict=True)
        ]
        return tuple(parts) if self.kind == "tuple" else parts


def zeros_like_state(state: State) -> State:
    """A zero state with the structure, dtype and device of ``state``."""
    if isinstance(state, Tensor):
        return torch.zeros_like(state)
    parts = [torch.zeros_like(t) for t in state]
    return tuple(parts) if isinstance(state, tuple) else parts
