"""Limited-memory BFGS with Outer-Problem Awareness (OPA), and its inverse-Hessian estimate.

The minimiser solves ``min_z r(z)`` for an unbatched ``z ∈ R^D``, i.e. the root problem
``∇r(z) = 0`` of SHINE (Ramzi et al., ICLR 2022). It follows Algorithm LBFGS of the paper's
Appendix A:

* the inverse-Hessian estimate ``H_n ≈ ∇²r(z_n)^{-1}`` is ``H0 = γ I`` updated by the BFGS
  inverse update with the stored pairs ``(s_i, y_i)`` in chronological order (limited memory,
  FIFO, at most ``memory`` pairs);
* the regular step is ``p_n = -H_n ∇r(z_n)``, ``z_{n+1} = z_n + α_n p_n`` with a strong-Wolfe
  line search (or ``α_n = 1``), then ``(s_n, y_n) = (z_{n+1} - z_n, ∇r(z_{n+1}) - ∇r(z_n))`` is
  pushed if ``s_nᵀy_n > 0`` (curvature check);
* with OPA (every ``M = opa_every`` iterations, *before* the regular step), an extra pair
  ``(e_n, ŷ_n)`` with ``e_n = t_n H_n v``, ``ŷ_n = ∇r(z_n + e_n) - ∇r(z_n)`` is pushed into the
  same memory, so that ``H_n`` becomes accurate in the prescribed direction ``v`` (Theorem 3:
  ``H_n v → ∇²r(z*)^{-1} v``).

The returned :class:`LBFGSInverse` is the SHINE estimate of ``∇²r(z*)^{-1}``.

Implementation: ``H`` is applied through the *compact representation* of Byrd, Nocedal &
Schnabel (1994, Thm. 2.2), which is algebraically identical to the two-loop recursion::

    H = γ I + [S Y] W [S Y]ᵀ,   W = [[R^{-T}(Δ + γ YᵀY)R^{-1}, -γ R^{-T}], [-γ R^{-1}, 0]],

with ``S, Y`` the ``D x k`` pair matrices, ``R`` the upper triangle of ``SᵀY`` and ``Δ`` its
diagonal. A product ``H v`` costs two passes over the ``2k x D`` pair matrix (the same flops as
the two-loop recursion) but only a handful of tensor operations whatever ``k``, and is batched
for ``(B, D)`` inputs. Inside the solver the small ``k x k`` matrices are updated incrementally
and ``[S Y]ᵀ∇r`` is cached across iterations, as in L-BFGS-B.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from shine.solvers.base import ObjectiveFn, SolverResult, SolverStats
from shine.solvers.line_search import TrialPoint, default_value_noise, strong_wolfe
from shine.validation import check_fields

logger = logging.getLogger(__name__)

#: Kinds of stored pairs.
PairKind = Literal["regular", "opa"]
_KINDS = ("regular", "opa")

#: OPA direction: a fixed tensor ``v`` of shape ``(D,)`` or a callable ``z -> v``.
OPADirection = Tensor | Callable[[Tensor], Tensor]


def check_minimizer_settings(memory: int, max_iter: int, max_ls: int, stop_test: str) -> None:
    """Validate the settings :class:`LBFGS` and :class:`~shine.solvers.ScipyLBFGSB` share.

    Raises:
        ValueError: naming the setting and its valid range.
    """
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if max_ls < 1:
        raise ValueError(f"max_ls must be >= 1, got {max_ls}")
    if stop_test not in ("iterates", "every_evaluation"):
        raise ValueError(f"stop_test must be 'iterates' or 'every_evaluation', got {stop_test!r}")


class _ConvergedAtTrial(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside the line search when a trial point passes the stopping test."""

    def __init__(self, point: TrialPoint) -> None:
        super().__init__()
        self.point = point


def _upper_sty(s: Tensor, y: Tensor) -> Tensor:
    """``R = triu(S Yᵀ)``: ``R_ij = s_iᵀy_j`` for ``i <= j``, zero below. Shape ``(k, k)``."""
    return torch.triu(s @ y.mT)


