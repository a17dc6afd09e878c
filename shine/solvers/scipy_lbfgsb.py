"""SciPy's L-BFGS-B as an inner minimiser that hands over its L-BFGS pairs.

The authors' Figures 1 and E.1 ran the inner problems of HOAG with the Fortran L-BFGS-B of SciPy,
driven by hand through its reverse-communication interface (``hoag_lbfgs`` in the SHINE fork of
HOAG): native stopping tests disabled, the tolerance ``‖∇r(z)‖₂ < tol`` tested at **every**
function evaluation (line-search trial points included), memory reset at every call, and the
SHINE estimate read out of the solver's workspace. That interface is private and changed in
SciPy 1.15; :class:`ScipyLBFGSB` reproduces the same solve through the public
``scipy.optimize.minimize(method="L-BFGS-B")``:

* the objective raises an internal signal at the first evaluation that passes the test, so the
  returned point is that evaluation's point, as in the authors' loop;
* the pairs of the limited memory are rebuilt from the accepted iterates (``callback`` after each
  iteration): ``s_k = z_{k+1} - z_k``, ``y_k = ∇r(z_{k+1}) - ∇r(z_k)``, skipped when
  ``s_kᵀy_k <= ε·(-∇r(z_k)ᵀs_k)`` (L-BFGS-B's own rule), the newest ``memory`` kept. L-BFGS-B
  makes the update of iteration ``k`` at the start of iteration ``k + 1``, so a solve stopped
  inside a line search holds exactly the pairs of the completed iterations, as the workspace
  did. The solver's inverse estimate is ``H0 = γ I`` (``γ = sᵀy/yᵀy`` of the newest pair, the
  ``1/θ`` of L-BFGS-B) updated by the pairs oldest first;
  :func:`shine.solvers.lbfgs.lbfgsb_workspace_inverse` gives the authors' reading of it.

Limitation: when L-BFGS-B's line search fails it restores the previous iterate and clears its
memory internally, which the public interface does not report; the rebuilt memory then keeps
the older pairs (logged as a warning when SciPy reports an abnormal line-search termination).

The computation runs on the CPU in float64 (L-BFGS-B's arithmetic); ``z0`` may live on any device
and dtype, the objective receives tensors of that device and dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from shine.solvers.base import ObjectiveFn, SolverResult, SolverStats
from shine.solvers.lbfgs import LBFGSMemory, check_minimizer_settings

logger = logging.getLogger(__name__)


class _Converged(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the wrapped objective at the first evaluation that passes the stopping test."""


