"""Image classification with an implicit model (paper §3.2: MDEQ on CIFAR-10 / ImageNet).

One run = one (data set, backward method, seed): the model (an MDEQ with the forward solver and
the backward strategy of the run) is trained by the shared :class:`shine.harness.training.Trainer`
with
:class:`shine.harness.training.classification.ClassificationStepper` — unrolled weight-tied
pretraining for ``pretrain_steps`` batches, then equilibrium training — and evaluated after every
epoch.

Data parallelism: launched as several processes (``torchrun --nproc_per_node=G train.py ...`` or
one ``srun`` task per GPU, see :mod:`shine.harness.runtime.distributed`), each process joins the
process group, builds the same model (same seed; ``DistributedDataParallel`` also broadcasts rank
0's
parameters) and trains on its share of every global batch of ``batch_size`` samples; the run is
then the single-process run on the same global batches, up to rounding, except that BatchNorm
statistics are per process (see :mod:`shine.harness.training.classification`). Every rank evaluates
a shard of the test set; only rank 0 writes the run directory (``train.py`` gives the others a
read-only one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shine.backward import BackwardStrategy
from shine.harness.runtime.devices import resolve_dtype
from shine.harness.runtime.distributed import DistInfo, detect_launch, init_distributed
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.training.classification import ClassificationStepper, OptimizerFactory
from shine.harness.training.trainer import Trainer
from shine.solvers.base import RootSolver

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
        distributed: data parallelism over the processes of a multi-process launch (see the
            module docstring); ``None``: on when the environment describes more than one
            process (``WORLD_SIZE`` of torchrun, an srun step of several tasks) or a process
            group of several ranks exists; ``False``: every process trains alone on the whole
            batch (debugging only).
    """

    data: Any
    model: Any
    solver: RootSolver
    backward: BackwardStrategy
    optimizer: OptimizerFactory
    eval_solver: RootSolver | None = None
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
    distributed: bool | None = None

    def __post_init__(self) -> None:
        """Validate the schedule and the forward solver's budget (before any data is loaded).

        Raises:
            ValueError: naming the setting and its valid range.
        """
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("pretrain_steps", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name, solver in (("solver", self.solver), ("eval_solver", self.eval_solver)):
            if solver is not None and solver.max_iter < 1:
                raise ValueError(
                    f"{name}.max_iter must be >= 1 to train a DEQ (0 iterations leave the "
                    f"state at its initial value), got {solver.max_iter}"
                )

    def distributed_info(self) -> DistInfo:
        """Join the process group if this run is data-parallel; this process's place in it."""
        use = self.distributed
        if use is None:
            use = detect_launch().world_size > 1 or (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1
            )
        return init_distributed() if use else DistInfo()

    def build(self) -> ClassificationStepper:
        """The model, optimizer and data of this run, as a fresh stepper.

        In a data-parallel run (see :meth:`distributed_info`) the model is wrapped in
        ``DistributedDataParallel`` and the stepper gets this process's rank.
        """
        from shine.models import MDEQClassifier

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
        info = self.distributed_info()
        parallel = info.world_size > 1
        device = self.device
        if parallel and device.startswith("cuda"):
            device = f"cuda:{torch.cuda.current_device()}"  # set from the local rank
        dtype = resolve_dtype(self.dtype)
        torch.manual_seed(self.seed)  # the same initialisation on every rank
        train_set, test_set = self.data.build()
        model = MDEQClassifier(
            self.model,
            self.solver,
            self.backward,
            eval_solver=self.eval_solver,
            device=torch.device(device),
            dtype=dtype,
        )
        optimizer = self.optimizer(model.parameters())
        net: torch.nn.Module = model
        if parallel:
            # broadcasts rank 0's parameters and buffers; averages the gradients in backward
            device_ids = [torch.device(device).index] if device.startswith("cuda") else None
            net = DistributedDataParallel(model, device_ids=device_ids)
        logger.info(
            "%s on %s: %d train / %d test images, state dim %d, %d parameters",
            self.method_name,
            getattr(self.data, "name", "data"),
            len(train_set),
            len(test_set),
            model.state_dim,
            sum(p.numel() for p in model.parameters()),
        )
        if parallel:
            logger.info(
                "data parallel over %d processes: %d samples per process and step",
                info.world_size,
                self.batch_size // info.world_size,
            )
        return ClassificationStepper(
            net,
            optimizer,
            train_set,
            test_set,
            batch_size=self.batch_size,
            epochs=self.epochs,
            pretrain_steps=self.pretrain_steps,
            lr_min=self.lr_min,
            seed=self.seed,
            device=device,
            dtype=dtype,
            eval_batch_size=self.eval_batch_size,
            eval_limit=self.eval_limit,
            num_workers=self.num_workers,
            rank=info.rank,
            world_size=info.world_size,
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

    def num(value: Any) -> float:
        """A logged number as a float (NaN for ``null``, the JSON of a non-finite value)."""
        return float("nan") if value is None else float(value)

    def median(key: str, rows: list[dict[str, Any]]) -> float:
        values = [num(r[key]) for r in rows if key in r]
        return float(np.median(values)) if values else float("nan")

    steps = [r for r in records if r.get("step", 0) > 0]
    return {
        "method": method,
        "n_steps": len(steps),
        "final_test_top1": num(evals[-1]["test_top1"]) if evals else float("nan"),
        "best_test_top1": max((num(r["test_top1"]) for r in evals), default=float("nan")),
        "final_test_loss": num(evals[-1]["test_loss"]) if evals else float("nan"),
        "train_time_s": float(records[-1]["time"]),
        "median_forward_ms": 1e3 * median("forward_time", deq),
        "median_backward_ms": 1e3 * median("backward_time", deq),
        "median_backward_total_ms": 1e3 * median("backward_total_time", deq),
        "median_fwd_nstep": median("fwd_nstep", deq),
        "fallback_frac_mean": float(np.mean([num(r["bwd_fallback_frac"]) for r in deq]))
        if any("bwd_fallback_frac" in r for r in deq)
        else 0.0,
        "final_train_loss": num(steps[-1]["loss"]) if steps else float("nan"),
        "n_skipped_nonfinite": sum("skipped_nonfinite" in r for r in steps),
    }