@dataclass
class LBFGSMemory:
    """The pairs of a limited-memory BFGS matrix, oldest first.

    Used to warm-start :class:`LBFGS` (e.g. across the outer iterations of HOAG) and to build an
    :class:`LBFGSInverse`. The BFGS inverse update is applied pair after pair, from ``H0 = γ I``.

    Attributes:
        s: steps ``s_i`` (regular steps or OPA directions ``e_i``), shape ``(k, D)``.
        y: gradient differences ``y_i`` (or ``ŷ_i``), shape ``(k, D)``.
        kinds: kind of each pair, ``"regular"`` or ``"opa"``; length ``k``. ``None`` means all
            regular.
        gamma: scale of the initial matrix ``H0 = γ I``.
        sty_upper: optional cache of ``triu(S Yᵀ)``, shape ``(k, k)``, consistent with ``s``,
            ``y`` (filled by :class:`LBFGS`; recomputed when ``None``).
        yty: optional cache of ``Y Yᵀ``, shape ``(k, k)``.
    """

    s: Tensor
    y: Tensor
    kinds: list[str] | None = None
    gamma: float = 1.0
    sty_upper: Tensor | None = field(default=None, repr=False, compare=False)
    yty: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check shapes and kinds.

        Raises:
            ValueError: on inconsistent shapes or unknown kinds.
        """
        if self.s.dim() != 2 or self.s.shape != self.y.shape:
            raise ValueError(
                f"s and y must both have shape (k, D), got {tuple(self.s.shape)} and "
                f"{tuple(self.y.shape)}"
            )
        if self.kinds is None:
            self.kinds = ["regular"] * self.s.shape[0]
        else:
            self.kinds = list(self.kinds)
        if len(self.kinds) != self.s.shape[0]:
            raise ValueError(f"{len(self.kinds)} kinds for {self.s.shape[0]} pairs")
        bad = set(self.kinds) - set(_KINDS)
        if bad:
            raise ValueError(f"unknown pair kinds {sorted(bad)}; expected {_KINDS}")
        k = self.s.shape[0]
        for name in ("sty_upper", "yty"):
            cache = getattr(self, name)
            if cache is not None and tuple(cache.shape) != (k, k):
                raise ValueError(f"{name} must have shape ({k}, {k}), got {tuple(cache.shape)}")

    @classmethod
    def empty(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> LBFGSMemory:
        """An empty memory for vectors of size ``dim``."""
        zeros = torch.zeros(0, dim, dtype=dtype, device=device)
        return cls(zeros, zeros.clone(), [], 1.0)

    def __len__(self) -> int:
        """Number of stored pairs ``k``."""
        return self.s.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the vectors."""
        return self.s.shape[1]

    @property
    def n_opa(self) -> int:
        """Number of stored OPA pairs."""
        return sum(kind == "opa" for kind in self.kinds or [])

    def curvatures(self) -> Tensor:
        """``s_iᵀy_i`` for every pair, shape ``(k,)``."""
        if self.sty_upper is not None:
            return self.sty_upper.diagonal().clone()
        return (self.s * self.y).sum(-1)

    def last_regular_step(self) -> Tensor | None:
        """The newest regular step ``s_i`` (shape ``(D,)``), or ``None`` if there is none."""
        for i in range(len(self) - 1, -1, -1):
            if self.kinds[i] == "regular":  # type: ignore[index]
                return self.s[i]
        return None

    def last_regular_pair(self) -> tuple[Tensor, Tensor] | None:
        """The newest regular pair ``(s_i, y_i)``, or ``None`` if there is none."""
        for i in range(len(self) - 1, -1, -1):
            if self.kinds[i] == "regular":  # type: ignore[index]
                return self.s[i], self.y[i]
        return None

    def to(self, *args: object, **kwargs: object) -> LBFGSMemory:
        """Move/cast every tensor with :meth:`torch.Tensor.to` (same arguments)."""

        def conv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(*args, **kwargs)  # type: ignore[arg-type]

        return LBFGSMemory(
            conv(self.s),  # type: ignore[arg-type]
            conv(self.y),  # type: ignore[arg-type]
            list(self.kinds or []),
            self.gamma,
            conv(self.sty_upper),
            conv(self.yty),
        )

    def inverse(self) -> LBFGSInverse:
        """The inverse-Hessian estimate defined by these pairs."""
        return LBFGSInverse(self.s, self.y, self.gamma, sty_upper=self.sty_upper, yty=self.yty)


