"""The equilibrium function of the core benchmark: a compact MDEQ-like multi-scale block.

The state is a list of four branches ``[(B, 32, 32, 32), (B, 64, 16, 16), (B, 128, 8, 8),
(B, 256, 4, 4)]``: ``d = 61,440`` entries per sample, the size of MDEQ-CIFAR ("LARGE"). Each
branch applies a residual block (conv3x3 to ``expansion x`` the width → GroupNorm → ReLU →
conv3x3 back → GroupNorm, plus the branch's injection), neighbouring branches are fused (a
strided conv3x3 from the finer branch, a 1x1 conv and a nearest upsampling from the coarser one)
and every branch ends with a GroupNorm. ``expansion = 5`` and 8 groups are the values of
MDEQ-CIFAR LARGE; its all-to-all fusion is reduced to neighbouring branches.

The input ``x`` is shaped like the state: one injection per branch. With an injection on branch 0
only (as in MDEQ) the map is not contractive at initialisation: the final GroupNorm makes
branches 1-3 invariant to the scale of their input, and the spectral radius of ``J_f`` at the
(approximate) fixed point is about 1.1. With an injection on every branch and small weights it
is about 0.8, and a Broyden solve converges steadily.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CHANNELS = (32, 64, 128, 256)
RESOLUTIONS = (32, 16, 8, 4)
GROUPS = 8


def state_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    """Shapes of the multi-scale state for a batch of ``batch`` samples."""
    return [(batch, c, r, r) for c, r in zip(CHANNELS, RESOLUTIONS, strict=True)]


def state_dim() -> int:
    """Entries per sample of the state (61,440)."""
    return sum(c * r * r for c, r in zip(CHANNELS, RESOLUTIONS, strict=True))


def _conv(c_in: int, c_out: int, kernel: int, stride: int, gain: float) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.normal_(conv.weight, std=gain / (c_in * kernel * kernel) ** 0.5)
    return conv


def _norm(channels: int, scale: float) -> nn.GroupNorm:
    norm = nn.GroupNorm(GROUPS, channels, affine=True)
    nn.init.constant_(norm.weight, scale)
    return norm


class Branch(nn.Module):
    """``relu(z + GN(conv(relu(GN(conv(z))))) + injection)`` on one resolution."""

    def __init__(self, channels: int, expansion: int, gain: float, scale: float) -> None:
        super().__init__()
        inner = expansion * channels
        self.conv1 = _conv(channels, inner, 3, 1, gain)
        self.norm1 = _norm(inner, 1.0)
        self.conv2 = _conv(inner, channels, 3, 1, gain)
        self.norm2 = _norm(channels, scale)

    def forward(self, z: Tensor, injection: Tensor) -> Tensor:
        """One residual block of the branch, plus its injection."""
        h = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(z)))))
        return F.relu(z + h + injection)


class MultiScaleBlock(nn.Module):
    """``f(z, x)``: the MDEQ-like equilibrium function on a list state (see the module docstring).

    Args:
        expansion: width factor inside the branch blocks (5 in MDEQ-CIFAR LARGE).
        gain: standard deviation of the conv weights times ``sqrt(fan_in)``.
        scale: initial weight of the GroupNorms that end the residual path and each branch.
    """

    def __init__(self, expansion: int = 5, gain: float = 0.5, scale: float = 0.5) -> None:
        super().__init__()
        n = len(CHANNELS)
        self.branches = nn.ModuleList(Branch(c, expansion, gain, scale) for c in CHANNELS)
        # down[i - 1]: branch i-1 -> i (strided conv3x3); up[i]: branch i+1 -> i (conv1x1, 2x)
        self.down = nn.ModuleList(
            _conv(CHANNELS[i - 1], CHANNELS[i], 3, 2, gain) for i in range(1, n)
        )
        self.up = nn.ModuleList(
            _conv(CHANNELS[i + 1], CHANNELS[i], 1, 1, gain) for i in range(n - 1)
        )
        self.post = nn.ModuleList(_norm(c, scale) for c in CHANNELS)

    def forward(self, z: list[Tensor], x: list[Tensor]) -> list[Tensor]:
        """Apply the block to the state ``z``; ``x`` holds one injection per branch."""
        y = [b(zi, xi) for b, zi, xi in zip(self.branches, z, x, strict=True)]
        out = []
        for i, yi in enumerate(y):
            fused = yi
            if i > 0:
                fused = fused + self.down[i - 1](y[i - 1])
            if i + 1 < len(y):
                fused = fused + F.interpolate(self.up[i](y[i + 1]), scale_factor=2.0)
            out.append(self.post[i](F.relu(fused)))
        return out


def make_problem(
    batch: int, expansion: int = 5, seed: int = 0
) -> tuple[MultiScaleBlock, list[Tensor]]:
    """The benchmark's ``f`` and its input ``x`` (standard normal injections, shaped like ``z``).

    The initial state is zeros shaped like ``x`` (the default of ``DEQLayer``).
    """
    torch.manual_seed(seed)
    f = MultiScaleBlock(expansion)
    x = [torch.randn(s) for s in state_shapes(batch)]
    return f, x