@dataclass(frozen=True)
class ScipyLBFGSB:
    """SciPy's L-BFGS-B (no bounds) on ``r(z)``, ``z ∈ R^D``, driven as in the authors' HOAG.

    Call as ``ScipyLBFGSB(...)(fun, z0)`` with ``fun(z) -> (r(z), ∇r(z))`` (see the module
    docstring for the stopping rule and the memory it returns).

    Attributes:
        max_iter: maximum number of L-BFGS-B iterations (accepted iterates).
        tol: stop at the first evaluation with ``‖∇r(z)‖₂ < tol``.
        memory: L-BFGS-B's ``maxcor`` (10 for HOAG, 30 for SHINE / Jacobian-Free).
        max_ls: maximum evaluations per line search (``maxls``, 20 in HOAG).
        stop_test: ``"every_evaluation"`` (the authors' driver) or ``"iterates"`` (tested at
            accepted iterates only).
    """

    max_iter: int = 1000
    tol: float = 1e-6
    memory: int = 10
    max_ls: int = 20
    stop_test: Literal["iterates", "every_evaluation"] = "every_evaluation"

    def __post_init__(self) -> None:
        """Validate the parameters.

        Raises:
            ValueError: on invalid parameters.
        """
        check_minimizer_settings(self.memory, self.max_iter, self.max_ls, self.stop_test)

    def __call__(
        self,
        fun: ObjectiveFn,
        z0: Tensor,
        *,
        opa_direction: Any = None,
        warm_start: LBFGSMemory | None = None,
    ) -> SolverResult:
        """Minimise ``r`` from ``z0``.

        Args:
            fun: ``z (D,) -> (r(z) scalar tensor, ∇r(z) (D,))``.
            z0: initial point ``(D,)``.
            opa_direction: not supported (L-BFGS-B has no OPA): must be ``None``.
            warm_start: not supported (L-BFGS-B starts from an empty memory): must be ``None``
                or empty.

        Returns:
            :class:`~shine.solvers.base.SolverResult`: ``value`` the returned point (on the
            device and dtype of ``z0``), ``inverse`` the L-BFGS-B estimate, ``state`` the
            :class:`LBFGSMemory`, ``stats.extra`` with ``n_committed`` (pairs pushed),
            ``n_skipped_pairs``, ``stopped_in_line_search`` and ``value`` (``r`` at the
            returned point).

        Raises:
            ValueError: on a non-1-D ``z0``, an OPA direction or a non-empty warm start.
        """
        import scipy.optimize

        if z0.dim() != 1:
            raise ValueError(f"ScipyLBFGSB needs an unbatched z0 of shape (D,), got {z0.shape}")
        if opa_direction is not None:
            raise ValueError("ScipyLBFGSB has no OPA; use shine.solvers.LBFGS with opa_every")
        if warm_start is not None and len(warm_start):
            raise ValueError(
                "ScipyLBFGSB starts every solve from an empty memory (as the authors' L-BFGS-B); "
                "use shine.solvers.LBFGS for a warm-started memory"
            )
        device, dtype = z0.device, z0.dtype
        eps = float(np.finfo(np.float64).eps)
        test_every = self.stop_test == "every_evaluation"
        accepted: list[tuple[np.ndarray, float, np.ndarray]] = []  # (x, r(x), ∇r(x)) of iterates
        last: dict[str, Any] = {}
        n_evals = [0]

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = fun(torch.from_numpy(x.copy()).to(device=device, dtype=dtype))
            g = grad.detach().to("cpu", torch.float64).numpy().copy()
            n_evals[0] += 1
            last.update(x=x.copy(), f=float(value), g=g)
            if n_evals[0] == 1:
                accepted.append((last["x"], last["f"], g))
            if (test_every or n_evals[0] == 1) and float(np.linalg.norm(g)) < self.tol:
                raise _Converged
            return last["f"], g

        def callback(intermediate_result: Any) -> None:
            # L-BFGS-B calls back after each iteration; its last evaluation is the new iterate
            accepted.append((last["x"], last["f"], last["g"]))
            if not test_every and float(np.linalg.norm(last["g"])) < self.tol:
                raise StopIteration

        x0 = z0.detach().to("cpu", torch.float64).numpy().copy()
        converged = False
        try:
            if self.max_iter == 0:
                objective(x0)
                res = None
            else:
                res = scipy.optimize.minimize(
                    objective,
                    x0,
                    jac=True,
                    method="L-BFGS-B",
                    callback=callback,
                    options={
                        "maxcor": self.memory,
                        "ftol": 0.0,  # the authors' factr = pgtol = 1e-120: native tests off
                        "gtol": 0.0,
                        "maxls": self.max_ls,
                        "maxiter": self.max_iter,
                        "maxfun": np.iinfo(np.int32).max,
                    },
                )
        except _Converged:
            converged = True
            res = None
        if res is None:  # stopped by the test (or max_iter = 0): the last evaluated point
            x_final, f_final, g_final = last["x"], last["f"], last["g"]
        else:
            if "ABNORMAL" in str(res.message).upper():
                logger.warning(
                    "ScipyLBFGSB: %s after %d iterations (L-BFGS-B may have cleared its memory: "
                    "the rebuilt pairs can differ from its own)",
                    res.message,
                    len(accepted) - 1,
                )
            # SciPy returns its last iterate, the last accepted one (restored after a failed
            # line search, whose trial point's value res.fun then still holds): take the point,
            # value and gradient from the record
            x_final, f_final, g_final = accepted[-1]
            converged = float(np.linalg.norm(g_final)) < self.tol
        # a trial point of a line search, not an accepted iterate
        stopped_in_ls = res is None and last["x"] is not accepted[-1][0]

        s_list: list[np.ndarray] = []
        y_list: list[np.ndarray] = []
        n_skipped = 0
        for (x_a, _, g_a), (x_b, _, g_b) in zip(accepted[:-1], accepted[1:], strict=True):
            s, y = x_b - x_a, g_b - g_a
            if float(s @ y) <= eps * float(-(g_a @ s)):
                n_skipped += 1
                continue
            s_list.append(s)
            y_list.append(y)
        n_committed = len(s_list)
        s_list, y_list = s_list[-self.memory :], y_list[-self.memory :]
        if s_list:
            s_t = torch.from_numpy(np.stack(s_list))
            y_t = torch.from_numpy(np.stack(y_list))
            gamma = float(s_list[-1] @ y_list[-1]) / float(y_list[-1] @ y_list[-1])
            memory = LBFGSMemory(s_t, y_t, None, gamma)
        else:
            memory = LBFGSMemory.empty(x0.size, dtype=torch.float64)
        memory = memory.to(device=device, dtype=dtype)
        n_iter = len(accepted) - 1
        gnorm = float(np.linalg.norm(g_final))
        trace = [float(np.linalg.norm(g)) for _, _, g in accepted]
        if stopped_in_ls:
            trace.append(gnorm)
        stats = SolverStats(
            nstep=n_iter,
            n_evals=n_evals[0],
            residual_trace=torch.tensor(trace, dtype=dtype, device=device),
            residual=torch.tensor(gnorm, dtype=dtype, device=device),
            converged=torch.tensor(converged, device=device),
            lowest_step=torch.tensor(n_iter, device=device),
            extra={
                "n_committed": float(n_committed),
                "n_skipped_pairs": float(n_skipped),
                "stopped_in_line_search": float(stopped_in_ls),
                "n_opa_updates": 0.0,
                "value": float(f_final),
            },
        )
        z = torch.from_numpy(np.array(x_final, dtype=np.float64)).to(device=device, dtype=dtype)
        return SolverResult(value=z, stats=stats, inverse=memory.inverse(), state=memory)
