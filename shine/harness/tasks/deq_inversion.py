"""Quality of the inverse-Jacobian estimates in a DEQ, with and without OPA (paper Fig. E.3).

Protocol (the authors' ``mdeq_lib/tests/modules/adj_broyden_correl.py`` in zaccharieramzi/shine),
for each of ``n_batches`` shuffled training batches (the same batches and dropout masks for every
method):

1. forward solve from ``z = 0`` with the method's solver: Broyden for ``jacobian_free`` and
   ``shine_broyden`` (one solve shared by both), adjoint Broyden for ``shine_adjoint_broyden``,
   adjoint Broyden with OPA extra updates every 5 steps along the true ``∂CE/∂z`` for
   ``shine_adjoint_broyden_opa``. **Every method uses the same forward tolerance and iteration
   budget** (the authors' script overwrote the tolerance after the first method, so the others
   ran the full budget);
2. at the method's ``z*``: the direction ``d = ∂CE(head(f(z*)), y)/∂f(z*)`` (the gradient a
   training step feeds the implicit backward), the "exact" inverse ``a = J_g(z*)^{-T}(-d)`` by a
   long iterative solve (:class:`~shine.backward.IFT` with many iterations and a tight tolerance;
   its relative residual is recorded), and the method's approximation ``b`` (``JacobianFree``:
   ``d``; SHINE: ``Hᵀ(-d)`` with the solve's quasi-Newton estimate ``H``);
3. ``cos(a, b)`` and ``‖a‖ / ‖b‖`` over the whole batch (flattened, as the authors), and the
   per-sample means.

One record per (batch, method); the summary gives per method the median (and 10 %/90 %
quantiles) of the cosine and of the norm ratio over batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shine.backward import JacobianFree, Shine, cosine_and_ratio
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.tasks.deq_common import DEQTask, deq_inputs, progress_due, resumable
from shine.solvers import AdjointBroyden, Broyden

logger = logging.getLogger(__name__)

#: method -> (solver key, approximation); the order of the records and of the figure legend
METHODS: dict[str, tuple[str, str]] = {
    "jacobian_free": ("broyden", "jacobian_free"),
    "shine_broyden": ("broyden", "shine"),
    "shine_adjoint_broyden": ("adjoint_broyden", "shine"),
    "shine_adjoint_broyden_opa": ("adjoint_broyden_opa", "shine"),
}
STRATEGIES = {"jacobian_free": JacobianFree(), "shine": Shine()}
QUANTILES = {"median": 0.5, "q10": 0.1, "q90": 0.9}


def global_cosine_and_ratio(exact: Tensor, approx: Tensor) -> tuple[float, float]:
    """Cosine and ``‖exact‖ / ‖approx‖`` of two ``(B, D)`` batches flattened to one vector."""
    a, b = exact.reshape(-1).double(), approx.reshape(-1).double()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    tiny = torch.finfo(torch.float64).tiny
    return float(a @ b / (na * nb).clamp_min(tiny)), float(na / nb.clamp_min(tiny))


def summarize(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: ``{method}/{cos,norm_ratio}_{median,q10,q90}`` and ``{method}/n_batches``."""
    out: dict[str, Any] = {"methods": list(methods)}
    for method in methods:
        rows = [r for r in records if r.get("method") == method]
        out[f"{method}/n_batches"] = len(rows)
        for key in ("cos", "norm_ratio", "cos_sample_mean", "fwd_nstep"):
            values = np.array([float(r[key]) for r in rows if key in r], dtype=float)
            for suffix, q in QUANTILES.items():
                out[f"{method}/{key}_{suffix}"] = (
                    float(np.quantile(values, q)) if values.size else float("nan")
                )
    return out


