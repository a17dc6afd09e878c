"""Low-rank inverse Jacobian estimates ``H = h0·I + U Vᵀ`` stored per sample.

Broyden-type methods (good Broyden, adjoint Broyden) keep their inverse Jacobian estimate as the
initial matrix ``H0 = h0·I`` plus a sum of rank-one terms ``u_j v_jᵀ``. For a batch of ``B``
independent problems of dimension ``D`` with at most ``M`` terms the factors are stored as
``U, V: (B, M, D)``; products with ``H`` or ``Hᵀ`` cost two batched contractions
(``O(B·M·D)``), never a ``D x D`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shine.solvers.base import as_batch

MemoryPolicy = Literal["fifo", "restart", "freeze"]


@dataclass(frozen=True)
class LowRankInverse:
    """The operator ``H = h0·I + Σ_j w_j u_j v_jᵀ``, one per sample.

    Attributes:
        h0: scale of the initial matrix ``H0 = h0·I`` (``-1`` for DEQ residuals ``f(z) - z``).
        U: left factors, ``(B, M, D)``.
        V: right factors, ``(B, M, D)``.
        weights: optional per-sample column weights ``(B, M)`` in ``{0, 1}`` selecting which terms
            belong to the estimate (e.g. only the updates made up to the returned iterate).
    """

    h0: float
    U: Tensor
    V: Tensor
    weights: Tensor | None = None

    def _apply(self, left: Tensor, right: Tensor, x: Tensor) -> Tensor:
        xb, unbatched = as_batch(x)
        if left.shape[1] == 0:
            out = self.h0 * xb
        else:
            # (B, 1, M): xᵀ right_j. Row-vector orientation: the column form bmm(right, x) is
            # an order of magnitude slower on CPU (MKL) for D in the tens of thousands
            coef = torch.bmm(xb.unsqueeze(1), right.transpose(1, 2))
            if self.weights is not None:
                coef = coef * self.weights.unsqueeze(1)
            out = torch.baddbmm(xb.unsqueeze(1), coef, left, beta=self.h0).squeeze(1)
        return out.squeeze(0) if unbatched else out

    def matvec(self, x: Tensor) -> Tensor:
        """Return ``H x = h0·x + U (Vᵀ x)`` for ``x: (B, D)`` (or ``(D,)`` when B = 1)."""
        return self._apply(self.U, self.V, x)

    def rmatvec(self, x: Tensor) -> Tensor:
        """Return ``Hᵀ x = h0·x + V (Uᵀ x)``, i.e. the row vector ``xᵀ H`` as a column."""
        return self._apply(self.V, self.U, x)

    def transpose(self) -> LowRankInverse:
        """Return ``Hᵀ`` (the factors swapped; storage shared)."""
        return LowRankInverse(self.h0, self.V, self.U, self.weights)

    @property
    def rank(self) -> int:
        """Largest number of rank-one terms of any sample in the batch."""
        if self.weights is not None:
            return int(self.weights.sum(dim=1).max().item()) if self.U.shape[1] else 0
        return int(self.U.shape[1])

    def dense(self) -> Tensor:
        """Materialise ``H`` as ``(B, D, D)`` (small problems and tests only)."""
        B, _, D = self.U.shape
        eye = torch.eye(D, dtype=self.U.dtype, device=self.U.device).expand(B, D, D)
        cols = [self.matvec(eye[:, :, j]) for j in range(D)]
        return torch.stack(cols, dim=-1)


class LowRankMemory:
    """Mutable storage of the rank-one terms of a Broyden-type method (solver internals).

    Keeps ``U, V: (B, M, D)`` buffers, the iterate index each column belongs to and the policy
    used once all ``M`` columns are taken:

    * ``"fifo"``: overwrite the oldest column (the limited-memory scheme of MDEQ; dropping a
      rank-one term of Broyden's recursion is an approximation, the estimate stays low rank),
    * ``"restart"``: discard every column and continue from ``H0``,
    * ``"freeze"``: stop updating (the last estimate is kept until the end of the solve).

    Args:
        batch: number of samples ``B``.
        dim: dimension ``D``.
        memory: maximal number of columns ``M`` (>= 1).
        h0: initial matrix scale.
        policy: what happens when the memory is full.
        like: tensor giving dtype and device.
    """

    def __init__(
        self, batch: int, dim: int, memory: int, h0: float, policy: MemoryPolicy, like: Tensor
    ) -> None:
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if policy not in ("fifo", "restart", "freeze"):
            raise ValueError(
                f"memory_policy must be 'fifo', 'restart' or 'freeze', got {policy!r}"
            )
        self.h0 = h0
        self.policy = policy
        # columns >= n_cols are never read: no need to zero the (possibly large) buffers
        self.U = like.new_empty(batch, memory, dim)
        self.V = like.new_empty(batch, memory, dim)
        # per sample, iterate index n such that the column is part of H_n (-1: empty column)
        self.col_step = torch.full((batch, memory), -1, dtype=torch.long, device=like.device)
        self.n_cols = 0
        self.next_slot = 0
        self.frozen = False

    @classmethod
    def seeded(cls, estimate: LowRankInverse, memory: int, policy: MemoryPolicy) -> LowRankMemory:
        """A memory whose initial estimate is ``estimate`` (its terms count as part of ``H_0``).

        Args:
            estimate: initial matrix (e.g. the forward pass's estimate, transposed).
            memory: number of *additional* terms that can be stored.
            policy: memory policy once full.
        """
        U = estimate.U if estimate.weights is None else estimate.U * estimate.weights[..., None]
        B, r, D = U.shape
        mem = cls(B, D, r + memory, estimate.h0, policy, U)
        if r:
            mem.U[:, :r] = U
            mem.V[:, :r] = estimate.V
            mem.col_step[:, :r] = 0
            mem.n_cols = r
            mem.next_slot = r % mem.capacity
        return mem

    @property
    def capacity(self) -> int:
        """Maximal number of columns ``M``."""
        return int(self.U.shape[1])

    def estimate(self) -> LowRankInverse:
        """The current estimate ``H`` (views of the used columns; no copy)."""
        n = self.n_cols
        return LowRankInverse(self.h0, self.U[:, :n], self.V[:, :n])

    @property
    def full(self) -> bool:
        """Whether every column is taken."""
        return self.n_cols == self.capacity

    def clear(self) -> None:
        """Drop every term (back to ``H0`` for all samples)."""
        self.col_step.fill_(-1)
        self.n_cols = 0
        self.next_slot = 0

    def make_room(self) -> bool:
        """Apply the memory policy before an update is computed.

        Returns:
            True when the estimate was reset to ``H0`` (``"restart"`` on a full memory), so that
            cached products with ``H`` must be recomputed. ``"freeze"`` marks the memory frozen
            (later :meth:`push` calls are ignored); ``"fifo"`` is handled by :meth:`push`.
        """
        if not self.full or self.frozen:
            return False
        if self.policy == "restart":
            self.clear()
            return True
        if self.policy == "freeze":
            self.frozen = True
        return False

    def push(self, u: Tensor, v: Tensor, step: int, mask: Tensor | None = None) -> bool:
        """Add the term ``u vᵀ`` (``u, v: (B, D)``) for the samples in ``mask``.

        Samples outside ``mask`` (converged ones, failed updates) keep the column that occupied
        the slot, so their estimate does not depend on how long the rest of the batch runs.

        Args:
            u: left factor.
            v: right factor.
            step: index ``n`` of the first estimate ``H_n`` the term belongs to.
            mask: ``(B,)`` bool, samples that are updated (default: all).

        Returns:
            True if an older term was overwritten (``"fifo"`` on a full memory), in which case
            cached products with ``H`` must be recomputed.
        """
        if self.frozen:
            return False
        overwrote = self.full
        slot = self.next_slot
        if mask is None or bool(mask.all()):
            self.U[:, slot] = u
            self.V[:, slot] = v
            self.col_step[:, slot] = step
        elif overwrote:  # columns fill in order: a slot is in use iff the memory is full
            self.U[:, slot] = torch.where(mask[:, None], u, self.U[:, slot])
            self.V[:, slot] = torch.where(mask[:, None], v, self.V[:, slot])
            self.col_step[:, slot] = torch.where(mask, step, self.col_step[:, slot])
        else:  # a fresh column: the samples not updated get a zero term
            self.U[:, slot] = torch.where(mask[:, None], u, 0.0)
            self.V[:, slot] = torch.where(mask[:, None], v, 0.0)
            self.col_step[:, slot] = torch.where(mask, step, -1)
        self.next_slot = (slot + 1) % self.capacity
        self.n_cols = min(self.n_cols + 1, self.capacity)
        return overwrote

    def reset_samples(self, mask: Tensor) -> None:
        """Drop every term of the samples where ``mask`` (``(B,)`` bool) is set (back to H0)."""
        n = self.n_cols
        keep = (~mask).to(self.U.dtype)[:, None, None]
        self.U[:, :n].mul_(keep)
        self.V[:, :n].mul_(keep)
        self.col_step.masked_fill_(mask[:, None], -1)

    def estimate_at(self, step: Tensor) -> LowRankInverse:
        """The estimate made of the columns that belong to ``H_{step_b}`` for each sample.

        Args:
            step: ``(B,)`` iterate index per sample (e.g. the lowest-residual iterate).

        Returns:
            A :class:`LowRankInverse` with per-sample column weights. Columns overwritten by the
            FIFO policy after ``step`` cannot be recovered: the estimate then holds the columns
            still in memory whose index is ``<= step``.
        """
        n = self.n_cols
        cols = self.col_step[:, :n]
        weights = ((cols >= 0) & (cols <= step[:, None])).to(self.U.dtype)
        return LowRankInverse(self.h0, self.U[:, :n], self.V[:, :n], weights)
