"""Shared pieces of the DEQ diagnostic tasks (timing, contractivity, inversion quality).

These tasks do not train: they build the MDEQ of a training experiment (same data, architecture
and solver), optionally load the weights of a finished training run, and measure something on
batches of its data. The helpers here keep the three tasks consistent:

* :func:`load_weights` reads ``<run>/checkpoints/last.pt`` (or any checkpoint file of the run
  contract) with ``torch.load(weights_only=True)`` and loads ``state["stepper"]["model"]``;
* :func:`build_classifier` builds the model on the right device and dtype;
* :func:`train_batches` yields a fixed, reproducible sequence of training batches (the same for
  every method of a task, cycling over epochs when more batches are asked than one epoch has);
* :class:`DEQTask` is the mixin of the three task dataclasses: it builds their model
  (:meth:`~DEQTask.build_model`), their training batches (:meth:`~DEQTask.training_batches`)
  and the per-batch random generator (:meth:`~DEQTask.batch_generator`) from the fields they
  share (``data``, ``model``, ``batch_size``, ``seed``, ``device``, ``dtype``, ``num_workers``);
* :func:`resume_index` and :func:`resumable` implement the tasks' resume contract on a
  :class:`~shine.harness.runtime.run_dir.RunDirectory`: a counter in the task checkpoint says how
  many items (batches or methods) are complete.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from shine.data.images import make_loader
from shine.harness.runtime.devices import resolve_dtype
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.runtime.seeding import derived_seed

logger = logging.getLogger(__name__)

#: the checkpoint of a run directory (``shine.harness.runtime.RunDirectory.CHECKPOINT``)
RUN_CHECKPOINT = "checkpoints/last.pt"

_T = TypeVar("_T")


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``<path>/checkpoints/last.pt``.

    Raises:
        FileNotFoundError: if neither exists (the message says which run produces it).
    """
    p = Path(path)
    if p.is_file():
        return p
    candidate = p / RUN_CHECKPOINT
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"no checkpoint at {p} (looked for the file and for {candidate}); train the model "
        "first (e.g. `python train.py +experiment=digits method=shine`) or pass "
        "task.checkpoint=null to use the randomly initialised model"
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the model weights of a training checkpoint into ``model``.

    Accepts a checkpoint of the run contract (``{"step", "state": {"stepper": {"model": ...}}}``,
    as written by :class:`shine.harness.training.Trainer`), a ``{"stepper": {"model": ...}}`` or
    ``{"model": ...}`` mapping, or a bare state dict. Loaded with ``weights_only=True``.

    Args:
        model: the module to load into.
        path: a checkpoint file or a run directory.

    Returns:
        ``{"checkpoint": str(file), "checkpoint_step": step or -1}``.

    Raises:
        FileNotFoundError: if there is no checkpoint.
        KeyError: if the file holds no model state.
    """
    file = resolve_checkpoint(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    payload = torch.load(file, map_location=device, weights_only=True)
    state: Any = payload
    step = -1
    if isinstance(state, dict) and "state" in state and isinstance(state["state"], dict):
        step = int(state.get("step", -1))
        state = state["state"]
    if isinstance(state, dict) and "stepper" in state:
        state = state["stepper"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KeyError(f"{file} holds no model state dict (expected state['stepper']['model'])")
    model.load_state_dict(state)
    logger.info("loaded model weights from %s (step %d)", file, step)
    return {"checkpoint": str(file), "checkpoint_step": step}


def build_classifier(
    model_config: Any,
    solver: Any,
    backward: Any,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    eval_solver: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """An :class:`~shine.models.MDEQClassifier` on ``device``, with trained weights if given.

    Args:
        model_config: the architecture (:class:`~shine.models.MDEQConfig`).
        solver: forward solver (training mode).
        backward: backward strategy.
        device: ``"cpu"`` or ``"cuda[:k]"``.
        dtype: parameter dtype name.
        seed: seeds the initialisation (when no checkpoint is given).
        checkpoint: checkpoint file or run directory (``None``: random initialisation).
        eval_solver: forward solver in eval mode (default ``solver``).

    Returns:
        ``(model, info)`` with ``info`` the checkpoint provenance (empty without one).

    Raises:
        ValueError: if CUDA is asked for but not available.
    """
    from shine.models import MDEQClassifier

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    torch.manual_seed(seed)
    model = MDEQClassifier(
        model_config,
        solver,
        backward,
        eval_solver=eval_solver,
        device=torch.device(device),
        dtype=resolve_dtype(dtype),
    )
    info: dict[str, Any] = {}
    if checkpoint is not None:
        info = load_weights(model, checkpoint)
    else:
        logger.warning("no checkpoint given: measuring the randomly initialised model")
    return model, info


def train_batches(
    dataset: Any,
    n_batches: int,
    batch_size: int,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``n_batches`` shuffled training batches of ``batch_size``, reproducible from ``seed``.

    Epoch ``e`` of the cycle is the loader of :func:`shine.data.images.make_loader` with
    ``(seed, e)``, so the sequence does not depend on the caller.

    Raises:
        ValueError: if the data set is smaller than one batch.
    """
    if len(dataset) < batch_size:
        raise ValueError(
            f"the data set ({len(dataset)} samples) is smaller than one batch ({batch_size})"
        )
    done, epoch = 0, 0
    while done < n_batches:
        loader = make_loader(
            dataset,
            batch_size,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            drop_last=True,
            num_workers=num_workers,
        )
        for x, y in loader:
            if done >= n_batches:
                return
            yield x.to(device, dtype), y.to(device)
            done += 1
        epoch += 1


