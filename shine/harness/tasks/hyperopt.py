"""Bi-level hyper-parameter optimisation runs (paper §3.1, Figures 1, 2 left, E.1, E.2).

One run = one (data set, method, seed): the data set is split with the seed (train / outer /
held-out test), the inner problem (ℓ2-regularised logistic regression or nonlinear least
squares) is built on the training part, and the method (:class:`shine.bilevel.HOAG` with a
backward strategy, or a grid / random search) runs through the shared
:class:`shine.harness.training.Trainer`. Each record of ``metrics.jsonl`` holds the cumulative time
of the outer steps (held-out evaluation excluded), ``log_lambda``, the outer loss, the held-out
``test_loss``, inner iterations and time, backward time and iterations and the hypergradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from shine.bilevel.hoag import HOAG, BilevelProblem
from shine.bilevel.losses import L2Regularized, LinearModelLoss, LogisticLoss, SigmoidSquaredLoss
from shine.bilevel.search import GridSearch, RandomSearch
from shine.harness.runtime.devices import resolve_dtype
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.runtime.seeding import derived_seed
from shine.harness.training.trainer import Trainer

logger = logging.getLogger(__name__)

LossKind = Literal["logistic", "nls"]


class BilevelDataset(Protocol):
    """A data set that splits itself into train / outer / test parts for a seed."""

    name: str

    def split(self, seed: int, dtype: torch.dtype = ..., device: Any = ...) -> Any:
        """Return a split with ``train``, ``outer`` and ``test`` parts (``X``, ``y``)."""
        ...


def make_loss(kind: LossKind, X: Any, y: Any, nls_targets: str = "zero_one") -> LinearModelLoss:
    """The data-fitting loss of ``kind`` on ``(X, y)``.

    Raises:
        ValueError: on an unknown kind.
    """
    if kind == "logistic":
        return LogisticLoss(X, y)
    if kind == "nls":
        return SigmoidSquaredLoss(X, y, targets=nls_targets)  # type: ignore[arg-type]
    raise ValueError(f"unknown loss {kind!r}; valid: 'logistic', 'nls'")


@dataclass(frozen=True)
class HyperparameterOptimization:
    """One hyper-parameter optimisation run (see the module docstring).

    Args:
        dataset: the data (``split(seed, dtype, device)``).
        method: :class:`HOAG` (with its backward strategy) or a grid / random search.
        method_name: label of the method in logs and figures; ``None`` takes ``method.name``.
        loss: ``"logistic"`` (eq. 2) or ``"nls"`` (eq. 12).
        nls_targets: targets of the NLS loss, see :class:`SigmoidSquaredLoss`.
        n_groups: ``None`` for one λ; ``G`` for one λ per feature group (feature ``j`` in group
            ``j mod G``).
        seed: seeds the split and the inner initial point ``w0 ~ N(0, I)``.
        initial_weights: how ``w0`` is drawn: ``"numpy"``, the authors' draws
            (``np.random.seed(seed)`` then ``np.random.randn(p)`` in their benchmark, obtained
            here from a private ``RandomState(seed)``), or ``"torch"`` (a private generator
            seeded from ``(seed, 1)``).
        dtype: floating dtype of the computation.
        device: device of the computation.
        trainer: the shared trainer (checkpointing, progress).
    """

    dataset: Any
    method: Any
    method_name: str | None = None
    loss: LossKind = "logistic"
    nls_targets: str = "zero_one"
    n_groups: int | None = None
    seed: int = 0
    initial_weights: Literal["numpy", "torch"] = "numpy"
    dtype: str = "float64"
    device: str = "cpu"
    trainer: Trainer = field(default_factory=Trainer)

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on an unknown loss or method type.
        """
        if self.loss not in ("logistic", "nls"):
            raise ValueError(f"loss must be 'logistic' or 'nls', got {self.loss!r}")
        if self.initial_weights not in ("numpy", "torch"):
            raise ValueError(
                f"initial_weights must be 'numpy' or 'torch', got {self.initial_weights!r}"
            )
        if not isinstance(self.method, HOAG | GridSearch | RandomSearch):
            raise ValueError(
                "method must be shine.bilevel.HOAG, GridSearch or RandomSearch, got "
                f"{type(self.method).__name__}"
            )

    @property
    def label(self) -> str:
        """The method's label (``method_name`` or ``method.name``)."""
        return self.method_name or str(getattr(self.method, "name", type(self.method).__name__))

    def build(self) -> tuple[BilevelProblem, torch.Tensor]:
        """The problem of this seed and the inner initial point ``w0``."""
        dtype = resolve_dtype(self.dtype)
        split = self.dataset.split(self.seed, dtype=dtype, device=self.device)
        p = split.train.X.shape[1]
        groups = None
        if self.n_groups is not None:
            groups = torch.arange(p, device=self.device) % int(self.n_groups)
        inner = L2Regularized(
            make_loss(self.loss, split.train.X, split.train.y, self.nls_targets), groups
        )
        problem = BilevelProblem(
            inner=inner,
            outer=make_loss(self.loss, split.outer.X, split.outer.y, self.nls_targets),
            test=make_loss(self.loss, split.test.X, split.test.y, self.nls_targets),
        )
        w0 = initial_weights(p, self.seed, self.initial_weights).to(self.device, dtype)
        logger.info(
            "%s on %s: train %d, outer %d, test %d samples, %d features",
            self.label,
            getattr(self.dataset, "name", "data"),
            split.train.X.shape[0],
            split.outer.X.shape[0],
            split.test.X.shape[0],
            p,
        )
        return problem, w0

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Run (or resume) and return the summary metrics."""
        problem, w0 = self.build()
        if isinstance(self.method, HOAG):
            stepper: Any = self.method.stepper(problem, w0)
        else:
            stepper = self.method.stepper(problem, w0, seed=self.seed)

        def evaluate() -> dict[str, Any]:
            test = problem.test
            return {} if test is None else {"test_loss": float(test.loss(stepper.answer_w))}

        records = self.trainer.run(stepper, run_dir, evaluate, total=self.method.max_iter)
        if records is None:
            return None
        return summarize(records, method=self.label)


def initial_weights(p: int, seed: int, kind: Literal["numpy", "torch"] = "numpy") -> torch.Tensor:
    """The inner initial point ``w0 ~ N(0, I_p)`` of seed ``seed``, float64 ``(p,)``.

    ``"numpy"`` gives the authors' draws: their benchmark calls ``np.random.seed(seed)`` and
    ``LogisticRegressionCV.fit`` then ``np.random.randn(p)``, i.e. the first ``p`` normal draws of
    a ``RandomState(seed)``, which is what is used here (without touching NumPy's global
    generator). ``"torch"`` draws from a private torch generator seeded from ``(seed, 1)``.
    """
    if kind == "numpy":
        return torch.from_numpy(np.random.RandomState(seed).randn(p))
    gen = torch.Generator().manual_seed(derived_seed(seed, 1))
    return torch.randn(p, generator=gen, dtype=torch.float64)


def summarize(records: list[dict[str, Any]], method: str = "") -> dict[str, Any]:
    """Final metrics of a run from its records.

    Returns:
        final and best held-out loss, final outer loss and ``log_lambda``, total timed seconds
        split into inner and backward time, number of outer steps and of rejected steps.
    """
    steps = [r for r in records if int(r["step"]) > 0]
    last = records[-1]
    test = np.array([r.get("test_loss", np.nan) for r in records], float)
    out: dict[str, Any] = {
        "method": method,
        "n_steps": len(steps),
        "time_s": float(last["time"]),
        "inner_time_s": float(sum(r.get("inner_time", 0.0) for r in steps)),
        "backward_time_s": float(sum(r.get("backward_time", 0.0) for r in steps)),
        "final_test_loss": float(test[-1]),
        "best_test_loss": float(np.nanmin(test)) if np.isfinite(test).any() else float("nan"),
        "final_outer_loss": float(last.get("outer_loss", float("nan"))),
        "final_log_lambda": last.get("log_lambda"),
        "n_rejected": int(sum(bool(r.get("rejected", False)) for r in steps)),
        "inner_iters_total": int(sum(r.get("inner_iters", 0) for r in steps)),
    }
    return out
