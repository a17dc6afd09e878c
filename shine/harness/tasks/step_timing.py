"""The Table E.2 timing protocol of one DEQ training step: forward, then ``loss.backward()``.

The protocol (the authors' ``mdeq_lib/debug/cls_grad_time.py`` with its timing bug fixed):

* **forward** = ``model(x, targets=y, generator=generator)``: stem, DEQ solve, the
  differentiable step ``f(z*)`` and the head;
* **backward** = ``loss.backward()`` of the cross-entropy: head backward, the implicit
  correction of the backward strategy and the backprop through ``f(z*)`` to the parameters;
* **implicit** = ``model.last_backward_time``: the correction alone, timed inside the autograd
  hook (not synchronised on a GPU);

each framed by :func:`~shine.harness.runtime.devices.synchronize` (``torch.cuda.synchronize()`` on
a GPU, a no-op on the CPU), so that queued kernels of the forward do not leak into the backward
time. The one implementation: :class:`~shine.harness.tasks.deq_timing.DEQTiming` (the ``*_timing``
experiments) and ``scripts/bench_deq.py`` time their steps with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shine.harness.runtime.devices import synchronize


@dataclass(frozen=True)
class StepTimes:
    """The times of one training step (seconds).

    Args:
        forward_s: the forward pass.
        backward_s: each backward pass (one per repeat), on the same graph.
        implicit_s: the implicit correction of each backward pass.
        loss: the cross-entropy (detached).
    """

    forward_s: float
    backward_s: list[float]
    implicit_s: list[float]
    loss: torch.Tensor


def timed_training_step(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator | None,
    device: torch.device,
    backward_repeats: int = 1,
    on_start: Callable[[], None] | None = None,
) -> StepTimes:
    """Time one training step of a DEQ classifier with the protocol of the module docstring.

    Args:
        model: an MDEQ-like classifier: ``model(x, targets=y, generator=g)`` returns the logits
            and ``model.last_backward_time`` is the time of its last implicit correction.
        x: the input batch.
        y: the labels.
        generator: the dropout generator of the batch (the same for every method).
        device: the device the model runs on (synchronised around every timed part).
        backward_repeats: backward passes on the same graph (kept by ``retain_graph`` until the
            last one, gradients reset in between); on a loaded machine the fastest is the one to
            record, a load burst only ever slows a run down.
        on_start: called after the gradients are reset and the device synchronised, just before
            the forward's clock starts (e.g. to reset CUDA's peak memory statistics).

    Returns:
        The forward time, the times of each backward pass and of its implicit correction, and
        the loss.

    Raises:
        ValueError: if ``backward_repeats < 1``.
    """
    if backward_repeats < 1:
        raise ValueError(f"backward_repeats must be >= 1, got {backward_repeats}")
    model.zero_grad(set_to_none=True)
    synchronize(device)
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    logits = model(x, targets=y, generator=generator)
    synchronize(device)
    t1 = time.perf_counter()
    loss = F.cross_entropy(logits, y)
    synchronize(device)
    backward, implicit = [], []
    for k in range(backward_repeats):
        if k:
            model.zero_grad(set_to_none=True)
            synchronize(device)
        t2 = time.perf_counter()
        loss.backward(retain_graph=k < backward_repeats - 1)
        synchronize(device)
        backward.append(time.perf_counter() - t2)
        implicit.append(float(model.last_backward_time or 0.0))
    return StepTimes(t1 - t0, backward, implicit, loss.detach())


__all__ = ["StepTimes", "timed_training_step"]
