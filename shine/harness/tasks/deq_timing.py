"""Forward / backward time of a DEQ per backward method (paper Table E.2 and the x-axis of Fig. 3).

Protocol (the authors' ``mdeq_lib/debug/cls_grad_time.py`` in zaccharieramzi/shine, with its timing
bug fixed): the MDEQ of a training experiment (optionally with the trained weights of a run), in
training mode (DEQ path, training forward solver), on ``n_batches`` shuffled training batches of
``batch_size`` (32 in the paper; the same batches and dropout masks for every method):

* **forward** = ``model(x)``: stem, DEQ solve, the differentiable step ``f(z*)`` and the head;
* **backward** = ``loss.backward()`` of the cross-entropy: head backward, the implicit
  correction of the backward strategy and the backprop through ``f(z*)`` to the parameters;

both framed by ``torch.cuda.synchronize()`` on a GPU (the authors' timer did not synchronise, so
queued kernels of the forward leaked into the backward time). ``warmup`` untimed iterations come
first for every method. The implicit correction alone (``model.last_backward_time``, timed
inside the autograd hook, not synchronised on a GPU) is recorded too. Each method is reported by
the median over batches.

One metrics record per (method, batch): ``method``, ``batch``, ``forward_ms``, ``backward_ms``,
``implicit_ms``, forward solver steps and residual, backward iterations / VJPs and fallback
fraction. Summary: ``{method}/median_forward_ms``, ``{method}/median_backward_ms``, ... and
``methods``. The epoch times of Table E.2 come from the training runs (``scripts/collect.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.tasks.deq_common import DEQTask, resumable
from shine.harness.tasks.step_timing import timed_training_step

logger = logging.getLogger(__name__)

#: statistics of the summary per method: key suffix -> record key
SUMMARY_KEYS = {
    "median_forward_ms": "forward_ms",
    "median_backward_ms": "backward_ms",
    "median_implicit_ms": "implicit_ms",
    "median_fwd_nstep": "fwd_nstep",
}


def summarize(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Medians per method of the timing records (NaN for a method without records).

    Returns:
        ``{method}/median_{forward,backward,implicit}_ms``, ``{method}/median_fwd_nstep``,
        ``{method}/q10_backward_ms``, ``{method}/q90_backward_ms``, ``{method}/n_batches``,
        ``{method}/fallback_frac_mean`` and ``methods`` (the order of the run).
    """
    out: dict[str, Any] = {"methods": list(methods)}
    for method in methods:
        rows = [r for r in records if r.get("method") == method]
        for suffix, key in SUMMARY_KEYS.items():
            values = [float(r[key]) for r in rows if r.get(key) is not None]
            out[f"{method}/{suffix}"] = float(np.median(values)) if values else float("nan")
        bwd = [float(r["backward_ms"]) for r in rows]
        for name, q in (("q10", 0.1), ("q90", 0.9)):
            out[f"{method}/{name}_backward_ms"] = float(np.quantile(bwd, q)) if bwd else np.nan
        out[f"{method}/n_batches"] = len(rows)
        fb = [float(r["fallback_frac"]) for r in rows if "fallback_frac" in r]
        out[f"{method}/fallback_frac_mean"] = float(np.mean(fb)) if fb else 0.0
    return out


