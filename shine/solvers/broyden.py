"""Limited-memory "good" Broyden method on the inverse Jacobian (batched root finding).

Solves ``g(z) = 0`` for a batch ``z: (B, D)`` of independent problems. Each sample keeps its own
estimate ``H_n ≈ J_g(z_n)^{-1} = h0·I + U Vᵀ`` (Broyden 1965, in Sherman–Morrison form):

    p_n     = -H_n g(z_n),        z_{n+1} = z_n + α_n p_n,
    s_n     = z_{n+1} - z_n,      y_n = g(z_{n+1}) - g(z_n),
    H_{n+1} = H_n + (s_n - H_n y_n) (s_nᵀ H_n) / (s_nᵀ H_n y_n),

so that the secant condition ``H_{n+1} y_n = s_n`` holds. The estimate at the returned iterate
is the quasi-Newton matrix SHINE shares with the backward pass (paper eq. 4, Algorithm 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shine.solvers._tracking import BestIterateTracker
from shine.solvers.base import ResidualFn, SolverResult, as_batch, batch_dot, batch_norm
from shine.solvers.low_rank import LowRankInverse, LowRankMemory, MemoryPolicy
from shine.validation import check_fields

logger = logging.getLogger(__name__)

InverseAt = Literal["lowest", "before_lowest", "last"]


def _safe_division(num: Tensor, den: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``num / den`` per sample and the mask of samples where it is finite and safe.

    ``num: (B, D)``, ``den: (B,)``, ``ok: (B,)`` samples allowed to update. Updates with a
    tiny or non-finite denominator are skipped (their rows are zero).
    """
    safe = ok & torch.isfinite(den) & (den.abs() > torch.finfo(den.dtype).tiny)
    den = torch.where(safe, den, torch.ones_like(den))
    out = num / den[:, None]
    safe = safe & torch.isfinite(batch_norm(out))  # one reduction instead of isfinite + all
    if bool(safe.all()):
        return out, safe
    return torch.where(safe[:, None], out, 0.0), safe


def select_estimate(memory: LowRankMemory, tracker: BestIterateTracker, inverse_at: str):
    """Build the inverse estimate handed over with the result (shared by the Broyden solvers).

    Args:
        memory: the solver's rank-one terms.
        tracker: per-sample bookkeeping (gives the index of the returned iterate).
        inverse_at: ``"lowest"``: ``H_k`` at the returned (lowest-residual) iterate ``z_k``;
            ``"before_lowest"``: ``H_{k-1}``, the matrix that produced ``z_k`` (what the authors'
            code shares); ``"last"``: the final matrix of the solve.
    """
    if inverse_at == "last":
        return memory.estimate()
    step = tracker.best_step
    if inverse_at == "before_lowest":
        step = step - 1
    elif inverse_at != "lowest":
        raise ValueError(
            f"inverse_at must be 'lowest', 'before_lowest' or 'last', got {inverse_at!r}"
        )
    return memory.estimate_at(step)


def check_residual(gz: Tensor, z: Tensor) -> Tensor:
    """Check that ``g`` preserved the state's shape; return ``gz``."""
    if gz.shape != z.shape:
        raise ValueError(
            f"the residual g(z) must have the shape of z {tuple(z.shape)}, got {tuple(gz.shape)}"
        )
    return gz


