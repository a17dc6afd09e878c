"""Supervised image classification with an implicit model, as a stepper of the shared trainer.

One step = one global batch: forward (the DEQ solve, or the unrolled weight-tied pass during the
first ``pretrain_steps`` steps), cross-entropy, backward (the implicit backward strategy),
optimizer and per-batch cosine schedule step. The data order of epoch ``e`` depends only on
``(seed, e)`` (:func:`shine.data.images.make_loader`), so a run resumed at step ``k`` replays the
same batches, and with the RNG state in the checkpoint (dropout masks, augmentation) it ends
with the same metrics as an uninterrupted run.

Logged per step: loss, batch accuracy, learning rate, whether the step was unrolled, forward
solver steps and residual, backward time (the implicit correction alone, and the whole
``loss.backward()``, synchronised on CUDA), backward iterations, the fallback fraction, and
throughput; per evaluation (every epoch): test loss and top-1.

Data parallelism (``world_size > 1``, the model wrapped in ``DistributedDataParallel`` by the
caller, a default process group initialised): every rank takes its ``batch_size / world_size``
share of each global batch, DDP averages the gradients, so a step is the single-process step on
the global batch (with BatchNorm, the batch statistics are those of the rank's share, as in the
authors' ``nn.DataParallel`` runs). The logged ``loss``, ``acc`` and the fractions
``fwd_converged_frac``/``bwd_fallback_frac`` are averaged over the ranks; the other solver
statistics and the timings are the rank's own. Dropout masks are drawn from a generator seeded
with ``(seed, step, rank)``, so ranks differ and a resumed run draws the same masks. The
evaluation is sharded: rank ``r`` evaluates the test batches ``r, r + world_size, ...`` (each
batch exactly as in one process) on the unwrapped model and the sums are all-reduced, so every
rank returns the single-process metrics (up to the order of the float summation).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shine.data.images import SeededItems, make_loader, seed_worker
from shine.harness.runtime.devices import synchronize
from shine.harness.runtime.distributed import all_reduce_mean, all_reduce_sum
from shine.harness.runtime.seeding import derived_seed

logger = logging.getLogger(__name__)

#: ``params -> optimizer`` (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``)
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

#: step metrics averaged over the ranks of a data-parallel run
RANK_MEAN_METRICS = ("loss", "acc", "fwd_converged_frac", "bwd_fallback_frac")
#: stream of the per-(step, rank) dropout generators, distinct from the data streams
_DROPOUT_STREAM = 3


class ClassificationStepper:
    """The training loop of a classifier, one global batch per :meth:`step`.

    Args:
        model: the classifier; ``model(x, unrolled=bool, targets=y)`` returns logits (see
            :class:`shine.models.MDEQClassifier`); a model without the ``unrolled`` keyword is
            called as ``model(x)``.
        optimizer: the optimizer of ``model``'s parameters.
        train_set: training dataset of ``(image, label)``.
        test_set: evaluation dataset.
        batch_size: global batch size (128 in the paper, whatever the number of processes).
        epochs: number of epochs.
        pretrain_steps: the first steps use the unrolled weight-tied model (MDEQ pretraining).
        lr_min: final learning rate of the per-batch cosine schedule over all steps.
        seed: seed of the data order and augmentations.
        device: device of the computation.
        dtype: dtype of the inputs (the model's parameters must match).
        eval_batch_size: batch size of the evaluation.
        eval_limit: evaluate on at most this many test batches (None: all).
        num_workers: data loading workers.
        rank: this process's rank (data sharding).
        world_size: number of processes (per-process batch = ``batch_size / world_size``); see
            the module docstring for what changes with more than one.
        max_steps: stop after this many steps (None: ``epochs`` full epochs).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_set: Any,
        test_set: Any,
        *,
        batch_size: int,
        epochs: int,
        pretrain_steps: int = 0,
        lr_min: float = 1e-6,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        eval_batch_size: int | None = None,
        eval_limit: int | None = None,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_steps: int | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by world_size {world_size}"
            )
        self.model = model
        self.optimizer = optimizer
        self.train_set, self.test_set = train_set, test_set
        self.batch_size, self.epochs = batch_size, epochs
        self.pretrain_steps = pretrain_steps
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_limit = eval_limit
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        forward = inspect.signature(self._core().forward).parameters
        self._takes_generator = "generator" in forward
        # a plain classifier (no unrolled mode, no OPA targets) is called as model(x)
        self._takes_mode = "unrolled" in forward
        self.steps_per_epoch = len(self._loader(0))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(train_set)} samples) is smaller than one batch "
                f"({batch_size}); lower batch_size"
            )
        full = self.steps_per_epoch * epochs
        self.total_steps = full if max_steps is None else min(full, max_steps)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(full, 1), eta_min=lr_min
        )
        self.step_index = 0
        self._epoch_iter: tuple[int, Iterator[Any]] | None = None

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, train: bool = True) -> Any:
        return make_loader(
            self.train_set if train else self.test_set,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            epoch=epoch,
            drop_last=train,
            num_workers=self.num_workers,
            rank=self.rank if train else 0,
            world_size=self.world_size if train else 1,
        )

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        epoch, within = divmod(self.step_index, self.steps_per_epoch)
        if self._epoch_iter is None or self._epoch_iter[0] != epoch:
            it = iter(self._loader(epoch))
            if within:  # resumed mid-epoch: replay the order, skipping the batches done
                it = itertools.islice(it, within, None)
            self._epoch_iter = (epoch, it)
        x, y = next(self._epoch_iter[1])
        return x.to(self.device, self.dtype), y.to(self.device)

    # ------------------------------------------------------------------ stepper protocol
    @property
    def finished(self) -> bool:
        """Whether all steps are done."""
        return self.step_index >= self.total_steps

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next step."""
        return self.step_index / self.steps_per_epoch

    def _forward(
        self,
        x: Tensor,
        y: Tensor,
        unrolled: bool,
        model: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        model = self.model if model is None else model
        if not self._takes_mode:
            return model(x)
        kwargs: dict[str, Any] = {"unrolled": unrolled, "targets": y}
        if generator is not None and self._takes_generator:
            kwargs["generator"] = generator
        return model(x, **kwargs)

    def _dropout_generator(self) -> torch.Generator | None:
        """Per-(step, rank) generator of the dropout masks in a data-parallel run (else None)."""
        if self.world_size == 1:
            return None
        seed = derived_seed(self.seed, _DROPOUT_STREAM, self.step_index, self.rank)
        return torch.Generator(self.device).manual_seed(seed)

    def _average_over_ranks(self, metrics: dict[str, Any]) -> None:
        """Replace the :data:`RANK_MEAN_METRICS` by their mean over the ranks (a collective)."""
        if self.world_size == 1:
            return
        # a fixed vector (NaN for absent keys) so that every rank reduces the same shape
        values = {k: float(metrics.get(k, math.nan)) for k in RANK_MEAN_METRICS}
        for key, value in all_reduce_mean(values).items():
            if key in metrics:
                metrics[key] = value

    def _core(self) -> Any:
        return getattr(self.model, "module", self.model)

    def step(self) -> dict[str, Any]:
        """One optimisation step on the next global batch; returns its metrics."""
        self.model.train()
        x, y = self._next_batch()
        unrolled = self.step_index < self.pretrain_steps
        core = self._core()
        synchronize(self.device)
        t0 = time.perf_counter()
        logits = self._forward(x, y, unrolled, generator=self._dropout_generator())
        loss = F.cross_entropy(logits, y)
        synchronize(self.device)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        synchronize(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        synchronize(self.device)
        t3 = time.perf_counter()
        self.step_index += 1
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "loss": float(loss.detach()),
            "acc": float((logits.detach().argmax(-1) == y).double().mean()),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "unrolled": unrolled,
            "forward_time": t1 - t0,
            "backward_total_time": t2 - t1,
            "samples_per_s": x.shape[0] * self.world_size / (t3 - t0),
        }
        fwd = getattr(core, "last_forward", None)
        if not unrolled and fwd is not None:
            metrics.update(
                fwd_nstep=int(fwd.stats.nstep),
                fwd_residual_max=float(fwd.stats.residual.max()),
                fwd_converged_frac=float(fwd.stats.converged.double().mean()),
            )
            bwd = getattr(core, "last_backward", None)
            if bwd is not None:
                metrics["backward_time"] = float(getattr(core, "last_backward_time", 0.0) or 0.0)
                metrics.update(bwd.stats.summary("bwd_"))
        if self.device.type == "cuda":
            metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._average_over_ranks(metrics)
        if not math.isfinite(metrics["loss"]):
            logger.warning("non-finite loss at step %d", self.step_index)
        return metrics

    def _eval_batches(self) -> Any:
        """This rank's test batches: all of them, or every ``world_size``-th from ``rank``."""
        if self.world_size == 1:
            batches = self._loader(0, train=False)
            if self.eval_limit is not None:
                batches = itertools.islice(batches, self.eval_limit)
            return batches
        n, size = len(self.test_set), self.eval_batch_size
        count = math.ceil(n / size)
        if self.eval_limit is not None:
            count = min(count, self.eval_limit)
        mine = [
            list(range(k * size, min(n, (k + 1) * size)))
            for k in range(self.rank, count, self.world_size)
        ]
        # the items of make_loader(test_set, ...) at epoch 0, without loading the other batches
        return torch.utils.data.DataLoader(
            SeededItems(self.test_set, self.seed, 0),
            batch_sampler=mine,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker if self.num_workers > 0 else None,
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Test loss and top-1 accuracy (eval mode), with the epoch reached.

        In a data-parallel run this is a collective (sharded, then summed over the ranks).
        """
        core = self._core()
        core.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in self._eval_batches():
            x, y = x.to(self.device, self.dtype), y.to(self.device)
            logits = self._forward(x, y, self.step_index <= self.pretrain_steps, model=core)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            total += int(y.numel())
        if self.world_size > 1:
            sums = all_reduce_sum({"loss": loss_sum, "correct": correct, "total": total})
            loss_sum, correct, total = sums["loss"], round(sums["correct"]), round(sums["total"])
        return {
            "test_loss": loss_sum / max(total, 1),
            "test_top1": 100.0 * correct / max(total, 1),
            "epoch": self.epoch,
        }

    def skip(self) -> None:
        """Move past the next batch without an update.

        The trainer's ``on_nonfinite="skip_step"`` calls it after restoring the state from before
        a non-finite step; the schedule advances as if the step had been taken.
        """
        self.step_index += 1
        self.scheduler.step()
        self._epoch_iter = None

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, schedule, step and RNG states (``weights_only`` loadable)."""
        state = {
            "model": self._core().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step_index": self.step_index,
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._core().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_index = int(state["step_index"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self._epoch_iter = None
