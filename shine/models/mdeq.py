"""Multiscale Deep Equilibrium image classifier (MDEQ, Bai et al. 2020), as trained in SHINE.

The model is ``logits = head(z*)`` with ``z* = f(z*, inject(x))`` a list of per-resolution states
(``num_branches`` branches, branch ``i`` at ``1/2^i`` of the top resolution):

* **stem / injection** (:meth:`MDEQClassifier.inject`): conv3x3-BN-ReLU-conv3x3-BN-ReLU, the two
  convolutions with stride 2 when ``downsample_times`` is at least 1 / 2, then (unless
  ``downsample_times == 0`` and ``num_branches <= 2``) a 1x1 conv-BN-ReLU. The result is injected
  into branch 0 only; the other branches get zero injection.
* **equilibrium function** (:class:`MDEQFunction`): a residual block per branch, a multiscale
  fusion (all-to-all: stride-2 conv chains down, 1x1 conv + nearest upsampling up) and a
  post-fusion ReLU-1x1 conv-GroupNorm.
* **head** (:class:`~shine.models.mdeq_blocks.ClassificationHead`): bottlenecks per branch,
  strided merge from fine to coarse, 1x1 conv to ``final_channels``, pooling and a linear layer.

The state is solved for by a :class:`~shine.deq.DEQLayer` with the solver and backward strategy
given to the classifier (SHINE, Jacobian-Free, IFT, refine, fallback), or unrolled
``num_layers`` times for the pretraining phase (``forward(x, unrolled=True)``).

Presets (:class:`MDEQConfig`) reproduce the configurations of the paper: ``cifar_large`` (CIFAR-10,
``d = 61,440`` per sample) and ``imagenet_small`` (ImageNet, ``d = 188,160``), plus ``tiny`` for
tests and CPU experiments.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shine.backward.base import AdjointResult, BackwardStrategy
from shine.deq.layer import DEQLayer
from shine.models.mdeq_blocks import (
    ClassificationHead,
    Downsample,
    ResidualBlock,
    Upsample,
    VariationalDropout2d,
    conv,
    factory,
    head_norm,
)
from shine.solvers.base import RootSolver, SolverResult

logger = logging.getLogger(__name__)

Device = torch.device | str | None


def _invalid(key: str, message: str) -> ValueError:
    return ValueError(f"MDEQConfig.{key}: {message}")


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture of a Multiscale DEQ classifier (solver settings live with the solver).

    Attributes:
        num_branches: number of resolutions (``NUM_BRANCHES``).
        num_channels: width of each branch (``NUM_CHANNELS``).
        num_blocks: residual blocks per branch (``NUM_BLOCKS``; the first one gets the injection).
        expansion_factor: width factor inside the residual blocks (``EXPANSION_FACTOR``).
        num_groups: groups of the GroupNorms of ``f`` (``NUM_GROUPS``; the post-fusion GroupNorm
            uses half as many).
        dropout: variational dropout probability inside the residual blocks (``DROPOUT``).
        wnorm: weight-normalise the block convolutions and the post-fusion 1x1 conv (``WNORM``).
        head_channels: bottleneck widths of the head per branch (``HEAD_CHANNELS``).
        final_channels: width of the head before pooling (``FINAL_CHANSIZE``).
        downsample_times: stride-2 convolutions of the stem, 0 to 2 (``DOWNSAMPLE_TIMES``).
        num_classes: number of classes (``NUM_CLASSES``).
        image_size: side of the (square) input images.
        in_channels: channels of the input images.
        num_layers: weight-tied applications of ``f`` in unrolled pretraining (``NUM_LAYERS``).
        group_norm: GroupNorm instead of BatchNorm in the stem and head (``GROUP_NORM``; the
            paper's runs use BatchNorm).
        bn_momentum: momentum of the BatchNorms (0.1 in MDEQ classification).
        init_std: standard deviation of the ``N(0, init_std²)`` initialisation of the plain
            convolutions (weights and biases; weight-normalised ones keep the default
            initialisation, see :class:`~shine.models.mdeq_blocks.WNConv2d`).

    Every invalid value raises a ``ValueError`` naming its key; :meth:`from_dict` also rejects
    unknown keys by name.
    """

    num_branches: int
    num_channels: tuple[int, ...]
    num_blocks: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    expansion_factor: int = 5
    num_groups: int = 8
    dropout: float = 0.0
    wnorm: bool = True
    downsample_times: int = 0
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    num_layers: int = 10
    group_norm: bool = False
    bn_momentum: float = 0.1
    init_std: float = 0.01

    def __post_init__(self) -> None:
        for key in ("num_channels", "num_blocks", "head_channels"):
            value = getattr(self, key)
            if isinstance(value, int) or not isinstance(value, Sequence):
                raise _invalid(key, f"expected a sequence of ints, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def positive_int(key: str) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(key, f"expected a positive int, got {value!r}")

        for key in (
            "num_branches",
            "final_channels",
            "expansion_factor",
            "num_groups",
            "num_classes",
            "image_size",
            "in_channels",
            "num_layers",
        ):
            positive_int(key)
        nb = self.num_branches
        for key in ("num_channels", "num_blocks", "head_channels"):
            value = getattr(self, key)
            if len(value) != nb:
                raise _invalid(
                    key, f"expected {nb} entries (one per branch, num_branches={nb}), got {value}"
                )
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise _invalid(key, f"expected positive ints, got {value}")
        if self.num_groups < 2:
            raise _invalid("num_groups", "must be at least 2 (the post-fusion norm uses half)")
        for c in self.num_channels:
            if c % self.num_groups or c % (self.num_groups // 2):
                raise _invalid(
                    "num_channels",
                    f"every width must be divisible by num_groups={self.num_groups}, got {c}",
                )
        if self.group_norm:
            for h in self.head_channels:
                if h % self.num_groups:
                    raise _invalid(
                        "head_channels",
                        f"with group_norm every entry must be divisible by num_groups="
                        f"{self.num_groups}, got {h}",
                    )
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise _invalid("dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        if self.downsample_times not in (0, 1, 2) or isinstance(self.downsample_times, bool):
            raise _invalid(
                "downsample_times", f"expected 0, 1 or 2, got {self.downsample_times!r}"
            )
        factor = 2 ** (self.downsample_times + nb - 1)
        if self.image_size % factor:
            raise _invalid(
                "image_size",
                f"must be divisible by 2**(downsample_times + num_branches - 1) = {factor}, "
                f"got {self.image_size}",
            )
        for key in ("wnorm", "group_norm"):
            if not isinstance(getattr(self, key), bool):
                raise _invalid(key, f"expected a bool, got {getattr(self, key)!r}")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise _invalid("bn_momentum", f"expected a value in [0, 1], got {self.bn_momentum}")
        if not self.init_std > 0.0:
            raise _invalid("init_std", f"expected a positive value, got {self.init_std}")

    # ----------------------------------------------------------------- presets
    @classmethod
    def cifar_large(cls, **overrides: Any) -> MDEQConfig:
        """MDEQ-LARGE for CIFAR-10 (``cls_mdeq_LARGE.yaml``, SHINE Fig. 3): ``d = 61,440``.

        Args:
            **overrides: fields to change (validated; unknown keys raise ``ValueError``).
        """
        base = cls(
            num_branches=4,
            num_channels=(32, 64, 128, 256),
            num_blocks=(1, 1, 1, 1),
            head_channels=(14, 28, 56, 112),
            final_channels=1680,
            expansion_factor=5,
            num_groups=8,
            dropout=0.3,
            wnorm=True,
            downsample_times=0,
            num_classes=10,
            image_size=32,
            in_channels=3,
            num_layers=10,
        )
        return base.replace(**overrides)

    @classmethod
    def imagenet_small(cls, **overrides: Any) -> MDEQConfig:
        """MDEQ-SMALL for ImageNet (``cls_mdeq_SMALL.yaml``, SHINE Fig. 3): ``d = 188,160``.

        Args:
            **overrides: fields to change (validated; unknown keys raise ``ValueError``).
        """
        base = cls(
            num_branches=4,
            num_channels=(32, 64, 128, 256),
            num_blocks=(1, 1, 1, 1),
            head_channels=(24, 48, 96, 192),
            final_channels=2048,
            expansion_factor=5,
            num_groups=8,
            dropout=0.0,
            wnorm=True,
            downsample_times=2,
            num_classes=1000,
            image_size=224,
            in_channels=3,
            num_layers=5,
        )
        return base.replace(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> MDEQConfig:
        """A two-branch MDEQ for tests and CPU runs (16x16 RGB inputs by default; ``d = 3,072``).

        Widths 8/16, expansion 5, 4 groups, head 4/8 → 32 channels, no dropout, 4 unrolled
        layers. Use e.g. ``tiny(image_size=8, in_channels=1)`` for 8x8 grey images.

        Args:
            **overrides: fields to change (validated; unknown keys raise ``ValueError``).
        """
        base = cls(
            num_branches=2,
            num_channels=(8, 16),
            num_blocks=(1, 1),
            head_channels=(4, 8),
            final_channels=32,
            expansion_factor=5,
            num_groups=4,
            dropout=0.0,
            wnorm=True,
            downsample_times=0,
            num_classes=10,
            image_size=16,
            in_channels=3,
            num_layers=4,
        )
        return base.replace(**overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MDEQConfig:
        """The preset ``name`` (``cifar_large``, ``imagenet_small``, ``tiny``) with overrides.

        Raises:
            ValueError: on an unknown preset name or an invalid override.
        """
        presets: dict[str, Callable[..., MDEQConfig]] = {
            "cifar_large": cls.cifar_large,
            "imagenet_small": cls.imagenet_small,
            "tiny": cls.tiny,
        }
        if name not in presets:
            raise ValueError(f"unknown MDEQ preset {name!r}; valid: {sorted(presets)}")
        return presets[name](**overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, preset: str | None = None) -> MDEQConfig:
        """Build a config from a mapping (e.g. a YAML section), optionally over a preset.

        Args:
            data: field values; lists are converted to tuples. A ``"preset"`` entry is accepted
                in place of the ``preset`` argument.
            preset: name of a preset whose values ``data`` overrides (all required fields must
                be in ``data`` otherwise).

        Raises:
            ValueError: naming any unknown key, or the first invalid value.
        """
        values = dict(data)
        name = values.pop("preset", None)
        if preset is not None and name is not None and name != preset:
            raise ValueError(f"conflicting MDEQ presets {preset!r} and {name!r}")
        name = preset if preset is not None else name
        if name is not None:
            return cls.preset(name, **values)
        cls._check_keys(values)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ValueError(f"MDEQConfig: missing required keys {missing}")
        return cls(**values)

    @classmethod
    def _check_keys(cls, values: Mapping[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MDEQConfig: unknown keys {unknown}; valid keys: {sorted(known)}")

    def replace(self, **overrides: Any) -> MDEQConfig:
        """A validated copy with some fields changed.

        Raises:
            ValueError: naming an unknown key or an invalid value.
        """
        self._check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (tuples as lists), e.g. for logging."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    # ------------------------------------------------------------- geometry
    @property
    def top_resolution(self) -> int:
        """Side of branch 0 (``image_size / 2**downsample_times``)."""
        return self.image_size // 2**self.downsample_times

    def state_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        """Shapes ``(B, C_i, H_i, W_i)`` of the multiscale state for a batch of ``batch``."""
        r = self.top_resolution
        return [(batch, c, r // 2**i, r // 2**i) for i, c in enumerate(self.num_channels)]

    @property
    def state_dim(self) -> int:
        """Entries per sample of the flattened state, ``d = Σ_i C_i H_i W_i``."""
        return sum(c * h * w for _, c, h, w in self.state_shapes(1))


class MDEQFunction(nn.Module):
    """The equilibrium function ``f(z, x)`` of MDEQ on a list of per-branch states.

    1. Branch ``i``: residual blocks (:class:`~shine.models.mdeq_blocks.ResidualBlock`); the
       first block of branch 0 adds the injection ``x``, the other branches get none.
    2. Fusion: branch ``i`` receives ``Σ_j fuse_ij(y_j)`` (identity for ``j = i``,
       :class:`~shine.models.mdeq_blocks.Downsample` for ``j < i``,
       :class:`~shine.models.mdeq_blocks.Upsample` for ``j > i``).
    3. Post-fusion: ``GN_{num_groups/2}(conv1x1(relu(·)))`` (weight-normalised conv when
       ``wnorm``).

    Args:
        config: the architecture.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Call ``f(z, x)`` with ``z`` a list of ``(B, C_i, H_i, W_i)`` tensors and ``x`` the injection of
    branch 0, shaped like ``z[0]``. In training mode with ``dropout > 0`` the variational dropout
    masks must first be drawn by :meth:`reset_dropout`; they then stay fixed (one mask per sample
    and channel) for every call until the next reset.
    """

    def __init__(
        self, config: MDEQConfig, *, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = config
        kw = factory(device, dtype)
        cfg = config
        self.branches = nn.ModuleList(
            nn.ModuleList(
                ResidualBlock(
                    c, cfg.expansion_factor, cfg.num_groups, cfg.dropout, cfg.wnorm, **kw
                )
                for _ in range(n)
            )
            for c, n in zip(cfg.num_channels, cfg.num_blocks, strict=True)
        )
        chans = cfg.num_channels
        fuse: list[nn.ModuleList] = []
        for i in range(cfg.num_branches):
            row: list[nn.Module] = []
            for j in range(cfg.num_branches):
                if j == i:
                    row.append(nn.Identity())
                elif j < i:
                    row.append(Downsample(chans[j], chans[i], i - j, cfg.num_groups, **kw))
                else:
                    row.append(Upsample(chans[j], chans[i], j - i, cfg.num_groups, **kw))
            fuse.append(nn.ModuleList(row))
        self.fuse = nn.ModuleList(fuse)
        self.post = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                conv(c, c, 1, wnorm=cfg.wnorm, **kw),
                nn.GroupNorm(cfg.num_groups // 2, c, **kw),
            )
            for c in chans
        )

    def dropout_modules(self) -> list[VariationalDropout2d]:
        """The variational dropout modules, branch by branch and block by block."""
        return [block.drop for branch in self.branches for block in branch]

    def reset_dropout(self, z: Sequence[Tensor], generator: torch.Generator | None = None) -> None:
        """Draw new dropout masks (one per sample and channel) for states shaped like ``z``.

        Call once per batch, before the forward solve; the masks then stay fixed for every call
        of ``f`` (solver iterations, the differentiable step, backward VJPs).

        Args:
            z: a state (list of ``(B, C_i, H_i, W_i)`` tensors) giving batch, dtype and device.
            generator: optional random generator.
        """
        for i, branch in enumerate(self.branches):
            for block in branch:
                block.drop.reset_mask(z[i], generator)

    def clear_dropout(self) -> None:
        """Forget the dropout masks."""
        for drop in self.dropout_modules():
            drop.clear_mask()

    def forward(self, z: Sequence[Tensor], x: Tensor) -> list[Tensor]:
        """Apply ``f`` to the state ``z`` with the branch-0 injection ``x``.

        Raises:
            ValueError: if ``z`` does not have one tensor per branch.
        """
        if len(z) != self.config.num_branches:
            raise ValueError(
                f"the MDEQ state has {self.config.num_branches} branches, got {len(z)} tensors"
            )
        y = []
        for i, (branch, zi) in enumerate(zip(self.branches, z, strict=True)):
            out = branch[0](zi, x if i == 0 else None)
            for block in branch[1:]:
                out = block(out)
            y.append(out)
        fused = []
        for i, (row, post) in enumerate(zip(self.fuse, self.post, strict=True)):
            total = y[i]
            for j, path in enumerate(row):
                if j != i:
                    total = total + path(y[j])
            fused.append(post(total))
        return fused


def init_weights(module: nn.Module, std: float) -> None:
    """MDEQ initialisation: plain convs (weights and biases) ``N(0, std²)``, norms ``(1, 0)``.

    Weight-normalised convolutions and linear layers keep their defaults (as in the official code,
    see :class:`~shine.models.mdeq_blocks.WNConv2d`).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, std)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MDEQClassifier(nn.Module):
    """Multiscale DEQ image classifier: stem → ``z* = f(z*, x)`` (DEQ or unrolled) → head.

    Args:
        config: the architecture (:class:`MDEQConfig`).
        solver: forward root solver of the DEQ in training mode, e.g.
            ``Broyden(max_iter=18, tol=..., memory=18)`` or ``AdjointBroyden(..., opa_every=5)``.
        backward: backward strategy, e.g. ``Shine()``, ``JacobianFree()``, ``IFT(max_iter=20)``,
            ``Refine(...)``, ``Fallback(...)``.
        eval_solver: solver in eval mode (default: ``solver``). The official code always
            evaluates with plain Broyden, even when training with adjoint Broyden.
        device: device of the parameters.
        dtype: dtype of the parameters.

    ``forward(x)`` returns logits. In training mode it first draws new variational dropout masks
    (one per sample and channel, fixed for the whole solve), unless ``reset_dropout=False``.
    With a solver that has OPA (``opa_every`` set), pass ``targets=`` so that the solver gets
    ``outer_grad = ∂CE(head(z), targets)/∂z`` (:meth:`outer_grad_fn`).

    Statistics of the last DEQ solve are in :attr:`last_forward`, of the last implicit backward
    in :attr:`last_backward` and :attr:`last_backward_time` (seconds).
    """

    def __init__(
        self,
        config: MDEQConfig,
        solver: RootSolver,
        backward: BackwardStrategy,
        *,
        eval_solver: RootSolver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        cfg = config
        kw = factory(device, dtype)
        c0 = cfg.num_channels[0]

        def norm(c: int) -> nn.Module:
            return head_norm(c, cfg.group_norm, cfg.num_groups, cfg.bn_momentum, **kw)

        self.stem = nn.Sequential(
            conv(cfg.in_channels, c0, 3, stride=2 if cfg.downsample_times >= 1 else 1, **kw),
            norm(c0),
            nn.ReLU(),
            conv(c0, c0, 3, stride=2 if cfg.downsample_times >= 2 else 1, **kw),
            norm(c0),
            nn.ReLU(),
        )
        self.stage0: nn.Module | None = None
        if cfg.downsample_times > 0 or cfg.num_branches > 2:
            self.stage0 = nn.Sequential(conv(c0, c0, 1, **kw), norm(c0), nn.ReLU())
        self.solver = solver
        self.eval_solver = solver if eval_solver is None else eval_solver
        # f is registered once, inside the DEQ layer (see the ``f`` property)
        self.deq = DEQLayer(MDEQFunction(cfg, **kw), solver, backward)
        self.head = ClassificationHead(
            cfg.num_channels,
            cfg.head_channels,
            cfg.final_channels,
            cfg.num_classes,
            cfg.group_norm,
            cfg.num_groups,
            cfg.bn_momentum,
            **kw,
        )
        init_weights(self, cfg.init_std)

    def extra_repr(self) -> str:
        """Show the eval solver when it differs from the training one."""
        if self.eval_solver is self.solver:
            return ""
        return f"eval_solver={self.eval_solver!r}"

    @property
    def f(self) -> MDEQFunction:
        """The equilibrium function (registered as ``deq.f``)."""
        return cast(MDEQFunction, self.deq.f)

    # ------------------------------------------------------------- geometry
    def state_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        """Shapes ``(B, C_i, H_i, W_i)`` of the multiscale state for a batch of ``batch``."""
        return self.config.state_shapes(batch)

    @property
    def state_dim(self) -> int:
        """Entries per sample of the flattened state (61,440 for CIFAR-LARGE)."""
        return self.config.state_dim

    def initial_state(
        self, batch: int, *, device: Device = None, dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """The zero initial state ``z0`` (MDEQ starts every solve at zero)."""
        return [torch.zeros(s, device=device, dtype=dtype) for s in self.state_shapes(batch)]

    # ------------------------------------------------------------ statistics
    @property
    def backward_strategy(self) -> BackwardStrategy:
        """The backward strategy of the DEQ layer (settable)."""
        return self.deq.backward

    @backward_strategy.setter
    def backward_strategy(self, strategy: BackwardStrategy) -> None:
        self.deq.backward = strategy

    @property
    def last_forward(self) -> SolverResult | None:
        """Result of the last forward solve (``None`` before the first DEQ forward)."""
        return self.deq.last_forward

    @property
    def last_backward(self) -> AdjointResult | None:
        """Result of the last implicit backward (``None`` before the first one)."""
        return self.deq.last_backward

    @property
    def last_backward_time(self) -> float | None:
        """Wall time of the last implicit backward correction, in seconds."""
        return self.deq.last_backward_time

    # --------------------------------------------------------------- pieces
    def inject(self, x: Tensor) -> Tensor:
        """Stem (and ``stage0``): images ``(B, in_channels, S, S)`` → branch-0 injection.

        Raises:
            ValueError: if the images do not have the configured channels and size.
        """
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MDEQ expects images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )
        u = self.stem(x)
        return u if self.stage0 is None else self.stage0(u)

    def outer_grad_fn(self, targets: Tensor) -> Callable[[Sequence[Tensor]], list[Tensor]]:
        """``z ↦ ∂CE(head(z), targets)/∂z``: the outer gradient that OPA solvers need.

        The head is evaluated functionally on detached parameters and on copies of its buffers,
        so the BatchNorm running statistics are not updated and no parameter gradient is
        accumulated (the official code used a parameter-frozen copy of the head).

        Args:
            targets: class indices ``(B,)``.
        """
        params = {k: p.detach() for k, p in self.head.named_parameters()}

        def grad_fn(z: Sequence[Tensor]) -> list[Tensor]:
            buffers = {k: b.clone() for k, b in self.head.named_buffers()}
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in z]
                logits = torch.func.functional_call(self.head, {**params, **buffers}, (leaves,))
                loss = F.cross_entropy(logits, targets)
                grads = torch.autograd.grad(loss, leaves)
            return list(grads)

        return grad_fn

    def _needs_outer_grad(self, solver: RootSolver) -> bool:
        return getattr(solver, "opa_every", None) is not None

    def features(
        self,
        x: Tensor,
        *,
        unrolled: bool = False,
        targets: Tensor | None = None,
        reset_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """The multiscale state fed to the head: ``f(z*, inject(x))`` or the unrolled state.

        Args:
            x: images ``(B, in_channels, S, S)``.
            unrolled: apply ``f`` ``num_layers`` times from zero with ordinary backprop
                (pretraining) instead of solving for the equilibrium.
            targets: class indices ``(B,)``; required when the active solver uses OPA.
            reset_dropout: draw new dropout masks first (training mode only).
            generator: random generator for the dropout masks.

        Raises:
            ValueError: if the active solver uses OPA and ``targets`` is missing.
        """
        u = self.inject(x)
        z0 = self.initial_state(u.shape[0], device=u.device, dtype=u.dtype)
        if self.training and reset_dropout:
            self.f.reset_dropout(z0, generator)
        if unrolled:
            z: list[Tensor] = z0
            for _ in range(self.config.num_layers):
                z = self.f(z, u)
            return z
        solver = self.solver if self.training else self.eval_solver
        self.deq.solver = solver
        outer_grad = None
        if self._needs_outer_grad(solver):
            if targets is None:
                raise ValueError(
                    "the DEQ solver uses OPA (opa_every is set): call model(x, targets=y) so "
                    "that it gets the outer gradient dCE/dz"
                )
            outer_grad = self.outer_grad_fn(targets)
        out = self.deq(u, z0=z0, outer_grad=outer_grad)
        return list(out)

    def forward(
        self,
        x: Tensor,
        *,
        unrolled: bool = False,
        targets: Tensor | None = None,
        reset_dropout: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Logits ``(B, num_classes)``; arguments as in :meth:`features`."""
        z = self.features(
            x,
            unrolled=unrolled,
            targets=targets,
            reset_dropout=reset_dropout,
            generator=generator,
        )
        return self.head(z)


__all__ = ["MDEQClassifier", "MDEQConfig", "MDEQFunction", "init_weights"]