class LBFGSInverse:
    """The L-BFGS inverse-Hessian estimate ``H ≈ (∇²r)^{-1}``, a symmetric ``D x D`` operator.

    ``H`` is the result of the BFGS inverse updates
    ``H ← (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ`` (``ρ = 1/(sᵀy)``) applied to ``H0 = γ I`` with
    the pairs in chronological order; in particular the newest pair satisfies the secant
    condition ``H y_k = s_k``. Products use the compact representation (see module docstring);
    :meth:`two_loop` is the classical recursion, kept as a reference.

    Implements the :class:`~shine.solvers.base.InverseEstimate` protocol. Vectors have shape
    ``(D,)`` or ``(B, D)`` (one vector per row).

    Args:
        s: steps, shape ``(k, D)``, oldest first.
        y: gradient differences, shape ``(k, D)``.
        gamma: scale of ``H0 = γ I``.
        sty_upper: optional precomputed ``triu(S Yᵀ)``, shape ``(k, k)``.
        yty: optional precomputed ``Y Yᵀ``, shape ``(k, k)``.

    Raises:
        ValueError: if shapes are inconsistent or some ``s_iᵀy_i`` is zero or not finite.
    """

    def __init__(
        self,
        s: Tensor,
        y: Tensor,
        gamma: float = 1.0,
        *,
        sty_upper: Tensor | None = None,
        yty: Tensor | None = None,
    ) -> None:
        if s.dim() != 2 or s.shape != y.shape:
            raise ValueError(
                f"s and y must both have shape (k, D), got {tuple(s.shape)}, {tuple(y.shape)}"
            )
        self._init(torch.stack((s, y), dim=1), gamma, sty_upper, yty)

    @classmethod
    def _from_pairs(
        cls, pairs: Tensor, gamma: float, sty_upper: Tensor | None, yty: Tensor | None
    ) -> LBFGSInverse:
        """Build from an interleaved contiguous ``(k, 2, D)`` tensor, without copying it."""
        obj = cls.__new__(cls)
        obj._init(pairs, gamma, sty_upper, yty)
        return obj

    def _init(
        self, pairs: Tensor, gamma: float, sty_upper: Tensor | None, yty: Tensor | None
    ) -> None:
        k, _, dim = pairs.shape
        self._k = k
        self._dim = dim
        self.gamma = float(gamma)
        self._pairs3 = pairs.contiguous()
        #: interleaved pair matrix: row 2i = s_i, row 2i+1 = y_i, shape (2k, D)
        self._pairs = self._pairs3.view(2 * k, dim)
        s, y = self._pairs3[:, 0], self._pairs3[:, 1]
        if k == 0:
            self._w = pairs.new_zeros(0, 0)
            self._rho = pairs.new_zeros(0)
            return
        r = _upper_sty(s, y) if sty_upper is None else sty_upper.to(pairs)
        yy = y @ y.mT if yty is None else yty.to(pairs)
        diag = r.diagonal()
        if not bool(torch.isfinite(diag).all()) or bool((diag == 0).any()):
            raise ValueError("every pair must have a finite, non-zero curvature s_iᵀy_i")
        self._rho = 1.0 / diag
        eye = torch.eye(k, dtype=pairs.dtype, device=pairs.device)
        r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
        m = yy * self.gamma
        m.diagonal().add_(diag)
        w = pairs.new_zeros(2 * k, 2 * k)
        w[0::2, 0::2] = r_inv.mT @ m @ r_inv
        w[0::2, 1::2] = -self.gamma * r_inv.mT
        w[1::2, 0::2] = -self.gamma * r_inv
        self._w = w

    @property
    def s(self) -> Tensor:
        """Stored steps, shape ``(k, D)`` (oldest first)."""
        return self._pairs3[:, 0]

    @property
    def y(self) -> Tensor:
        """Stored gradient differences, shape ``(k, D)`` (oldest first)."""
        return self._pairs3[:, 1]

    @property
    def rank(self) -> int:
        """Number of stored pairs (each is a rank-two update of ``H0``)."""
        return self._k

    @property
    def dim(self) -> int:
        """Dimension ``D``."""
        return self._dim

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` for ``v`` of shape ``(D,)`` or ``(B, D)`` (per row)."""
        if self._k == 0:
            return v * self.gamma
        if v.dim() == 1:
            c = torch.mv(self._w, torch.mv(self._pairs, v))
            return torch.addmv(v, self._pairs.mT, c, beta=self.gamma)
        if v.dim() == 2:
            c = (v @ self._pairs.mT) @ self._w  # W is symmetric
            return torch.addmm(v, c, self._pairs, beta=self.gamma)
        raise ValueError(f"v must have shape (D,) or (B, D), got {tuple(v.shape)}")

    def rmatvec(self, v: Tensor) -> Tensor:
        """Return ``Hᵀ v = H v`` (``H`` is symmetric)."""
        return self.matvec(v)

    def transpose(self) -> LBFGSInverse:
        """Return ``self`` (``H`` is symmetric)."""
        return self

    def two_loop(self, v: Tensor) -> Tensor:
        """Return ``H v`` with the two-loop recursion (Nocedal & Wright Alg. 7.4); reference.

        Args:
            v: shape ``(D,)`` or ``(B, D)``.
        """
        q = v.unsqueeze(0).clone() if v.dim() == 1 else v.clone()
        s, y, rho = self.s, self.y, self._rho
        alphas = []
        for i in range(self._k - 1, -1, -1):
            a = rho[i] * (q @ s[i])
            q -= a[:, None] * y[i]
            alphas.append(a)
        r = q * self.gamma
        for i in range(self._k):
            b = rho[i] * (r @ y[i])
            r += (alphas[self._k - 1 - i] - b)[:, None] * s[i]
        return r.squeeze(0) if v.dim() == 1 else r

    def dense(self) -> Tensor:
        """Materialise ``H`` as a ``(D, D)`` tensor (small ``D`` only: tests, diagnostics)."""
        eye = torch.eye(self._dim, dtype=self._pairs.dtype, device=self._pairs.device)
        if self._k == 0:
            return eye * self.gamma
        return eye * self.gamma + self._pairs.mT @ self._w @ self._pairs

    def memory(self) -> LBFGSMemory:
        """The pairs as an :class:`LBFGSMemory` (kinds unknown: all marked regular)."""
        return LBFGSMemory(self.s, self.y, None, self.gamma)

    def __repr__(self) -> str:
        """Short description."""
        return f"LBFGSInverse(dim={self._dim}, rank={self._k}, gamma={self.gamma:.3g})"


def lbfgsb_workspace_inverse(
    memory: LBFGSMemory,
    n_committed: int,
    *,
    identity_h0: bool = True,
    workspace_order: bool = True,
) -> LBFGSInverse:
    """The SHINE estimate of the authors' Figure-1 code, built from an L-BFGS memory.

    The SHINE fork of HOAG (branch ``shine``, ``hoag_lbfgs`` with SciPy's Fortran L-BFGS-B)
    reads the pairs out of the Fortran workspace and wraps them in SciPy's
    ``LbfgsInvHessProduct``, which differs from the matrix L-BFGS-B itself uses in two ways,
    each reproduced here and each switchable:

    * ``identity_h0``: the two-loop recursion starts from ``H0 = I``, not from the solver's
      ``γ I`` (``γ = sᵀy/yᵀy`` of the newest pair, L-BFGS-B's ``1/θ``);
    * ``workspace_order``: L-BFGS-B writes its ``j``-th update (counted since its memory was
      last reset) into column ``(j - 1) mod m`` of the workspace; once more than ``m`` updates
      were made, the columns are not chronological, and the fork reads them in storage order.
      Here the stored pairs (oldest first) are permuted into that order when
      ``n_committed > len(memory)`` (then ``m = len(memory)``: the memory is full).

    With both switched off this is the solver's own estimate (``memory.inverse()``).

    Args:
        memory: the pairs of the inner solve, oldest first (``SolverResult.state`` of
            :class:`LBFGS`), ``k`` pairs of dimension ``D``.
        n_committed: pairs pushed since the memory was last cleared
            (``stats.extra["n_committed"]`` of :class:`LBFGS`).
        identity_h0: use ``H0 = I`` (the fork) instead of ``memory.gamma``.
        workspace_order: apply the pairs in L-BFGS-B's storage order (the fork).

    Returns:
        The estimate ``H ≈ ∇²r^{-1}`` as an :class:`LBFGSInverse` (``D x D``).
    """
    s, y = memory.s, memory.y
    k = len(memory)
    if workspace_order and k and n_committed > k:
        # chronological index c holds update j_c = n_committed - k + 1 + c, stored in column
        # (j_c - 1) mod k: sorting the pairs by column gives the order the fork reads them in
        columns = [(n_committed - k + c) % k for c in range(k)]
        index = torch.tensor(sorted(range(k), key=columns.__getitem__), device=s.device)
        s, y = s[index], y[index]
    gamma = 1.0 if identity_h0 else memory.gamma
    return LBFGSInverse(s, y, gamma)


#: From this dimension on, ``[S Y]ᵀ∇r`` is cached across iterations and ``[S Y]ᵀy`` obtained by
#: differencing (saves one pass over the pairs per iteration); below it, both are recomputed
#: (fewer, cheaper tensor operations).
_CACHE_MIN_DIM = 2048


class _Workspace:
    """Mutable limited memory used inside :class:`LBFGS` (compact form, incremental updates).

    Storage is a sliding window over buffers with ``rows > m`` slots, so that the window is
    always chronological and contiguous and dropping the oldest pair is free; when the window
    reaches the end of the buffers it is copied back to the front (amortised O(D) per pair):

    * ``buf[start:end]``, ``(k, 2, D)``: the pairs ``(s_i, y_i)`` interleaved;
    * ``small[start:end, start:end]``, ``(k, k, 2)``: ``R = SᵀY`` (upper triangle; the strict
      lower triangle is unused) and ``YᵀY``;
    * ``rinv[start:end, start:end]``: ``R^{-1}`` (upper triangular, zero below the diagonal),
      updated by bordering; the trailing block of ``R^{-1}`` is the inverse of the trailing
      block of ``R``, so eviction needs no update.
    """

    def __init__(self, dim: int, m: int, dtype: torch.dtype, device: torch.device) -> None:
        self.m = m
        self.dim = dim
        self.rows = m + max(m // 2, 4)
        self.buf = torch.zeros(self.rows, 2, dim, dtype=dtype, device=device)
        self.small = torch.zeros(self.rows, self.rows, 2, dtype=dtype, device=device)
        self.rinv = torch.zeros(self.rows, self.rows, dtype=dtype, device=device)
        self.start = 0
        self.k = 0
        self.kinds: deque[str] = deque()
        self.gamma = 1.0
        #: pairs committed since the memory was last cleared (L-BFGS-B's ``iupdat``)
        self.n_committed = 0
        self.cache = dim >= _CACHE_MIN_DIM
        self._refresh_views()

    def _refresh_views(self) -> None:
        s, e = self.start, self.start + self.k
        self.win = self.buf[s:e].view(2 * self.k, self.dim)
        self.win_t = self.win.mT
        self.rinv_k = self.rinv[s:e, s:e]
        self.rinv_kt = self.rinv_k.mT
        mk = self.small[s:e, s:e, 1] * self.gamma
        mk.diagonal().add_(self.small[s:e, s:e, 0].diagonal())
        self.mk = mk

    def project(self, v: Tensor) -> Tensor:
        """``[s_0, y_0, s_1, y_1, ...]ᵀ v``, shape ``(2k,)``."""
        return torch.mv(self.win, v)

    def project_next(self, v: Tensor) -> Tensor:
        """Like :meth:`project`, including the pair written in :meth:`next_row`: ``(2k + 2,)``."""
        s, e = self.start, self.start + self.k + 1
        return torch.mv(self.buf[s:e].view(2 * (e - s), self.dim), v)

    def next_row(self) -> Tensor:
        """Storage ``(2, D)`` for the next pair (not yet committed)."""
        end = self.start + self.k
        if end == self.rows:
            k, s = self.k, self.start
            self.buf[:k] = self.buf[s:end].clone()
            small = self.small[s:end, s:end].clone()
            rinv = self.rinv[s:end, s:end].clone()
            self.small.zero_()
            self.rinv.zero_()
            self.small[:k, :k] = small
            self.rinv[:k, :k] = rinv
            self.start, end = 0, k
            self._refresh_views()
        return self.buf[end]

    def apply(self, v: Tensor, pv: Tensor) -> Tensor:
        """``H v`` given ``pv = project(v)`` (compact representation)."""
        if self.k == 0:
            return v * self.gamma
        ab = pv.view(self.k, 2)
        u = torch.mv(self.rinv_k, ab[:, 0])
        w = torch.addmv(ab[:, 1], self.mk, u, beta=-self.gamma)
        t = torch.mv(self.rinv_kt, w)
        coef = torch.stack((t, u.mul_(-self.gamma)), dim=1).view(2 * self.k)
        return torch.addmv(v, self.win_t, coef, beta=self.gamma)

    def commit(self, kind: str, col: Tensor, sy: float, yy: float, scale_gamma: bool) -> int:
        """Add the pair written in :meth:`next_row`.

        Args:
            kind: ``"regular"`` or ``"opa"``.
            col: ``project_next(y)`` for the new pair's ``y`` (computed before the call),
                shape ``(2k + 2,)``: ``s_iᵀy, y_iᵀy`` for the stored pairs then ``sᵀy, yᵀy``.
            sy: ``sᵀy`` of the new pair (non-zero), as a float.
            yy: ``yᵀy`` of the new pair, as a float.
            scale_gamma: whether to reset ``γ = sᵀy / yᵀy`` (regular pairs only: an OPA pair
                never changes ``H0``, see :class:`LBFGS` ``scale_gamma``).

        Returns:
            The number of evicted pairs (0 or 1).
        """
        evicted = 0
        if self.k == self.m:
            evicted = 1
            self.start += 1
            self.k -= 1
            self.kinds.popleft()
            col = col[2:]
        s, e, k = self.start, self.start + self.k, self.k
        col2 = col.view(k + 1, 2)
        self.small[s : e + 1, e] = col2  # column e of R (with sᵀy) and of YᵀY (with yᵀy)
        self.small[e, s:e] = col2[:k]  # row e of YᵀY (row e of R: unused lower triangle)
        # bordered inverse: R_new^{-1} = [[R^{-1}, -R^{-1} c / sᵀy], [0, 1 / sᵀy]]
        self.rinv[s:e, e] = torch.mv(self.rinv[s:e, s:e], col2[:k, 0]).mul_(-1.0 / sy)
        self.rinv[e, e] = 1.0 / sy
        self.k = k + 1
        self.n_committed += 1
        self.kinds.append(kind)
        if scale_gamma and kind == "regular":
            self.gamma = sy / yy
        self._refresh_views()
        return evicted

    def clear(self) -> None:
        """Forget every pair (``γ`` is kept if positive)."""
        self.start = 0
        self.k = 0
        self.n_committed = 0
        self.kinds.clear()
        self.small.zero_()
        self.rinv.zero_()
        if not self.gamma > 0.0:  # possible with curvature_check=False and scale_gamma
            self.gamma = 1.0
        self._refresh_views()

    def seed(self, memory: LBFGSMemory, curvature_check: bool, scale_gamma: bool) -> int:
        """Load (the newest ``m``) pairs of ``memory``; returns the number of rejected pairs."""
        if memory.dim != self.dim:
            raise ValueError(f"warm_start has dimension {memory.dim}, expected {self.dim}")
        like = self.buf
        s = memory.s.to(like)
        y = memory.y.to(like)
        kinds = list(memory.kinds or [])
        sty = memory.sty_upper.to(like) if memory.sty_upper is not None else None
        yty = memory.yty.to(like) if memory.yty is not None else None
        curv = memory.curvatures().to(like)
        if curvature_check:
            eps = torch.finfo(like.dtype).eps
            norms = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(y, dim=1)
            keep = curv > eps * norms
        else:
            keep = torch.isfinite(curv) & (curv != 0)
        n_rejected = int((~keep).sum())
        idx = torch.nonzero(keep).flatten()
        if idx.numel() > self.m:
            idx = idx[-self.m :]
        if n_rejected:
            s, y = s[idx], y[idx]
            kinds = [kinds[i] for i in idx.tolist()]
            sty = yty = None
        elif idx.numel() < len(kinds):  # keep the newest m pairs (a trailing block)
            m = idx.numel()
            s, y, kinds = s[-m:], y[-m:], kinds[-m:]
            sty = None if sty is None else sty[-m:, -m:]
            yty = None if yty is None else yty[-m:, -m:]
        self.gamma = float(memory.gamma) if scale_gamma else 1.0
        self.clear()
        k = len(kinds)
        if k == 0:
            return n_rejected
        r = _upper_sty(s, y) if sty is None else torch.triu(sty)
        self.buf[:k, 0] = s
        self.buf[:k, 1] = y
        self.small[:k, :k, 0] = r
        self.small[:k, :k, 1] = y @ y.mT if yty is None else yty
        eye = torch.eye(k, dtype=r.dtype, device=r.device)
        self.rinv[:k, :k] = torch.linalg.solve_triangular(r, eye, upper=True)
        self.k = k
        self.kinds.extend(kinds)
        self._refresh_views()
        return n_rejected

    def export(self) -> tuple[LBFGSMemory, LBFGSInverse]:
        """Snapshot (copies) of the memory and the corresponding inverse estimate."""
        s, e = self.start, self.start + self.k
        pairs = self.buf[s:e].clone()
        r = torch.triu(self.small[s:e, s:e, 0])
        yy = self.small[s:e, s:e, 1].clone()
        memory = LBFGSMemory(pairs[:, 0], pairs[:, 1], list(self.kinds), self.gamma, r, yy)
        return memory, LBFGSInverse._from_pairs(pairs, self.gamma, r, yy)


@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS minimiser of ``r(z)``, ``z ∈ R^D``, with optional OPA.

    Call as ``LBFGS(...)(fun, z0, opa_direction=None, warm_start=None)`` with
    ``fun(z) -> (r(z), ∇r(z))``. See the module docstring for the algorithm.

    Stopping: ``‖∇r(z_n)‖₂ <= max(tol, rel_tol·‖∇r(z_0)‖₂)`` (checked before each iteration, so a
    converged ``z0`` returns after 0 iterations), or ``max_iter`` regular iterations, or an
    unrecoverable line-search failure. With ``stop_test="every_evaluation"`` the test is also
    applied at every line-search trial point, and the solver returns the first trial point that
    passes it, without pushing its pair: this is how the authors drove SciPy's Fortran L-BFGS-B
    in HOAG (Figures 1 and E.1: the tolerance is tested at every ``FG`` request of the reverse
    communication, line-search evaluations included). ``stats.extra["stopped_in_line_search"]``
    is then 1.

    OPA (Appendix A of the paper): at iterations ``n`` with ``n % opa_every == 0``, **including
    n = 0** (as in the paper's algorithm; ``opa_schedule="authors"`` is the authors' rule),
    ``e_n = t_n H_n v`` with ``t_0 = opa_t0`` and ``t_n = ‖s_{n-1}‖``,
    ``ŷ_n = ∇r(z_n + e_n) - ∇r(z_n)`` (one extra evaluation of ``fun``), and ``(e_n, ŷ_n)`` is
    pushed as an ``"opa"`` pair subject to the same curvature rule as regular pairs. ``n`` counts
    the iterations of this call (it restarts at 0 with a warm start).

    Curvature rule: with ``curvature_check=True`` a pair is stored only if
    ``sᵀy > ε ‖s‖ ‖y‖`` (``ε`` the machine epsilon of the dtype); with ``False`` every pair with a
    finite non-zero ``sᵀy`` is stored, as in the authors' code (``sᵀy = 0`` would divide by 0).
    If ``-H∇r`` is then not a descent direction, the memory is cleared and a gradient step is
    taken (counted in ``n_restarts``); if ``∇r = 0`` exactly (possible before ``min_iter``),
    the solver stops there.

    Line-search failure: if the strong-Wolfe search fails but found a point of sufficient
    decrease, that point is accepted (``n_line_search_failures`` counts it); if it found none,
    the memory is cleared and the iteration retried from ``H0`` once, then the solver stops.

    Attributes:
        max_iter: maximum number of regular iterations.
        tol: absolute tolerance on ``‖∇r(z_n)‖₂``.
        rel_tol: tolerance relative to ``‖∇r(z_0)‖₂``.
        memory: number of stored pairs ``L`` (regular and OPA pairs share it, FIFO).
        line_search: ``"strong_wolfe"`` or ``"none"`` (unit step ``α = 1``).
        c1: sufficient-decrease constant of the line search.
        c2: curvature constant of the line search.
        max_ls: maximum evaluations per line search.
        scale_gamma: use ``γ = sᵀy/yᵀy`` of the newest stored *regular* pair (else ``γ = 1``,
            the paper's ``B0 = I``). OPA pairs never reset ``γ``: between two regular steps the
            initial matrix ``H0 = γ I`` stays fixed while OPA pairs are added, as Theorem 3
            assumes (``H_n v → ∇²r^{-1} v`` for a fixed ``H0``).
        curvature_check: skip pairs with non-positive curvature (see above).
        opa_every: OPA frequency ``M`` (``None``: no OPA).
        opa_t0: ``t_0`` of the OPA direction.
        opa_normalize: if ``True``, ``e_n = t_n H_n v / ‖H_n v‖`` (the authors' code); if
            ``False`` (default), ``e_n = t_n H_n v`` (paper eq. 5).
        stop_test: ``"iterates"`` (default): the tolerance is tested at accepted iterates only;
            ``"every_evaluation"``: also at line-search trial points (see above).
        noise_floor: a pair (regular or OPA) is skipped when ``‖y‖ <= noise_floor·ε·G``, with
            ``G`` the largest gradient norm seen in the solve (the scale of the terms whose
            cancellation gives the gradient near the minimum, hence of its rounding error):
            such a ``y`` is rounding noise, and the pair would undo what OPA gained (the error
            of ``H v`` grows from 8e-6 at tolerance 1e-9 to 2e-2 at 1e-14 without it, stays at
            4e-6 with it, on the Theorem 3 test problem). ``0``
            keeps every pair (the authors' code).
        min_iter: iterations made before the tolerance is first tested (0: a converged ``z0``
            returns at once; 1: the authors' pure-Python L-BFGS, which always made a step).
        opa_schedule: ``"paper"``: OPA at ``n % opa_every == 0`` from ``n = 0`` (Appendix A);
            ``"authors"``: at ``(n + 1) % opa_every == 0`` and ``n >= 1``, i.e. before their
            1-based iteration ``k = n + 1`` when ``k % freq == 0 and k > 1`` (the first OPA
            pair after ``opa_every - 1`` regular steps, none at all while a solve takes fewer).
    """

    max_iter: int = 1000
    tol: float = 1e-6
    rel_tol: float = 0.0
    memory: int = 10
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe"
    c1: float = 1e-4
    c2: float = 0.9
    max_ls: int = 20
    scale_gamma: bool = False
    curvature_check: bool = True
    opa_every: int | None = None
    opa_t0: float = 1.0
    opa_normalize: bool = False
    stop_test: Literal["iterates", "every_evaluation"] = "iterates"
    min_iter: int = 0
    noise_floor: float = 1e4
    opa_schedule: Literal["paper", "authors"] = "paper"

    def __post_init__(self) -> None:
        """Validate the parameters.

        Raises:
            ValueError: on invalid parameters.
        """
        check_fields(
            self,
            minimum={
                "tol": 0.0,
                "rel_tol": 0.0,
                "opa_every": 1,
                "noise_floor": 0.0,
                "min_iter": 0,
            },
            positive=("opa_t0",),
        )
        check_minimizer_settings(self.memory, self.max_iter, self.max_ls, self.stop_test)
        if not 0.0 < self.c1 < self.c2 < 1.0:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}")

    def _opa_due(self, n: int) -> bool:
        """Whether an OPA pair is made before the regular step of iteration ``n`` (0-based)."""
        every = int(self.opa_every)  # type: ignore[arg-type]
        if self.opa_schedule == "paper":
            return n % every == 0
        return n >= 1 and (n + 1) % every == 0

    def _accept(self, sy: float, ss: float, yy: float, eps: float, noise: float = 0.0) -> bool:
        if not math.isfinite(sy):
            return False
        if yy <= noise * noise:  # a gradient difference at rounding level: no curvature in it
            return False
        if self.curvature_check:
            return sy > eps * math.sqrt(ss * yy)
        return sy != 0.0

    def __call__(
        self,
        fun: ObjectiveFn,
        z0: Tensor,
        *,
        opa_direction: OPADirection | None = None,
        warm_start: LBFGSMemory | None = None,
    ) -> SolverResult:
        """Minimise ``r`` from ``z0``.

        Args:
            fun: ``z (D,) -> (r(z) scalar tensor, ∇r(z) (D,))``; called once per trial point.
                It receives a detached tensor; its outputs are detached.
            z0: initial point, shape ``(D,)``; the dtype and device of the computation.
            opa_direction: the OPA direction ``v`` (``(D,)`` tensor, or callable ``z -> v``
                evaluated at ``z_n``), e.g. ``∂_θ∇r`` or the outer gradient. Required iff
                ``opa_every`` is set.
            warm_start: pairs to start from (e.g. ``state`` of a previous result); copied, never
                modified. Pairs violating the curvature rule are dropped; ``γ`` is taken from it
                when ``scale_gamma``.

        Returns:
            :class:`~shine.solvers.base.SolverResult` with ``value = z*`` (the final iterate),
            ``inverse`` the :class:`LBFGSInverse` at ``z*`` (after the last update),
            ``state`` the :class:`LBFGSMemory` and ``stats`` with ``residual = ‖∇r(z*)‖``,
            ``residual_trace`` ``(nstep + 1,)``, ``lowest_step = nstep`` and ``extra`` counters
            ``n_opa_updates``, ``n_opa_skipped``, ``n_skipped_pairs``,
            ``n_line_search_failures``, ``n_line_search_evals``, ``n_restarts``, ``value``.

        Raises:
            ValueError: on a non-1-D ``z0``, a gradient of the wrong shape, or inconsistent OPA
                arguments.
        """
        if z0.dim() != 1:
            raise ValueError(f"LBFGS needs an unbatched z0 of shape (D,), got {tuple(z0.shape)}")
        use_opa = self.opa_every is not None
        if use_opa and opa_direction is None:
            raise ValueError("opa_every is set but no opa_direction was given")
        if not use_opa and opa_direction is not None:
            logger.warning("opa_direction given but opa_every is None: OPA disabled")

        z = z0.detach().clone()
        dim = z.numel()
        eps = torch.finfo(z.dtype).eps
        kappa = eps**0.25  # below ‖y‖ < κ‖∇r‖, [S Y]ᵀy is recomputed instead of differenced

        def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
            value, grad = fun(x)
            grad = grad.detach()
            if grad.shape != x.shape:
                raise ValueError(
                    f"fun returned a gradient of shape {tuple(grad.shape)}, "
                    f"expected {tuple(x.shape)}"
                )
            return value.detach(), grad

        ws = _Workspace(dim, self.memory, z.dtype, z.device)
        n_skipped = (
            ws.seed(warm_start, self.curvature_check, self.scale_gamma)
            if (warm_start is not None)
            else 0
        )

        f, g = evaluate(z)
        f_val = float(f)
        n_evals = 1
        gnorm = float(torch.linalg.vector_norm(g))
        trace = [gnorm]
        threshold = max(self.tol, self.rel_tol * gnorm)

        def noise_level() -> float:
            """Rounding level of a gradient difference: noise_floor·ε·(largest ‖∇r‖ so far)."""
            return self.noise_floor * eps * max(trace)

        # [S Y]ᵀ∇r(z_n), maintained across iterations for large D only (see _CACHE_MIN_DIM)
        pg = ws.project(g) if ws.cache else None
        n_opa = n_opa_skipped = n_ls_fail = n_ls_evals = n_restarts = 0
        last_step_norm = self.opa_t0  # t_0 of the OPA updates (t_n = ‖s_{n-1}‖ after)
        test_trials = self.stop_test == "every_evaluation"
        stopped_in_ls = False
        converged = False
        retried = False
        n = 0
        while True:
            if not (math.isfinite(gnorm) and math.isfinite(f_val)):
                logger.warning("LBFGS: non-finite objective or gradient at iteration %d", n)
                break
            if gnorm <= threshold and n >= self.min_iter:
                converged = True
                break
            if n >= self.max_iter:
                break

            # ---- OPA extra update (before the regular step, same iterate z_n) ----
            if use_opa and not retried and self._opa_due(n):
                v = opa_direction(z) if callable(opa_direction) else opa_direction
                v = v.detach().to(z)  # type: ignore[union-attr]
                if v.shape != z.shape:
                    raise ValueError(
                        f"opa_direction has shape {tuple(v.shape)}, expected {tuple(z.shape)}"
                    )
                hv = ws.apply(v, ws.project(v))
                t_n = last_step_norm  # opa_t0 before the first step, then ‖s_{n-1}‖
                if self.opa_normalize:
                    t_n = t_n / max(float(torch.linalg.vector_norm(hv)), 1e-300)
                row = ws.next_row()
                e = torch.mul(hv, t_n, out=row[0])
                _, g_e = evaluate(z + e)
                n_evals += 1
                y_hat = torch.sub(g_e, g, out=row[1])
                col = ws.project_next(y_hat)
                r_hat, yy = col[-2:].tolist()
                if self._accept(r_hat, float(torch.dot(e, e)), yy, eps, noise_level()):
                    evicted = ws.commit("opa", col, r_hat, yy, self.scale_gamma)
                    if pg is not None:
                        pg = torch.cat((pg[2 * evicted :], ws.win[-2:] @ g))
                    n_opa += 1
                else:
                    n_opa_skipped += 1
                    logger.debug("LBFGS: OPA pair skipped at n=%d (ŷᵀe=%.3g)", n, r_hat)

            # ---- regular step ----
            p = ws.apply(g, ws.project(g) if pg is None else pg).neg_()
            dphi0 = float(torch.dot(g, p))
            if not dphi0 < 0.0 and ws.k > 0:
                logger.info("LBFGS: -H∇r is not a descent direction at n=%d; memory cleared", n)
                ws.clear()
                pg = ws.project(g) if ws.cache else None
                n_restarts += 1
                p = g * -ws.gamma
                dphi0 = float(torch.dot(g, p))
            if not dphi0 < 0.0:  # also after a restart: ∇r = 0 exactly (possible before min_iter)
                logger.warning("LBFGS: zero or non-finite search direction; stopping")
                break
            pnorm = float(torch.linalg.vector_norm(p))

            if self.line_search == "none":
                step = 1.0
                z_new = z + p
                f_new, g_new = evaluate(z_new)
                n_evals += 1
                dphi_new = float(torch.dot(g_new, p))
            else:
                trials = [0]

                testing = test_trials and n + 1 >= self.min_iter

                def phi(
                    alpha: float,
                    z: Tensor = z,
                    p: Tensor = p,
                    trials: list[int] = trials,
                    testing: bool = testing,
                ) -> tuple[float, float, TrialPoint]:
                    z_t = torch.add(z, p, alpha=alpha)
                    f_t, g_t = evaluate(z_t)
                    trials[0] += 1
                    point = TrialPoint(z_t, f_t, g_t)
                    if testing and float(torch.linalg.vector_norm(g_t)) <= threshold:
                        raise _ConvergedAtTrial(point)
                    return float(f_t), float(torch.dot(g_t, p)), point

                try:
                    ls = strong_wolfe(
                        phi,
                        f_val,
                        dphi0,
                        alpha_init=1.0 if ws.k > 0 else min(1.0, 1.0 / pnorm),
                        c1=self.c1,
                        c2=self.c2,
                        max_ls=self.max_ls,
                        value_noise=default_value_noise(f_val, z.dtype),
                    )
                except _ConvergedAtTrial as stop:
                    n_evals += trials[0]
                    n_ls_evals += trials[0]
                    z, f, g = stop.point
                    f_val = float(f)
                    gnorm = float(torch.linalg.vector_norm(g))
                    trace.append(gnorm)
                    stopped_in_ls = True
                    converged = True
                    break
                n_evals += ls.n_evals
                n_ls_evals += ls.n_evals
                if not ls.success:
                    n_ls_fail += 1
                if ls.payload is None:  # no point of sufficient decrease
                    if ws.k > 0 and not retried:
                        logger.info(
                            "LBFGS: line search failed at n=%d (%s); memory cleared",
                            n,
                            ls.message,
                        )
                        ws.clear()
                        pg = ws.project(g) if ws.cache else None
                        n_restarts += 1
                        retried = True
                        continue
                    logger.warning(
                        "LBFGS: line search failed at n=%d (%s); stopping", n, ls.message
                    )
                    break
                step = ls.step
                z_new, f_new, g_new = ls.payload
                dphi_new = ls.derivative
            retried = False

            # ---- pair update ----
            row = ws.next_row()
            torch.mul(p, step, out=row[0])
            y = torch.sub(g_new, g, out=row[1])
            snorm = step * pnorm
            gnorm_new = float(torch.linalg.vector_norm(g_new))
            if pg is None:
                col = ws.project_next(y)
                sy, yy = col[-2:].tolist()
                accept = self._accept(sy, snorm * snorm, yy, eps, noise_level())
                if accept:
                    ws.commit("regular", col, sy, yy, self.scale_gamma)
            else:
                yy = float(torch.dot(y, y))
                differenced = math.sqrt(yy) >= kappa * max(gnorm, gnorm_new)
                if differenced:  # sᵀy and [S Y]ᵀy without another pass over the vectors
                    sy = step * (dphi_new - dphi0)
                else:  # y tiny compared with the gradients: differencing would cancel
                    col = ws.project_next(y)
                    sy = float(col[-2])
                accept = self._accept(sy, snorm * snorm, yy, eps, noise_level())
                pgn = ws.project(g_new)
                if accept and differenced:
                    col = torch.cat((pgn - pg, pgn.new_tensor([sy, yy])))
                if accept:
                    evicted = ws.commit("regular", col, sy, yy, self.scale_gamma)
                    pg = torch.cat((pgn[2 * evicted :], ws.win[-2:] @ g_new))
                else:
                    pg = pgn
            if not accept:
                n_skipped += 1
                logger.debug("LBFGS: pair skipped at n=%d (sᵀy=%.3g)", n, sy)

            z, f, g, gnorm = z_new, f_new, g_new, gnorm_new
            f_val = float(f)
            trace.append(gnorm)
            last_step_norm = snorm
            n += 1

        memory, inverse = ws.export()
        extra = {
            "n_opa_updates": float(n_opa),
            "n_opa_skipped": float(n_opa_skipped),
            "n_skipped_pairs": float(n_skipped),
            "n_line_search_failures": float(n_ls_fail),
            "n_line_search_evals": float(n_ls_evals),
            "n_restarts": float(n_restarts),
            "n_committed": float(ws.n_committed),
            "stopped_in_line_search": float(stopped_in_ls),
            "value": f_val,
        }
        stats = SolverStats(
            nstep=n,
            n_evals=n_evals,
            residual_trace=torch.tensor(trace, dtype=z.dtype, device=z.device),
            residual=torch.tensor(gnorm, dtype=z.dtype, device=z.device),
            converged=torch.tensor(converged, device=z.device),
            lowest_step=torch.tensor(n, device=z.device),
            extra=extra,
        )
        logger.debug("LBFGS: %s", stats.summary())
        return SolverResult(value=z, stats=stats, inverse=inverse, state=memory)