def resume_index(run_dir: RunDirectory, key: str) -> int:
    """The counter ``key`` of the task checkpoint of ``run_dir`` (0 on a fresh run)."""
    state = run_dir.load_checkpoint()
    return int(state[key]) if state is not None else 0


def resumable(
    run_dir: RunDirectory,
    items: Iterable[_T],
    key: str = "next_batch",
    *,
    steps_per_item: int = 1,
) -> Iterator[tuple[int, _T]]:
    """``(index, item)`` for the items of ``items`` not yet done in ``run_dir``, checkpointed.

    Skips the first :func:`resume_index` items. Item ``index`` owns the metric steps up to
    ``(index + 1) * steps_per_item``; once the caller has logged its records and asks for the
    next item, the checkpoint ``{key: index + 1}`` is saved at that step, so a resumed run
    starts after it (and drops any record of a later step). A caller that stops before asking
    (an exception, a ``break``) leaves the current item undone.
    """
    first = resume_index(run_dir, key)
    for index, item in enumerate(itertools.islice(items, first, None), start=first):
        yield index, item
        run_dir.save_checkpoint({key: index + 1}, step=(index + 1) * steps_per_item)


def deq_inputs(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """The injection ``u = model.inject(x)`` (no graph) and the initial state ``z0`` of ``x``."""
    with torch.no_grad():
        u = model.inject(x)
    return u, model.initial_state(x.shape[0], device=x.device, dtype=x.dtype)


def progress_due(index: int, total: int) -> bool:
    """Whether to log progress after item ``index`` of ``total`` (every tenth, and the last)."""
    return (index + 1) % max(1, total // 10) == 0 or index + 1 == total


class DEQTask:
    """Mixin of the DEQ task dataclasses: the set-up built from the fields they share.

    The dataclass declares the fields (each task keeps its own order and defaults):
    ``data`` (image data, ``build() -> (train, test)``), ``model`` (the architecture),
    ``batch_size``, ``seed``, ``device``, ``dtype`` and ``num_workers``.
    """

    data: Any
    model: Any
    batch_size: int
    seed: int
    device: str
    dtype: str
    num_workers: int

    def build_model(
        self, solver: Any, backward: Any, checkpoint: Any, *, train: bool
    ) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`build_classifier` on the task's device / dtype / seed, in train or eval mode.

        Args:
            solver: forward solver (training mode; also the eval-mode solver).
            backward: backward strategy.
            checkpoint: checkpoint file or run directory (``None``: random initialisation).
            train: put the model in training mode (``False``: eval mode).

        Returns:
            ``(model, info)`` as :func:`build_classifier`.
        """
        model, info = build_classifier(
            self.model,
            solver,
            backward,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            checkpoint=checkpoint,
        )
        model.train(train)
        return model, info

    def training_batches(self, n_batches: int) -> Iterator[tuple[Tensor, Tensor]]:
        """:func:`train_batches` of the training split of ``data`` (built on this call)."""
        train_set, _ = self.data.build()
        return train_batches(
            train_set,
            n_batches,
            self.batch_size,
            seed=self.seed,
            device=self.device,
            dtype=resolve_dtype(self.dtype),
            num_workers=self.num_workers,
        )

    def batch_generator(self, index: int, device: str | torch.device) -> torch.Generator:
        """The random generator of batch ``index`` (dropout masks, random starts) on ``device``."""
        return torch.Generator(device=device).manual_seed(derived_seed(self.seed, index))


__all__ = [
    "DEQTask",
    "build_classifier",
    "deq_inputs",
    "load_weights",
    "progress_due",
    "resolve_checkpoint",
    "resumable",
    "resume_index",
    "train_batches",
]
