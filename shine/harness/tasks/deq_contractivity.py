"""Contractivity of the fixed-point map of a trained MDEQ (paper §E.3, Table E.1).

Two measurements per test image, averaged over the test set:

* the authors' **"nonlinear spectral radius"** (``MDEQNet.power_iterations`` in
  ``mdeq_lib/models/mdeq_core.py`` of zaccharieramzi/shine), reproduced exactly: ``z_0 ~ N(0, I)``
  on every branch, then ``n_iter`` times ``z ← f(z, x)``, ``c = ‖z‖`` (over all branches),
  ``z ← z / c``; the value is the last ``c``, i.e. ``‖f(z_{n-1}, x)‖`` for a unit-norm
  ``z_{n-1}``. Because ``f`` contains the injection and ends in a GroupNorm, this is essentially
  the output norm of ``f`` (≈ √d up to the affine gains), not a Lipschitz constant: it says
  nothing about contractivity (:func:`nonlinear_power_value`).
* the **spectral radius of the Jacobian** ``J_f(z*)`` at the equilibrium ``z*`` of the image, by
  power iteration on Jacobian-vector products (``torch.func.jvp``): ``ρ ≈ (‖J^k v‖)^{1/k}``
  over the last half of the iterations (robust to a complex dominant pair), and the spectral
  norm ``‖J_f(z*)‖₂`` by power iteration on ``J_fᵀ J_f`` (JVP then VJP). ``ρ < 1`` is what the
  Neumann series of the implicit gradient (and the Jacobian-Free method) needs.

Images are processed in batches with per-sample norms; in eval mode every operation of ``f``
(GroupNorm) and of the stem (BatchNorm with running statistics) is per sample, so this equals
the authors' batch-1 loop (``batch_size=1`` runs it literally).

One record per batch of images (per-image values as lists and batch means); the summary holds
the means over images: ``nonlinear_spectral_radius``, ``spectral_radius``, ``spectral_norm``,
``contractive_frac`` (images with ``ρ < 1``) and the equilibrium residual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shine.data.images import make_loader
from shine.harness.runtime.devices import resolve_dtype
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.tasks.deq_common import DEQTask, deq_inputs, progress_due, resumable

logger = logging.getLogger(__name__)

#: ``(B, D) -> (B, D)``: a batch of independent maps (one per sample)
BatchMap = Callable[[Tensor], Tensor]


def _norm(z: Tensor) -> Tensor:
    return torch.linalg.vector_norm(z, dim=-1)


def _check_n_iter(n_iter: int) -> None:
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")


def _unit_start(v0: Tensor) -> tuple[Tensor, float]:
    """``v0`` scaled to unit norm per sample, and the ``tiny`` of its dtype (norm floor)."""
    tiny = torch.finfo(v0.dtype).tiny
    return v0 / _norm(v0).clamp_min(tiny)[:, None], tiny


def nonlinear_power_value(fn: BatchMap, z0: Tensor, n_iter: int) -> Tensor:
    """The authors' "nonlinear spectral radius" of ``fn`` from ``z0`` (per sample).

    Repeats ``n_iter`` times ``z ← fn(z)``, ``c = ‖z‖``, ``z ← z / c`` and returns the last ``c``
    (``(B,)``). For a linear ``fn`` this is the power method (→ the dominant eigenvalue's
    modulus); for a map whose output has a fixed norm (e.g. ending in a normalisation) it returns
    that norm whatever the Jacobian.

    Args:
        fn: the map, applied to a ``(B, D)`` batch.
        z0: starting points ``(B, D)`` (the authors draw ``N(0, I)``).
        n_iter: number of iterations (>= 1).

    Raises:
        ValueError: if ``n_iter < 1``.
    """
    _check_n_iter(n_iter)
    z = z0
    c = z0.new_zeros(z0.shape[0])
    with torch.no_grad():
        for _ in range(n_iter):
            z = fn(z)
            c = _norm(z)
            z = z / c.clamp_min(torch.finfo(z.dtype).tiny)[:, None]
    return c


def jvp_at(fn: BatchMap, z: Tensor) -> BatchMap:
    """``v ↦ J_fn(z) v`` by forward-mode AD (``torch.func.jvp``), without a graph."""
    z = z.detach()

    def jvp(v: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.func.jvp(fn, (z,), (v,))[1]

    return jvp


def vjp_at(fn: BatchMap, z: Tensor) -> BatchMap:
    """``w ↦ J_fn(z)ᵀ w`` by reverse-mode AD (the graph of ``fn(z)`` is built once)."""
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(leaf)

    def vjp(w: Tensor) -> Tensor:
        return torch.autograd.grad(out, leaf, w, retain_graph=True)[0]

    return vjp


def spectral_radius(
    jvp: BatchMap, v0: Tensor, n_iter: int, tail: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Power iteration on ``J`` (given by its products): the spectral radius per sample.

    ``v_{k+1} = J v_k / ‖J v_k‖``; the estimate is the geometric mean of the growth factors
    ``‖J v_k‖`` over the last ``tail`` fraction of the iterations, i.e. ``(‖J^m v‖/‖v‖)^{1/m}``
    after a burn-in, which converges to ``ρ(J)`` also when the dominant eigenvalues are a
    complex pair (where the plain ratio oscillates).

    Args:
        jvp: ``v ↦ J v`` on ``(B, D)`` batches (one matrix per sample).
        v0: starting vectors ``(B, D)``.
        n_iter: iterations (>= 1).
        tail: fraction of the iterations averaged.

    Returns:
        ``(rho, last)``: the estimate and the last growth factor ``‖J v_{n-1}‖``, ``(B,)`` each.

    Raises:
        ValueError: if ``n_iter < 1``.
    """
    _check_n_iter(n_iter)
    v, tiny = _unit_start(v0)
    logs = []
    growth = v0.new_zeros(v0.shape[0])
    for _ in range(n_iter):
        w = jvp(v)
        growth = _norm(w)
        logs.append(torch.log(growth.clamp_min(tiny)))
        v = w / growth.clamp_min(tiny)[:, None]
    m = max(1, int(round(tail * n_iter)))
    rho = torch.exp(torch.stack(logs[-m:]).mean(0))
    return rho, growth


