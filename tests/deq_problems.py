"""Small float64 root problems with dense Jacobians, shared by the solver and backward tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DT = torch.float64


class TanhMap(nn.Module):
    """``f(z, x) = tanh(z Wᵀ + x)`` with ``‖W‖₂ = contraction`` (a contractive DEQ layer)."""

    def __init__(self, dim: int, contraction: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(dim, dim, dtype=DT, generator=gen)
        self.W = nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, 2))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.W.T + x)


@dataclass
class RootProblem:
    """``g(z) = f(z, x) - z`` on a batch, with its exact root and Jacobians."""

    f: TanhMap
    x: Tensor

    def g(self, z: Tensor) -> Tensor:
        return self.f(z, self.x) - z

    def root(self, n_iter: int = 2000) -> Tensor:
        z = torch.zeros_like(self.x)
        with torch.no_grad():
            for _ in range(n_iter):
                z = self.f(z, self.x)
        return z

    def jacobian(self, z: Tensor) -> Tensor:
        """Dense ``J_g(z)``, ``(B, D, D)``."""
        W = self.f.W.detach()
        s = 1 - torch.tanh(z @ W.T + self.x) ** 2
        eye = torch.eye(z.shape[1], dtype=z.dtype)
        return s[:, :, None] * W[None] - eye


def make_problem(
    dim: int = 8, batch: int = 3, contraction: float = 0.5, seed: int = 0
) -> RootProblem:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, dim, dtype=DT, generator=gen)
    return RootProblem(TanhMap(dim, contraction, seed), x)


class Recorder:
    """Wraps a residual function and records every (z, g(z)) pair it is called on."""

    def __init__(self, g):
        self.g = g
        self.zs: list[Tensor] = []
        self.gs: list[Tensor] = []

    def __call__(self, z: Tensor) -> Tensor:
        out = self.g(z)
        self.zs.append(z.detach().clone())
        self.gs.append(out.detach().clone())
        return out