@dataclass(frozen=True)
class DEQTiming(DEQTask):
    """Time the forward and backward passes of an MDEQ per backward method.

    Args:
        data: the image data (``build() -> (train, test)``), as in the training experiment.
        model: the architecture (:class:`~shine.models.MDEQConfig`).
        solver: the forward solver of training (e.g. Broyden with ``f_thres`` iterations).
        backwards: ``{method name: backward strategy}``, timed in this order (e.g. ``original``:
            ``IFT(max_iter=b_thres)``, ``jacobian_free``, ``shine``, ``shine_refine``, ...).
        checkpoint: trained weights: a run directory or checkpoint file used for every method,
            a mapping ``{method: path}`` (methods not in it use the random initialisation), or
            ``None`` (random initialisation, with a warning).
        n_batches: timed batches per method (100 in the paper; the authors' CIFAR job used 300).
        batch_size: batch size (32 in the paper).
        warmup: untimed iterations on the first batch before each method.
        seed: seeds the initialisation, the batch order and the dropout masks.
        device: ``"cuda"`` for the paper's measurement; ``"cpu"`` works (slowly).
        dtype: parameter and input dtype.
        num_workers: data loading workers.
        train_mode: time in training mode (the authors' protocol); ``False`` uses eval mode.
    """

    data: Any
    model: Any
    solver: Any
    backwards: Mapping[str, Any]
    checkpoint: Any = None
    n_batches: int = 100
    batch_size: int = 32
    warmup: int = 3
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_workers: int = 0
    train_mode: bool = True

    def __post_init__(self) -> None:
        """Validate the sizes and the method list.

        Raises:
            ValueError: on an empty method list or non-positive sizes.
        """
        if not self.backwards:
            raise ValueError("DEQTiming needs at least one backward method in `backwards`")
        if self.n_batches < 1 or self.batch_size < 1 or self.warmup < 0:
            raise ValueError("n_batches and batch_size must be >= 1 and warmup >= 0")

    @property
    def methods(self) -> list[str]:
        """The method names, in timing order."""
        return [str(m) for m in self.backwards]

    def checkpoint_for(self, method: str) -> Any:
        """The checkpoint of ``method`` (``None``: random initialisation)."""
        if isinstance(self.checkpoint, Mapping):
            return self.checkpoint.get(method)
        return self.checkpoint

    def time_method(self, method: str, batches: Sequence[tuple[Any, Any]]) -> list[dict]:
        """Time one method on ``batches``; return one record per batch (not yet logged)."""
        model, info = self.build_model(
            self.solver, self.backwards[method], self.checkpoint_for(method), train=self.train_mode
        )
        device = torch.device(self.device)

        def one(x: torch.Tensor, y: torch.Tensor, index: int) -> dict[str, Any]:
            gen = self.batch_generator(index, device)
            times = timed_training_step(model, x, y, gen, device)
            record: dict[str, Any] = {
                "method": method,
                "batch": index,
                "forward_ms": 1e3 * times.forward_s,
                "backward_ms": 1e3 * times.backward_s[0],
                "loss": float(times.loss),
            }
            fwd = model.last_forward
            if fwd is not None:
                record["fwd_nstep"] = int(fwd.stats.nstep)
                record["fwd_residual_max"] = float(fwd.stats.residual.max())
            bwd = model.last_backward
            if bwd is not None:
                record["implicit_ms"] = 1e3 * times.implicit_s[0]
                record.update(bwd.stats.summary("bwd_"))
                if bwd.stats.fallback_mask is not None:
                    record["fallback_frac"] = float(bwd.stats.fallback_mask.double().mean())
            return record

        x0, y0 = batches[0]
        for _ in range(self.warmup):
            one(x0, y0, 0)
        records = [one(x, y, i) for i, (x, y) in enumerate(batches)]
        for r in records:
            r.update(info)
        return records

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Time every method (resuming after the last completed one); return the summary."""
        batches = list(self.training_batches(self.n_batches))
        where = torch.cuda.get_device_name(self.device) if "cuda" in self.device else "cpu"
        logger.info(
            "timing %d methods x %d batches of %d on %s",
            len(self.methods),
            len(batches),
            self.batch_size,
            where,
        )
        done = resumable(run_dir, self.methods, "next_method", steps_per_item=self.n_batches)
        for k, method in done:
            records = self.time_method(method, batches)
            for i, record in enumerate(records):
                run_dir.log_metrics(k * self.n_batches + i + 1, record)
            med = summarize(records, [method])
            logger.info(
                "%-24s forward %8.2f ms, backward %8.2f ms (median of %d)",
                method,
                med[f"{method}/median_forward_ms"],
                med[f"{method}/median_backward_ms"],
                len(records),
            )
        records = [r for r in run_dir.read_metrics() if "method" in r]
        out = summarize(records, self.methods)
        out["device_name"] = where
        out["batch_size"] = self.batch_size
        return out


__all__ = ["DEQTiming", "summarize"]