@dataclass(frozen=True)
class DEQInversion(DEQTask):
    """Fig. E.3 on one (trained) MDEQ; see the module docstring.

    Args:
        data: the image data; batches come from the training split.
        model: the architecture (:class:`~shine.models.MDEQConfig`).
        solvers: ``{"broyden": Broyden, "adjoint_broyden": AdjointBroyden,
            "adjoint_broyden_opa": AdjointBroyden(opa_every=5)}``, all with the same
            ``max_iter``, ``tol`` and ``memory`` (the configs interpolate them from one place).
        exact: the reference inversion, e.g. ``IFT(max_iter=100, tol=1e-10)``.
        methods: the methods to compare (keys of :data:`METHODS`; default all four).
        checkpoint: run directory or checkpoint file of the trained model (the authors used a
            CIFAR adjoint-Broyden/OPA run after 50 epochs); ``None``: random initialisation.
        n_batches: batches (100 in the paper).
        batch_size: batch size (32 in the paper).
        train_mode: measure in training mode (dropout masks as in training; the head's
            BatchNorm uses batch statistics), as the authors; ``False``: eval mode.
        seed: seeds the batch order, the dropout masks and the initialisation.
        device: device.
        dtype: dtype.
        num_workers: data loading workers.
    """

    data: Any
    model: Any
    solvers: Mapping[str, Broyden | AdjointBroyden]
    exact: Any
    methods: Sequence[str] = tuple(METHODS)
    checkpoint: Any = None
    n_batches: int = 100
    batch_size: int = 32
    train_mode: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_workers: int = 0

    def __post_init__(self) -> None:
        """Validate the methods and their solvers.

        Raises:
            ValueError: on an unknown method or a missing solver.
        """
        object.__setattr__(self, "methods", tuple(str(m) for m in self.methods))
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
            if METHODS[method][0] not in self.solvers:
                raise ValueError(f"method {method!r} needs solvers.{METHODS[method][0]}")
        budgets = {(s.max_iter, repr(s.tol)) for s in self.solvers.values()}
        if len(budgets) > 1:  # the authors' eps bug: methods compared at different tolerances
            logger.warning("the forward solvers differ in max_iter / tol: %s", sorted(budgets))

    def measure(
        self, model: Any, x: Tensor, y: Tensor, index: int
    ) -> list[dict[str, Any]]:  # one batch
        """The records of one batch (one per method)."""
        gen = self.batch_generator(index, x.device)
        u, z0 = deq_inputs(model, x)
        if model.training:
            model.f.reset_dropout(z0, gen)
        outer_grad = model.outer_grad_fn(y)
        records = []
        solves: dict[str, Any] = {}
        for method in self.methods:
            solver_key, approx = METHODS[method]
            if solver_key not in solves:
                solver = self.solvers[solver_key]
                model.deq.solver = solver
                needs = isinstance(solver, AdjointBroyden) and solver.opa_every is not None
                z_star, packer = model.deq.solve(u, z0, outer_grad=outer_grad if needs else None)
                fwd = model.last_forward
                leaf = z_star.detach().requires_grad_(True)
                with torch.enable_grad():
                    fz = packer.flatten(model.f(packer.unflatten(leaf), u))
                d = packer.flatten(outer_grad(packer.unflatten(fz.detach())))

                def vjp(w: Tensor, fz: Tensor = fz, leaf: Tensor = leaf) -> Tensor:
                    return torch.autograd.grad(fz, leaf, w, retain_graph=True)[0] - w

                exact = self.exact(vjp, -d, fwd)
                solves[solver_key] = (fwd, vjp, d, exact)
            fwd, vjp, d, exact = solves[solver_key]
            b = STRATEGIES[approx](vjp, -d, fwd).value
            a = exact.value
            cos, ratio = global_cosine_and_ratio(a, b)
            cos_s, ratio_s = cosine_and_ratio(b, a)  # per sample; ratio_s = ‖b‖/‖a‖
            stats = fwd.stats
            record: dict[str, Any] = {
                "method": method,
                "batch": index,
                "cos": cos,
                "norm_ratio": ratio,
                "cos_sample_mean": float(cos_s.mean()),
                "norm_ratio_sample_median": float((1.0 / ratio_s).median()),
                "fwd_nstep": int(stats.nstep),
                "fwd_residual_max": float(stats.residual.max()),
                "exact_nstep": int(exact.stats.nstep),
                "exact_residual_max": float(exact.stats.residual.max())
                if exact.stats.residual is not None
                else float("nan"),
                "opa_updates": float(stats.extra.get("opa_updates", 0.0)),
                "grad_norm": float(torch.linalg.vector_norm(d)),
            }
            records.append(record)
        return records

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Measure every batch (resuming after the last completed one); return the summary."""
        solver = self.solvers[METHODS[self.methods[0]][0]]
        model, info = self.build_model(
            solver, JacobianFree(), self.checkpoint, train=self.train_mode
        )
        batches = self.training_batches(self.n_batches)
        logger.info(
            "inversion quality of %s on %d batches of %d",
            ", ".join(self.methods),
            self.n_batches,
            self.batch_size,
        )
        t0 = time.perf_counter()
        for index, (x, y) in resumable(run_dir, batches):
            for record in self.measure(model, x, y, index):
                run_dir.log_metrics(index + 1, record)
            if progress_due(index, self.n_batches):
                logger.info(
                    "batch %d/%d (%.1f s)", index + 1, self.n_batches, time.perf_counter() - t0
                )
        records = [r for r in run_dir.read_metrics() if "method" in r]
        out = summarize(records, self.methods)
        out.update(info)
        return out


__all__ = ["METHODS", "DEQInversion", "global_cosine_and_ratio", "summarize"]
