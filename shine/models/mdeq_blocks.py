"""Building blocks of the Multiscale DEQ (Bai et al. 2020).

Weight-normalised convolutions, variational dropout, the residual block of the equilibrium
function, the multiscale fusion modules and the classification head.

Everything follows the configuration the SHINE paper trained (``locuslab/mdeq`` as forked by the
SHINE authors); the module :mod:`shine.models.mdeq` assembles the blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Channel multiplier of the head's bottleneck blocks (``Bottleneck.expansion`` of ResNet).
BOTTLENECK_EXPANSION = 4


def factory(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    """``device``/``dtype`` keyword arguments for module constructors."""
    return {"device": device, "dtype": dtype}


class WNConv2d(nn.Module):
    """Bias-free ``Conv2d`` with weight normalisation ``W = g · v / ‖v‖`` (Salimans & Kingma 2016).

    The norm is taken per output channel (over ``in x k x k``), as ``weight_norm(dim=0)``. The
    weight is recomputed from ``v`` and ``g`` at every call, so gradients always reach both
    parameters; plain parameters make the module safe under ``deepcopy``, DDP and ``.double()``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding (``kernel_size // 2`` by default).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Initialisation: ``v`` as a default ``nn.Conv2d`` weight (Kaiming-uniform with ``a = √5``) and
    ``g = ‖v‖``, i.e. the effective weight at initialisation is the default conv weight. This is
    what the official MDEQ code ends up with: its ``N(0, 0.01²)`` re-initialisation only writes
    the cached weight of weight-normalised convolutions, which is recomputed from the untouched
    ``v`` and ``g`` at the next forward.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight_v = nn.Parameter(torch.empty(shape, **factory(device, dtype)))
        self.weight_g = nn.Parameter(torch.empty(out_channels, 1, 1, 1, **factory(device, dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default ``Conv2d`` initialisation of ``v`` and ``g = ‖v‖`` (see the class docstring)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self._v_norm())

    def _v_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.weight_v.flatten(1), dim=1).view(-1, 1, 1, 1)

    @property
    def weight(self) -> Tensor:
        """The effective weight ``g · v / ‖v‖`` (differentiable in ``v`` and ``g``)."""
        return self.weight_v * (self.weight_g / self._v_norm())

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` with the normalised weight."""
        return F.conv2d(x, self.weight, None, self.stride, self.padding)

    def extra_repr(self) -> str:
        """Shapes and stride, as ``Conv2d``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    bias: bool = False,
    wnorm: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A ``kernel_size`` convolution with "same" padding, weight-normalised if ``wnorm``."""
    if wnorm:
        if bias:
            raise ValueError("weight-normalised convolutions of MDEQ have no bias")
        return WNConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            device=device,
            dtype=dtype,
        )
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=bias,
        **factory(device, dtype),
    )


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per (sample, channel), shared by every pixel and every call.

    The mask is drawn by :meth:`reset_mask` (once per batch) and then reused by every call of the
    equilibrium function until the next reset, so that ``f`` is one fixed map during a forward
    solve, its differentiable step and the backward pass. It is a plain attribute (not a buffer):
    it is not saved, not broadcast by DDP and follows the dtype and device of the state it was
    drawn for.

    Args:
        p: drop probability (``0`` disables the module).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.mask: Tensor | None = None

    def reset_mask(self, like: Tensor, generator: torch.Generator | None = None) -> None:
        """Draw a new mask for states shaped like ``like`` ``(B, C, H, W)``.

        Args:
            like: a tensor with the batch size, channels, dtype and device of the state.
            generator: optional random generator (default: the global one of the device).
        """
        if self.p == 0.0:
            self.mask = None
            return
        keep = torch.full(
            (like.shape[0], like.shape[1], 1, 1),
            1.0 - self.p,
            dtype=like.dtype,
            device=like.device,
        )
        self.mask = torch.bernoulli(keep, generator=generator) / (1.0 - self.p)

    def clear_mask(self) -> None:
        """Forget the mask (calls in training mode then fail until the next reset)."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the mask in training mode; identity in eval mode or with ``p = 0``.

        Raises:
            RuntimeError: in training mode without a mask matching the batch and channels.
        """
        if not self.training or self.p == 0.0:
            return x
        mask = self.mask
        if mask is None or mask.shape[:2] != x.shape[:2]:
            got = None if mask is None else tuple(mask.shape[:2])
            raise RuntimeError(
                f"variational dropout needs a mask for (batch, channels) {tuple(x.shape[:2])}, "
                f"got {got}: call reset_dropout(...) on the equilibrium function (the "
                "classifier does it at the start of every training forward)"
            )
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        """The drop probability."""
        return f"p={self.p}"


class ResidualBlock(nn.Module):
    """The per-branch block of ``f`` (MDEQ ``BasicBlock``).

    ``GN(relu(GN(drop(conv2(relu(GN(conv1(z))))) + injection) + z))`` with ``conv1: C → E·C`` and
    ``conv2: E·C → C`` (3x3, weight-normalised when ``wnorm``), GroupNorms with ``num_groups``.

    Args:
        channels: ``C``.
        expansion: ``E`` (5 in all paper configurations).
        num_groups: groups of the GroupNorms.
        dropout: variational dropout probability.
        wnorm: weight-normalise the two convolutions.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        expansion: int,
        num_groups: int,
        dropout: float,
        wnorm: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = expansion * channels
        kw = factory(device, dtype)
        self.conv1 = conv(channels, inner, 3, wnorm=wnorm, **kw)
        self.gn1 = nn.GroupNorm(num_groups, inner, **kw)
        self.conv2 = conv(inner, channels, 3, wnorm=wnorm, **kw)
        self.drop = VariationalDropout2d(dropout)
        self.gn2 = nn.GroupNorm(num_groups, channels, **kw)
        self.gn3 = nn.GroupNorm(num_groups, channels, **kw)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        """Apply the block to one branch ``z`` with an optional injection (same shape)."""
        out = F.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + z
        return self.gn3(F.relu(out))


class Downsample(nn.Module):
    """Fusion path from a finer branch ``j`` to a coarser branch ``i > j``.

    A chain of ``i - j`` stride-2 3x3 convolutions, each followed by a GroupNorm, with ReLUs in
    between; the intermediate convolutions keep branch ``j``'s width, the last one maps to branch
    ``i``'s.

    Args:
        in_channels: channels of branch ``j``.
        out_channels: channels of branch ``i``.
        levels: ``i - j``.
        num_groups: groups of the GroupNorms.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        levels: int,
        num_groups: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = factory(device, dtype)
        layers: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            width = out_channels if last else in_channels
            layers += [
                conv(in_channels, width, 3, stride=2, **kw),
                nn.GroupNorm(num_groups, width, **kw),
            ]
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample ``x`` by ``2**levels``."""
        return self.net(x)


class Upsample(nn.Module):
    """Fusion path from a coarser branch ``j`` to a finer branch ``i < j``.

    1x1 convolution to branch ``i``'s width, GroupNorm, nearest upsampling by ``2**(j - i)``.

    Args:
        in_channels: channels of branch ``j``.
        out_channels: channels of branch ``i``.
        levels: ``j - i``.
        num_groups: groups of the GroupNorm.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        levels: int,
        num_groups: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = factory(device, dtype)
        self.conv = conv(in_channels, out_channels, 1, **kw)
        self.norm = nn.GroupNorm(num_groups, out_channels, **kw)
        self.scale = 2**levels

    def forward(self, x: Tensor) -> Tensor:
        """Upsample ``x`` by ``2**levels``."""
        return F.interpolate(self.norm(self.conv(x)), scale_factor=self.scale, mode="nearest")


def head_norm(
    channels: int,
    group_norm: bool,
    num_groups: int,
    momentum: float,
    *,
    affine: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """BatchNorm (default) or GroupNorm (``GROUP_NORM`` variant) for the stem and the head."""
    if group_norm:
        return nn.GroupNorm(num_groups, channels, affine=affine, **factory(device, dtype))
    return nn.BatchNorm2d(channels, momentum=momentum, affine=affine, **factory(device, dtype))


class Bottleneck(nn.Module):
    """ResNet bottleneck of the head: ``1x1 → 3x3 → 1x1 (x4 channels)`` plus a projected residual.

    The three normalisations have no affine parameters, as in MDEQ; the projection of the
    residual (1x1 conv + norm) exists when the widths differ.

    Args:
        in_channels: input channels (the branch width).
        planes: bottleneck width (``HEAD_CHANNELS[i]``); the output has ``4 · planes`` channels.
        group_norm: GroupNorm instead of BatchNorm.
        num_groups: groups of the GroupNorms.
        momentum: BatchNorm momentum.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        group_norm: bool,
        num_groups: int,
        momentum: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = factory(device, dtype)
        out = planes * BOTTLENECK_EXPANSION

        def norm(c: int, affine: bool = False) -> nn.Module:
            return head_norm(c, group_norm, num_groups, momentum, affine=affine, **kw)

        self.conv1 = conv(in_channels, planes, 1, **kw)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, **kw)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, out, 1, **kw)
        self.bn3 = norm(out)
        self.project: nn.Module | None = None
        if in_channels != out:
            self.project = nn.Sequential(conv(in_channels, out, 1, **kw), norm(out, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the bottleneck to ``x``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.project is None else self.project(x)
        return F.relu(out + residual)


class ClassificationHead(nn.Module):
    """MDEQ classification head on the multiscale equilibrium.

    Per branch a :class:`Bottleneck` to ``4 · head_channels[i]`` channels; from the finest branch
    on, ``y ← bottleneck_{i+1}(z_{i+1}) + down_i(y)`` with ``down_i`` a stride-2 3x3 conv (with
    bias) + norm + ReLU; then 1x1 conv (with bias) to ``final_channels`` + BatchNorm + ReLU
    (BatchNorm even in the GroupNorm variant, as in the official code), global average pooling and
    a linear classifier.

    Args:
        channels: widths of the branches.
        head_channels: bottleneck widths per branch.
        final_channels: width before pooling (``FINAL_CHANSIZE``).
        num_classes: number of classes.
        group_norm: GroupNorm instead of BatchNorm in the bottlenecks and downsampling.
        num_groups: groups of the GroupNorms.
        momentum: BatchNorm momentum.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        head_channels: tuple[int, ...],
        final_channels: int,
        num_classes: int,
        group_norm: bool,
        num_groups: int,
        momentum: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = factory(device, dtype)
        widths = [h * BOTTLENECK_EXPANSION for h in head_channels]
        self.incre = nn.ModuleList(
            Bottleneck(c, h, group_norm, num_groups, momentum, **kw)
            for c, h in zip(channels, head_channels, strict=True)
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                conv(widths[i], widths[i + 1], 3, stride=2, bias=True, **kw),
                head_norm(widths[i + 1], group_norm, num_groups, momentum, **kw),
                nn.ReLU(),
            )
            for i in range(len(widths) - 1)
        )
        self.final = nn.Sequential(
            conv(widths[-1], final_channels, 1, bias=True, **kw),
            nn.BatchNorm2d(final_channels, momentum=momentum, **kw),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(final_channels, num_classes, **kw)

    def forward(self, z: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """Logits ``(B, num_classes)`` of the multiscale state ``z``."""
        y = self.incre[0](z[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](z[i + 1]) + down(y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


__all__ = [
    "BOTTLENECK_EXPANSION",
    "Bottleneck",
    "ClassificationHead",
    "Downsample",
    "ResidualBlock",
    "Upsample",
    "VariationalDropout2d",
    "WNConv2d",
    "conv",
    "head_norm",
]
