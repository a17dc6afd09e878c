"""Image classification with an implicit model (paper §3.2: MDEQ on CIFAR-10 / ImageNet).

One run = one (data set, backward method, seed): the model (an MDEQ with the forward solver and
the backward strategy of the run) is trained by the shared :class:`shine.training.Trainer` with
:class:`shine.training.classification.ClassificationStepper` — unrolled weight-tied pretraining
for ``pretrain_steps`` batches, then equilibrium training — and evaluated after every epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from shine.runtime.devices import resolve_dtype
from shine.runtime.run_dir import RunDirectory
from shine.training.classification import ClassificationStepper, OptimizerFactory
from shine.training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageClassification:
    """Train and evaluate an implicit image classifier (see the module docstring).

    Args:
        data: the data (``build() -> (train, test)``, ``num_classes``, ``image_shape``), e.g.
            :class:`shine.data.CIFAR10Data`, :class:`shine.data.DigitsData`.
        model: the architecture, :class:`shine.models.MDEQConfig`.
        solver: forward root solver in training (e.g. ``Broyden(max_iter=18, ...)``).
        backward: backward strategy (``IFT``, ``Shine``, ``JacobianFree``, ``Refine``, ...).
        optimizer: ``params -> optimizer`` (Adam 1e-3 for CIFAR, SGD 0.05 for ImageNet).
        eval_solver: forward solver in evaluation (default: ``solver``).
        epochs: epochs of training (pretraining included).
        batch_size: global batch size.
        pretrain_steps: unrolled pretraining steps (batches).
        lr_min: final learning rate of the per-batch cosine schedule.
        method_name: label of the method in logs, tables and figures.
        seed: seeds the model initialisation, data order and augmentations.
        device: device (``"cuda"`` on a GPU).
        dtype: parameter and input dtype.
        eval_batch_size: evaluation batch size (default ``batch_size``).
        eval_limit: evaluate on at most this many test batches (None: the whole test set).
        eval_every_epochs: evaluate after every this many epochs (and at the end).
        num_workers: data loading workers.
        max_steps: stop after this many steps (smoke runs).
        trainer: the shared trainer (checkpoint interval, progress).
    """

    data: Any
    model: Any
    solver: Any
    backward: Any
    optimizer: OptimizerFactory
    eval_solver: Any = None
    epochs: int = 1
    batch_size: int = 128
    pretrain_steps: int = 0
    lr_min: float = 1e-6
    method_name: str = "method"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    eval_batch_size: int | None = None
    eval_limit: int | None = None
    eval_every_epochs: int = 1
    num_workers: int = 0
    max_steps: int | None = None
    trainer: Trainer = field(default_factory=lambda: Trainer(checkpoint_every=50))

    def build(self) -> ClassificationStepper:
        """The model, optimizer and data of this run, as a fresh stepper."""
        from shine.models import MDEQClassifier

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
        dtype = resolve_dtype(self.dtype)
        torch.manual_seed(self.seed)
        train_set, test_set = self.data.build()
        model = MDEQClassifier(
            self.model,
            self.solver,
            self.backward,
            eval_solver=self.eval_solver,
            device=torch.device(self.device),
            dtype=dtype,
        )
        optimizer = self.optimizer(model.parameters())
        logger.info(
            "%s on %s: %d train / %d test images, state dim %d, %d parameters",
            self.method_name,
            getattr(self.data, "name", "data"),
            len(train_set),
            len(test_set),
            model.state_dim,
            sum(p.numel() for p in model.parameters()),
        )
        return ClassificationStepper(
            model,
            optimizer,
            train_set,
            test_set,
            batch_size=self.batch_size,
            epochs=self.epochs,
            pretrain_steps=self.pretrain_steps,
            lr_min=self.lr_min,
            seed=self.seed,
            device=self.device,
            dtype=dtype,
            eval_batch_size=self.eval_batch_size,
            eval_limit=self.eval_limit,
            num_workers=self.num_workers,
            max_steps=self.max_steps,
        )

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Train (or resume) and return the summary metrics."""
        stepper = self.build()
        every = max(1, stepper.steps_per_epoch * self.eval_every_epochs)
        trainer = replace(self.trainer, evaluate_every=every)
        records = trainer.run(stepper, run_dir, stepper.evaluate, total=stepper.total_steps)
        if records is None:
            return None
        return summarize(records, method=self.method_name)


def summarize(records: list[dict[str, Any]], method: str = "") -> dict[str, Any]:
    """Final metrics of a training run from its records."""
    evals = [r for r in records if "test_top1" in r]
    deq = [r for r in records if r.get("step", 0) > 0 and not r.get("unrolled", True)]

    def median(key: str, rows: list[dict[str, Any]]) -> float:
        values = [r[key] for r in rows if key in r]
        return float(np.median(values)) if values else float("nan")

    steps = [r for r in records if r.get("step", 0) > 0]
    return {
        "method": method,
        "n_steps": len(steps),
        "final_test_top1": float(evals[-1]["test_top1"]) if evals else float("nan"),
        "best_test_top1": max((float(r["test_top1"]) for r in evals), default=float("nan")),
        "final_test_loss": float(evals[-1]["test_loss"]) if evals else float("nan"),
        "train_time_s": float(records[-1]["time"]),
        "median_forward_ms": 1e3 * median("forward_time", deq),
        "median_backward_ms": 1e3 * median("backward_time", deq),
        "median_backward_total_ms": 1e3 * median("backward_total_time", deq),
        "median_fwd_nstep": median("fwd_nstep", deq),
        "fallback_frac_mean": float(np.mean([r["bwd_fallback_frac"] for r in deq]))
        if any("bwd_fallback_frac" in r for r in deq)
        else 0.0,
        "final_train_loss": float(steps[-1]["loss"]) if steps else float("nan"),
    }