def spectral_norm(jvp: BatchMap, vjp: BatchMap, v0: Tensor, n_iter: int) -> Tensor:
    """Largest singular value of ``J`` per sample, by power iteration on ``JᵀJ``.

    Args:
        jvp: ``v ↦ J v``.
        vjp: ``w ↦ Jᵀ w``.
        v0: starting vectors ``(B, D)``.
        n_iter: iterations (>= 1).

    Raises:
        ValueError: if ``n_iter < 1``.
    """
    _check_n_iter(n_iter)
    v, tiny = _unit_start(v0)
    sigma = v0.new_zeros(v0.shape[0])
    for _ in range(n_iter):
        jv = jvp(v)
        sigma = _norm(jv)
        w = vjp(jv).detach()
        v = w / _norm(w).clamp_min(tiny)[:, None]
    return sigma


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over images (and a few quantiles) of the per-image values of the records."""

    def values(key: str) -> np.ndarray:
        return np.array([v for r in records for v in r.get(key, [])], dtype=float)

    nonlinear, rho, sigma = values("nonlinear"), values("spectral_radius"), values("spectral_norm")
    out: dict[str, float] = {"n_images": float(len(nonlinear))}
    for name, arr in (
        ("nonlinear_spectral_radius", nonlinear),
        ("spectral_radius", rho),
        ("spectral_norm", sigma),
    ):
        if arr.size == 0:
            continue
        out[name] = float(arr.mean())
        out[f"{name}_std"] = float(arr.std())
        out[f"{name}_median"] = float(np.median(arr))
        out[f"{name}_max"] = float(arr.max())
    if rho.size:
        out["contractive_frac"] = float((rho < 1.0).mean())
    res = values("eq_residual_rel")
    if res.size:
        out["eq_residual_rel_median"] = float(np.median(res))
    return out


@dataclass(frozen=True)
class DEQContractivity(DEQTask):
    """Table E.1 for one trained model (see the module docstring).

    Args:
        data: the image data; the test split is measured.
        model: the architecture (:class:`~shine.models.MDEQConfig`).
        solver: forward solver giving the equilibrium ``z*`` (eval mode, as in evaluation).
        backward: backward strategy (unused; the model needs one).
        checkpoint: run directory or checkpoint file of the trained model (``None``: random
            initialisation, with a warning).
        method_name: label of the trained model's method (``original``, ``shine``, ...).
        n_images: test images measured (``None``: the whole test set, as the authors).
        batch_size: images per batch (per-sample computations; 1 is the authors' literal loop).
        n_iter_nonlinear: iterations of the authors' nonlinear power method (500 in their CIFAR
            job, 20 by default in their code).
        n_iter_power: power iterations for the Jacobian's spectral radius.
        n_iter_norm: power iterations for the Jacobian's spectral norm (0 skips it).
        seed: seeds ``z_0`` and the power-iteration starts.
        device: device.
        dtype: dtype.
        num_workers: data loading workers.
    """

    data: Any
    model: Any
    solver: Any
    backward: Any
    checkpoint: Any = None
    method_name: str = "model"
    n_images: int | None = None
    batch_size: int = 32
    n_iter_nonlinear: int = 500
    n_iter_power: int = 50
    n_iter_norm: int = 20
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_workers: int = 0

    def measure(self, model: Any, x: Tensor, index: int) -> dict[str, Any]:
        """The per-image values of one batch ``x`` (eval mode)."""
        gen = self.batch_generator(index, x.device)
        u, z0 = deq_inputs(model, x)
        model.deq.solver = model.eval_solver
        z_star, packer = model.deq.solve(u, z0)
        fwd = model.last_forward

        def fn(zf: Tensor) -> Tensor:
            return packer.flatten(model.f(packer.unflatten(zf), u))

        with torch.no_grad():
            fz = fn(z_star)
        eq_rel = _norm(fz - z_star) / _norm(fz).clamp_min(torch.finfo(fz.dtype).tiny)
        # the authors' value: from N(0, I) on every branch
        start = torch.randn(z_star.shape, generator=gen, device=x.device, dtype=x.dtype)
        nonlinear = nonlinear_power_value(fn, start, self.n_iter_nonlinear)
        jvp = jvp_at(fn, z_star)
        v0 = torch.randn(z_star.shape, generator=gen, device=x.device, dtype=x.dtype)
        rho, last = spectral_radius(jvp, v0, self.n_iter_power)
        record: dict[str, Any] = {
            "batch": index,
            "n_images": int(x.shape[0]),
            "nonlinear": nonlinear.tolist(),
            "spectral_radius": rho.tolist(),
            "spectral_radius_last": last.tolist(),
            "eq_residual_rel": eq_rel.tolist(),
            "fwd_nstep": int(fwd.stats.nstep) if fwd is not None else 0,
        }
        if self.n_iter_norm > 0:
            sigma = spectral_norm(jvp, vjp_at(fn, z_star), v0, self.n_iter_norm)
            record["spectral_norm"] = sigma.tolist()
        for key in ("nonlinear", "spectral_radius", "spectral_norm"):
            if key in record:
                record[f"{key}_mean"] = float(np.mean(record[key]))
        return record

    def run(self, run_dir: RunDirectory) -> dict[str, Any] | None:
        """Measure the test images (resuming after the last completed batch)."""
        model, info = self.build_model(self.solver, self.backward, self.checkpoint, train=False)
        _, test_set = self.data.build()
        n = len(test_set) if self.n_images is None else min(self.n_images, len(test_set))
        subset = torch.utils.data.Subset(test_set, range(n))
        loader = make_loader(
            subset,
            self.batch_size,
            shuffle=False,
            seed=self.seed,
            drop_last=False,
            num_workers=self.num_workers,
        )
        n_batches = len(loader)
        logger.info(
            "contractivity of %s: %d test images in %d batches, %d nonlinear / %d power its",
            self.method_name,
            n,
            n_batches,
            self.n_iter_nonlinear,
            self.n_iter_power,
        )
        dtype = resolve_dtype(self.dtype)
        t0 = time.perf_counter()
        for index, (x, _) in resumable(run_dir, loader):
            record = self.measure(model, x.to(self.device, dtype), index)
            run_dir.log_metrics(index + 1, {**record, "method": self.method_name})
            if progress_due(index, n_batches):
                logger.info(
                    "batch %d/%d (%.1f s): nonlinear %.4g, rho %.4g",
                    index + 1,
                    n_batches,
                    time.perf_counter() - t0,
                    record["nonlinear_mean"],
                    record["spectral_radius_mean"],
                )
        out: dict[str, Any] = dict(summarize(run_dir.read_metrics()))
        out.update(
            method=self.method_name,
            n_iter_nonlinear=self.n_iter_nonlinear,
            n_iter_power=self.n_iter_power,
            state_dim=int(model.state_dim),
            **info,
        )
        return out


__all__ = [
    "DEQContractivity",
    "jvp_at",
    "nonlinear_power_value",
    "spectral_norm",
    "spectral_radius",
    "summarize",
    "vjp_at",
]