@dataclass(frozen=True)
class Broyden:
    """Limited-memory good Broyden root solver with a shareable inverse estimate.

    Args:
        max_iter: maximal number of iterations.
        tol: absolute tolerance on the per-sample residual norm ``‖g(z)‖₂`` (a float, or a
            ``(B,)`` tensor of per-sample tolerances).
        rel_tol: relative tolerance ``‖g(z)‖ <= rel_tol·‖g(z0)‖`` (0 disables it). A sample stops
            (its iterate and estimate are frozen) as soon as either tolerance is met.
        memory: maximal number of rank-one terms per sample.
        h0: initial matrix ``H0 = h0·I``; ``-1`` for DEQ residuals ``g = f(z) - z`` (first step is
            one fixed-point iteration), ``+1`` for gradients of convex objectives.
        line_search: backtrack the step per sample until ``‖g(z + αp)‖ <= (1 - c·α)‖g(z)‖``.
        ls_max: maximal number of halvings of the step.
        ls_c: sufficient-decrease constant of the line search.
        memory_policy: what happens once ``memory`` terms are stored, see
            :class:`~shine.solvers.low_rank.LowRankMemory`.
        inverse_at: which estimate the result carries, see :func:`select_estimate`.

    Call ``Broyden(...)(g, z0)`` with ``z0: (B, D)`` or ``(D,)`` and ``g`` mapping that shape to
    itself. Returns a :class:`~shine.solvers.base.SolverResult` whose ``value`` is the
    lowest-residual iterate of each sample and whose ``inverse`` is a :class:`LowRankInverse`.
    Samples whose residual becomes non-finite reject the step and restart from ``H0``.
    """

    max_iter: int = 30
    tol: float | Tensor = 1e-6
    rel_tol: float = 0.0
    memory: int = 30
    h0: float = -1.0
    line_search: bool = False
    ls_max: int = 8
    ls_c: float = 1e-4
    memory_policy: MemoryPolicy = "fifo"
    inverse_at: InverseAt = "lowest"

    def __post_init__(self) -> None:
        """Validate the fields (types, ranges).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field out of range (the field and its range are named).
        """
        check_fields(
            self, minimum={"max_iter": 0, "tol": 0.0, "rel_tol": 0.0, "memory": 1, "ls_max": 1}
        )

    def __call__(
        self, g: ResidualFn, z0: Tensor, init_inverse: LowRankInverse | None = None
    ) -> SolverResult:
        """Solve ``g(z) = 0`` from ``z0``; see the class docstring.

        Args:
            g: residual function, ``(B, D) -> (B, D)`` (or ``(D,) -> (D,)``).
            z0: initial iterate.
            init_inverse: optional initial estimate ``H_0`` (batched like ``z0``; its ``h0``
                replaces ``self.h0``). Its terms are kept and ``memory`` more can be added: this
                is how a backward solve is warm-started with the forward estimate.
        """
        with torch.no_grad():  # the solve never builds a graph, whatever g closes over
            return self._solve(g, z0, init_inverse)

    def _solve(
        self, g: ResidualFn, z0: Tensor, init_inverse: LowRankInverse | None
    ) -> SolverResult:
        z, unbatched = as_batch(z0.detach())
        gfun = (lambda x: g(x.squeeze(0)).unsqueeze(0)) if unbatched else g
        gz = check_residual(gfun(z), z)
        n_evals = 1
        tracker = BestIterateTracker(z, gz, tol=self.tol, rel_tol=self.rel_tol)
        if init_inverse is None:
            mem = LowRankMemory(
                z.shape[0], z.shape[1], self.memory, self.h0, self.memory_policy, z
            )
        else:
            mem = LowRankMemory.seeded(init_inverse, self.memory, self.memory_policy)
        h0 = mem.h0
        Hg = mem.estimate().matvec(gz)  # H_n g(z_n), kept up to date to save one product
        n_rejected = 0
        nstep = 0
        for n in range(self.max_iter):
            active = ~tracker.converged
            if not bool(active.any()):
                break
            # the step is p = -q: only the sign convention of the stored terms changes below
            q = Hg if bool(active.all()) else torch.where(active[:, None], Hg, 0.0)
            z_new, g_new, evals = self._step(gfun, z, gz, q)
            n_evals += evals
            nstep = n + 1
            g_norm = batch_norm(g_new)
            bad = active & ~torch.isfinite(g_norm)
            any_bad = bool(bad.any())
            if any_bad:
                # reject the step of diverging samples and restart their estimate from H0
                n_rejected += int(bad.sum())
                z_new = torch.where(bad[:, None], z, z_new)
                g_new = torch.where(bad[:, None], gz, g_new)
                mem.reset_samples(bad)
                Hg = torch.where(bad[:, None], h0 * gz, Hg)
            restarted = mem.make_room()
            if restarted:
                Hg = h0 * gz
            H = mem.estimate()
            Hg_new = H.matvec(g_new)
            general = self.line_search or any_bad or restarted
            if general:
                s = z_new - z
                v = H.rmatvec(s)  # Hᵀ s
                num = s - (Hg_new - Hg)  # s - H y
            else:
                # full step s = -q with q = H g(z_n) the cached product: s - H y = -H g(z_{n+1}).
                # The term u vᵀ is stored as (-u)(-v)ᵀ: v' = Hᵀ q, u' = H g(z_{n+1}) / -(v'ᵀ y),
                # which spares two negations of (B, D) tensors
                v = H.rmatvec(q)
                num = Hg_new
            v_g_new = batch_dot(v, g_new)
            vy = v_g_new - batch_dot(v, gz)  # vᵀ y: sᵀ H y, or its negative for v' = Hᵀ q
            den = vy if general else -vy
            u, ok = _safe_division(num, den, active & ~bad)
            if mem.frozen:
                Hg = Hg_new
            elif mem.push(u, v, step=n + 1, mask=ok):
                Hg = mem.estimate().matvec(g_new)  # an old term was dropped
            else:
                # H_{n+1} g(z_{n+1}) = H_n g(z_{n+1}) + u (vᵀ g(z_{n+1})), zero where not updated
                Hg = torch.addcmul(Hg_new, u, torch.where(ok, v_g_new, 0.0)[:, None])
            z, gz = z_new, g_new
            tracker.update(z, gz, step=n + 1, norm=None if any_bad else g_norm)
        inverse = select_estimate(mem, tracker, self.inverse_at)
        stats = tracker.stats(nstep=nstep, n_evals=n_evals, unbatched=unbatched)
        stats.extra["rejected_steps"] = float(n_rejected)
        value = tracker.best_z.squeeze(0) if unbatched else tracker.best_z
        logger.debug("Broyden: %d steps, max residual %.3e", nstep, float(stats.residual.max()))
        return SolverResult(value=value, stats=stats, inverse=inverse)

    def _step(self, g: ResidualFn, z: Tensor, gz: Tensor, q: Tensor) -> tuple[Tensor, Tensor, int]:
        """Take the step ``z - α q`` (``α = 1`` or per-sample backtracking); return z, g, evals."""
        z_new = z - q
        g_new = g(z_new)
        if not self.line_search:
            return z_new, g_new, 1
        evals = 1
        norm0 = batch_norm(gz)
        accepted = batch_norm(g_new) <= (1 - self.ls_c) * norm0  # the full step, α = 1
        alpha = torch.ones_like(norm0)
        for _ in range(self.ls_max):
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, 0.5 * alpha)
            z_try = z - alpha[:, None] * q
            g_try = g(z_try)
            evals += 1
            z_new = torch.where(accepted[:, None], z_new, z_try)
            g_new = torch.where(accepted[:, None], g_new, g_try)
            accepted = accepted | (batch_norm(g_try) <= (1 - self.ls_c * alpha) * norm0)
        return z_new, g_new, evals


__all__ = ["Broyden", "LowRankInverse", "select_estimate"]
