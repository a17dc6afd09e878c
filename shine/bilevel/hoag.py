"""HOAG: hyper-parameter optimisation with approximate gradient (Pedregosa 2016), with SHINE.

The bi-level problem of the paper (eq. 2) is

    min_λ  L(w*(λ)) = Σ_{outer set} ℓ_i(w*)
    s.t.   w*(λ) = argmin_w h(w, λ) = ℓ_train(w) + ½ e^λ ‖w‖²,

solved by hypergradient descent on the log-regularisation ``λ``. One outer iteration ``k``:

1. **forward**: L-BFGS on ``h(·, λ_k)``, warm-started from the previous ``w`` (and, by default,
   from the previous L-BFGS memory), to the tolerance
   ``‖∇_w h‖ <= ε_k ‖∇_w h(w_0, λ_0)‖ exp(min λ_{k-1} - min λ_0)``;
2. **backward**: ``q ≈ ∇²_w h(w_k)^{-1} ∇L(w_k)`` by a backward strategy
   (:mod:`shine.backward`): conjugate gradient to relative tolerance ``ε_k`` (HOAG), the
   L-BFGS inverse estimate (SHINE), the identity (Jacobian-Free), or refinements; it is solved in
   the adjoint form ``uᵀ ∇²h = -∇Lᵀ`` (``u = -q``) with Hessian-vector products;
3. **hypergradient** ``dL/dλ = -(∂_λ∇_w h)ᵀ q`` and the outer update with HOAG's step rule;
4. the tolerance decreases: ``ε_{k+1} = ρ ε_k`` (floor ``1e-12``; halved on a rejected step).

Two presets (:class:`HOAG` ``mode``), each a choice of six independent behaviours that can
also be set one by one (a field left at ``None`` follows the preset):

============================ ============================== ==================================
behaviour (field)            ``mode="faithful"``: the        ``mode="robust"``: ours
                             authors' code
============================ ============================== ==================================
``step_rule``                ``"authors"``                  ``"safeguarded"``
``tolerance_reference``      ``"aliased"``                  ``"current"``
``estimate``                 ``"authors"``                  ``"solver"``
``inner_solver``             ``"scipy_lbfgsb"`` with        ``"solver"``
                             ``inner_memory="restart"`` and
                             no OPA, else
                             ``"authors_lbfgs"``
``inner_stop_test``          ``"every_evaluation"`` with    ``"iterates"``
                             ``inner_memory="restart"``,
                             else ``"iterates"``
``opa_schedule``             ``"countdown"``                ``"fixed"``
============================ ============================== ==================================

* ``step_rule="authors"`` (``hoag_lbfgs``; fabianp/hoag): first ``L = ‖∇λ‖/√G``; step
  ``λ ← clip(λ - ∇λ/L)`` then, judged on the outer loss of the *new* inner solution against the
  previous one, either ``L ← 0.95 L`` and a **second** step, or a rejection (``L ← 2L``, back to
  the previous ``λ``, ``ε ← ε/2``) when the loss grew by 20 %, or else a second step as well;
  bounds ``[-12, 12]``. ``"safeguarded"``: one step of length ``1/L`` (capped by
  ``max_step``); the step is judged on the loss at the point it leads to, and a step that
  increases the outer loss beyond the inexactness slack ``C ε |L|`` is undone (back to the last
  accepted ``λ``, ``L ← 2L``, ``ε ← ε/2``, and the next iteration recomputes the hypergradient
  there at the tighter ``ε``); ``L ← 0.95 L`` only after a sufficient decrease.
* ``tolerance_reference``: the factor ``exp(min λ_ref - min λ_0)`` of the inner tolerance.
  ``"aliased"`` is what the authors' code computes: it writes
  ``exp(min(old_lambdak) - min(lambda0))``, but its ``lambda0`` array *is* the iterate that the
  outer step updates in place, so "``λ_0``" is the current ``λ_k`` until the first rejected
  step, whose ``lambdak = old_lambdak.copy()`` rebinds the iterate and leaves ``lambda0``
  frozen at the rejected trial value; ``λ_ref`` is their ``old_lambdak`` (the ``λ`` before the
  last step, or the intermediate point after the first half of a double step). ``"initial"``
  is the literal reading (``λ_0`` fixed, ``λ_ref = old_lambdak``); ``"current"``:
  ``λ_ref = λ_k``, ``λ_0`` fixed (the tolerance follows the strength of the regularisation of
  the problem being solved).
* ``estimate``: what a SHINE-type backward receives as inverse Hessian. ``"authors"``: with
  ``inner_memory="restart"``, the fork's SciPy ``LbfgsInvHessProduct`` on the L-BFGS-B
  workspace (``H0 = I`` and the workspace's circular order, see
  :func:`shine.solvers.lbfgs.lbfgsb_workspace_inverse`); otherwise their pure-Python two-loop
  recursion (``H0 = I``, pairs oldest first). ``"solver"``: the estimate of the inner solver
  itself (``H0 = γ I`` with ``scale_gamma``, chronological): a better hypergradient.
* ``inner_solver``: ``"scipy_lbfgsb"`` runs the inner problems with SciPy's L-BFGS-B
  (:class:`shine.solvers.ScipyLBFGSB`, with the ``memory`` and ``max_ls`` of ``solver``), the
  solver of the authors' Figures 1 and E.1; ``"authors_lbfgs"`` runs ``solver`` set up as the
  authors' pure-Python L-BFGS of Figures 2 left and E.2 (``H0 = I``: no ``γ`` scaling,
  ``c2 = 9e-4``, no curvature check, at least one iteration per solve, their OPA rule
  ``opa_schedule="authors"`` and ``e`` rescaled to ``‖s_{n-1}‖``; their line search was
  SciPy's and is ours here, and a failed line search does not take their blind 0.01 step);
  ``"solver"`` runs ``solver`` as configured (our PyTorch L-BFGS, on any device).
* ``inner_stop_test``: ``"every_evaluation"`` tests the inner tolerance at every function
  evaluation, line-search trial points included, as their reverse-communication driver of
  L-BFGS-B did; ``"iterates"`` at accepted iterates only (see :class:`LBFGS` ``stop_test``).
* ``opa_schedule`` (SHINE-OPA): ``"countdown"``: the OPA frequency of outer iteration ``k`` is
  ``max(1, (max_iter + 1 - k) // opa_countdown)`` (the authors' ``maxiter - it``, divided by
  their ``opa_freq_coef``: 1 for logistic regression, 4 for NLS), so OPA pairs become more
  frequent as the outer loop goes on; ``"fixed"``: every ``solver.opa_every`` iterations (the
  paper's fixed ``M``).

The outer loop is a stepper (``start``, ``step``, ``state_dict``) driven by
:class:`shine.harness.training.Trainer`, which times it, logs it and checkpoints it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from shine.backward.base import BackwardStrategy
from shine.bilevel.losses import L2Regularized, LinearModelLoss
from shine.solvers.base import SolverResult
from shine.solvers.lbfgs import LBFGS, LBFGSMemory, lbfgsb_workspace_inverse
from shine.solvers.scipy_lbfgsb import ScipyLBFGSB
from shine.validation import check_fields

logger = logging.getLogger(__name__)

#: smallest tolerance of the schedule (HOAG's ``exact_epsilon``)
TOL_FLOOR = 1e-12


@dataclass(frozen=True)
class ToleranceSchedule:
    """The decreasing tolerance ``ε_k`` of the inner solve and of the backward solve.

    Attributes:
        kind: ``"exponential"`` (``ε_{k+1} = decrease·ε_k``), ``"quadratic"`` (``ε_0/k²``),
            ``"cubic"`` (``ε_0/k³``) or ``"exact"`` (always the floor ``1e-12``).
        initial: ``ε_0`` (HOAG: ``1e-3``).
        decrease: ``ρ`` of the exponential schedule (0.9 HOAG, 0.78 SHINE/JF, 0.8 NLS).
        floor: smallest tolerance.
    """

    kind: Literal["exponential", "quadratic", "cubic", "exact"] = "exponential"
    initial: float = 1e-3
    decrease: float = 0.9
    floor: float = TOL_FLOOR

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on an unknown kind or out-of-range constants.
        """
        check_fields(self, positive=("initial",))
        if not 0.0 < self.decrease <= 1.0:
            raise ValueError(f"decrease must be in (0, 1], got {self.decrease}")

    def first(self) -> float:
        """``ε`` of the first outer iteration."""
        return self.floor if self.kind == "exact" else self.initial

    def next(self, eps: float, iteration: int) -> float:
        """``ε`` after outer iteration ``iteration`` (1-based) that used ``eps``."""
        if self.kind == "exponential":
            new = eps * self.decrease
        elif self.kind == "quadratic":
            new = self.initial / iteration**2
        elif self.kind == "cubic":
            new = self.initial / iteration**3
        else:
            new = self.floor
        return max(new, self.floor)


@dataclass(frozen=True)
class Scheduled:
    """A backward strategy whose settings follow the tolerance ``ε_k`` of the outer iteration.

    ``at(ε)`` returns a copy of ``strategy`` with ``tol_field = ε`` and, if ``steps_field`` is
    set, ``steps_field = max(⌊1/(steps_scale·ε^steps_exponent)⌋, min_steps)`` iterations (the
    authors' refine rule: 0 iterations while ``ε ≥ 1e-4``, then a few).

    Attributes:
        strategy: e.g. ``IFT(solver=ConjugateGradientAdjoint())`` (HOAG) or
            ``Refine(Shine(), solver=ConjugateGradientAdjoint())``.
        tol_field: name of the tolerance field of ``strategy`` (``None``: not scheduled).
        steps_field: name of the iteration-count field (``"max_iter"``, ``"n_steps"``) or None.
        steps_scale: see above (100 in the authors' code).
        steps_exponent: 0.5 (logistic regression) or 0.8 (NLS) in the authors' code.
        min_steps: lower bound of the iteration count.
    """

    strategy: BackwardStrategy
    tol_field: str | None = "tol"
    steps_field: str | None = None
    steps_scale: float = 100.0
    steps_exponent: float = 0.5
    min_steps: int = 0

    def __post_init__(self) -> None:
        """Validate the fields (types, ranges).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field out of range (the field and its range are named).
        """
        check_fields(self, minimum={"min_steps": 0}, positive=("steps_scale",))

    def at(self, eps: float) -> BackwardStrategy:
        """The strategy to use at tolerance ``eps``.

        Raises:
            ValueError: if a named field does not exist on the strategy.
        """
        changes: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(self.strategy)}  # type: ignore[arg-type]
        for name in (self.tol_field, self.steps_field):
            if name is not None and name not in names:
                raise ValueError(
                    f"{type(self.strategy).__name__} has no field {name!r}; fields: "
                    f"{sorted(names)}"
                )
        if self.tol_field is not None:
            changes[self.tol_field] = eps
        if self.steps_field is not None:
            n = int(1.0 / (self.steps_scale * eps**self.steps_exponent))
            changes[self.steps_field] = max(n, self.min_steps)
        return replace(self.strategy, **changes)  # type: ignore[type-var]


def backward_at(backward: BackwardStrategy | Scheduled, eps: float) -> BackwardStrategy:
    """``backward.at(eps)`` for a :class:`Scheduled` strategy, else ``backward`` itself."""
    return backward.at(eps) if isinstance(backward, Scheduled) else backward


@dataclass
class BilevelProblem:
    """A hyper-parameter optimisation problem: inner objective on train, losses elsewhere.

    Attributes:
        inner: ``h(w, λ)`` on the training set.
        outer: the outer loss ``L`` (unregularised) on the outer (validation) set.
        test: the same loss on the held-out test set (never seen by the optimiser), or None.
    """

    inner: L2Regularized
    outer: LinearModelLoss
    test: LinearModelLoss | None = None


def memory_to_state(memory: LBFGSMemory | None) -> dict[str, Any] | None:
    """An :class:`LBFGSMemory` as plain tensors and lists (checkpointable)."""
    if memory is None:
        return None
    return {"s": memory.s, "y": memory.y, "kinds": list(memory.kinds or []), "gamma": memory.gamma}


def memory_from_state(state: dict[str, Any] | None) -> LBFGSMemory | None:
    """Inverse of :func:`memory_to_state`."""
    if state is None:
        return None
    return LBFGSMemory(state["s"], state["y"], list(state["kinds"]), float(state["gamma"]))


OPAVectorKind = Literal["outer_gradient", "cross_derivative"]
StepRule = Literal["authors", "safeguarded"]
ToleranceReference = Literal["aliased", "initial", "current"]
EstimateKind = Literal["authors", "solver"]
InnerStopTest = Literal["every_evaluation", "iterates"]
InnerSolverKind = Literal["scipy_lbfgsb", "authors_lbfgs", "solver"]
OPASchedule = Literal["countdown", "fixed"]

#: :class:`LBFGS` settings of the authors' pure-Python L-BFGS (``hoag/lbfgs.py``)
AUTHORS_PURE_PYTHON_LBFGS: dict[str, Any] = {
    "scale_gamma": False,
    "c1": 1e-4,
    "c2": 9e-4,
    "curvature_check": False,
    "min_iter": 1,
    "opa_schedule": "authors",
    "opa_normalize": True,
    "noise_floor": 0.0,
}

#: the values of the behaviours that ``mode`` presets (``None`` fields follow it)
_PRESETS: dict[str, dict[str, str]] = {
    "faithful": {
        "step_rule": "authors",
        "tolerance_reference": "aliased",
        "estimate": "authors",
        # their Fortran L-BFGS-B driver, tested at every evaluation (Figs. 1, E.1); replaced by
        # _FAITHFUL_PURE_PYTHON when the memory is kept or OPA is on
        "inner_solver": "scipy_lbfgsb",
        "inner_stop_test": "every_evaluation",
        "opa_schedule": "countdown",
    },
    "robust": {
        "step_rule": "safeguarded",
        "tolerance_reference": "current",
        "estimate": "solver",
        "inner_solver": "solver",
        "inner_stop_test": "iterates",
        "opa_schedule": "fixed",
    },
}
#: faithful mode with a kept memory or OPA: their pure-Python L-BFGS (Figs. 2 left, E.2), which
#: tested the tolerance at accepted iterates
_FAITHFUL_PURE_PYTHON: dict[str, str] = {
    "inner_solver": "authors_lbfgs",
    "inner_stop_test": "iterates",
}
#: the valid values of each preset behaviour (from its ``Literal`` type)
_CHOICES: dict[str, tuple[str, ...]] = {
    "step_rule": get_args(StepRule),
    "tolerance_reference": get_args(ToleranceReference),
    "estimate": get_args(EstimateKind),
    "inner_solver": get_args(InnerSolverKind),
    "inner_stop_test": get_args(InnerStopTest),
    "opa_schedule": get_args(OPASchedule),
}


@dataclass(frozen=True)
class HOAG:
    """The HOAG outer loop with a pluggable hypergradient (see the module docstring).

    Attributes:
        solver: the inner L-BFGS (memory 10 for HOAG, 30 for SHINE/JF, 60 for SHINE-OPA; OPA
            when ``opa_every`` is set). Its ``tol`` is replaced at every outer iteration.
        backward: a backward strategy (``Shine()``, ``JacobianFree()``) or a
            :class:`Scheduled` one (HOAG's CG, refine); solves ``uᵀ∇²h = -∇Lᵀ``.
        tolerance: the schedule of ``ε_k``.
        mode: ``"faithful"`` (the authors' code) or ``"robust"`` (ours): the preset of
            ``step_rule``, ``tolerance_reference``, ``estimate`` and ``inner_stop_test`` (see
            the module docstring).
        step_rule: ``"authors"`` (double step, 20 % rejection) or ``"safeguarded"``; ``None``
            follows ``mode``.
        tolerance_reference: ``"aliased"``, ``"initial"`` or ``"current"``; ``None`` follows
            ``mode``.
        estimate: ``"authors"`` or ``"solver"`` inverse estimate for SHINE-type backwards;
            ``None`` follows ``mode``.
        inner_solver: ``"scipy_lbfgsb"``, ``"authors_lbfgs"`` or ``"solver"``; ``None`` follows
            ``mode`` (faithful: ``"scipy_lbfgsb"`` with ``inner_memory="restart"`` and no OPA,
            else ``"authors_lbfgs"``).
        inner_stop_test: ``"every_evaluation"`` or ``"iterates"``; ``None`` follows ``mode``
            (faithful: ``"every_evaluation"`` with ``inner_memory="restart"``, else
            ``"iterates"``).
        max_iter: number of outer iterations (the authors' ``maxiter=30`` gives 29).
        max_inner_iter: cap on the L-BFGS iterations of one inner solve (1000).
        inner_memory: what the next inner solve starts from: ``"restart"``, an empty L-BFGS
            memory (the authors' Fortran L-BFGS-B, Figure 1); ``"keep"``, the previous memory
            as is (their pure-Python L-BFGS, Figures 2 left and E.2: its pairs were measured at
            the previous ``λ`` and are stale); ``"shift"``, the previous memory with its
            gradient differences moved exactly to the new ``λ`` (``y += Δe^λ ⊙ s``, see
            :meth:`L2Regularized.shift_curvature_pairs`).
        warm_start_backward: start iterative backward solves from the previous solution.
        first_backward_start: ``"inner_solution"``: the first CG starts from ``q = w`` (the
            authors' code); ``"zero"``: from 0.
        opa_vector: the vector ``v`` the inner solver's OPA pairs target (its call argument
            ``opa_direction``): the outer gradient ``∇L(w)`` (the authors' code, targets the
            ``H ∇L`` used by SHINE) or ``∂_λ∇_w h = e^λ w`` (paper eq. 5).
        opa_schedule: ``"countdown"`` or ``"fixed"`` OPA frequency; ``None`` follows ``mode``.
        opa_countdown: the divisor of the countdown schedule (the authors' ``opa_freq_coef``: 1
            for logistic regression, 4 for NLS).
        bounds: box constraint of ``λ``.
        step_c: constant ``C`` of the step test (0.25).
        reject_factor: faithful mode: reject when ``L_k >= reject_factor · L_{k-1}``.
        max_step: robust mode: largest ``|Δλ|`` of one step (in log space).
        lambda0: initial log-regularisation.
        name: label of the method in logs, run summaries and figures (e.g. ``"shine"``).
    """

    solver: LBFGS = field(default_factory=lambda: LBFGS(memory=10, max_iter=1000))
    backward: Any = None
    tolerance: ToleranceSchedule = field(default_factory=ToleranceSchedule)
    mode: Literal["faithful", "robust"] = "faithful"
    step_rule: StepRule | None = None
    tolerance_reference: ToleranceReference | None = None
    estimate: EstimateKind | None = None
    inner_solver: InnerSolverKind | None = None
    inner_stop_test: InnerStopTest | None = None
    max_iter: int = 29
    max_inner_iter: int = 1000
    inner_memory: Literal["restart", "keep", "shift"] = "restart"
    warm_start_backward: bool = True
    first_backward_start: Literal["inner_solution", "zero"] = "inner_solution"
    opa_vector: OPAVectorKind = "outer_gradient"
    opa_schedule: OPASchedule | None = None
    opa_countdown: int = 1
    bounds: tuple[float, float] = (-12.0, 12.0)
    step_c: float = 0.25
    reject_factor: float = 1.2
    max_step: float = 2.0
    lambda0: float = 0.0
    name: str = "hoag"

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on an unknown mode, missing backward, or bad constants.
        """
        check_fields(self, positive=("step_c", "max_step"))
        if self.backward is None:
            raise ValueError(
                "HOAG needs a backward strategy: e.g. "
                "Scheduled(IFT(solver=ConjugateGradientAdjoint())) for HOAG, Shine(), "
                "JacobianFree() or Scheduled(Refine(Shine(), solver=ConjugateGradientAdjoint()))"
            )
        if self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"bounds must be (low, high) with low < high, got {self.bounds}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter (outer iterations) must be >= 1, got {self.max_iter}")
        if self.max_inner_iter < 1:
            raise ValueError(f"max_inner_iter must be >= 1, got {self.max_inner_iter}")
        if not math.isfinite(self.lambda0):
            raise ValueError(f"lambda0 must be finite, got {self.lambda0}")
        if self.opa_countdown < 1:
            raise ValueError(f"opa_countdown must be >= 1, got {self.opa_countdown}")
        # the preset behaviours (step_rule, ..., opa_schedule) are `Literal[...] | None`
        # fields: check_fields above already rejected any value outside their choices
        if self.behaviour("inner_solver") == "scipy_lbfgsb" and (
            self.inner_memory != "restart" or self.solver.opa_every is not None
        ):
            raise ValueError(
                "inner_solver='scipy_lbfgsb' restarts its memory at every solve and has no OPA: "
                "it needs inner_memory='restart' and solver.opa_every=None (got inner_memory="
                f"{self.inner_memory!r}, opa_every={self.solver.opa_every}); use "
                "inner_solver='solver'"
            )

    def behaviour(self, name: str) -> str:
        """The effective value of ``name`` (a field, or the preset of ``mode`` when ``None``).

        Raises:
            KeyError: if ``name`` is not one of the preset behaviours.
        """
        if name not in _CHOICES:
            raise KeyError(f"unknown behaviour {name!r}; valid: {sorted(_CHOICES)}")
        value = getattr(self, name)
        if value is not None:
            return value
        if (
            self.mode == "faithful"
            and name in _FAITHFUL_PURE_PYTHON
            and (self.inner_memory != "restart" or self.solver.opa_every is not None)
        ):
            return _FAITHFUL_PURE_PYTHON[name]
        return _PRESETS[self.mode][name]

    @property
    def behaviours(self) -> dict[str, str]:
        """Every preset behaviour with its effective value (logged in run summaries)."""
        return {name: self.behaviour(name) for name in _CHOICES}

    def stepper(self, problem: BilevelProblem, w0: Tensor) -> HOAGStepper:
        """A fresh outer loop on ``problem`` from the inner initial point ``w0`` (``(p,)``)."""
        return HOAGStepper(self, problem, w0)


class HOAGStepper:
    """The state of one HOAG run; :meth:`step` performs one outer iteration.

    Args:
        config: the :class:`HOAG` settings.
        problem: the bi-level problem.
        w0: inner initial point ``(p,)`` (the authors draw it from ``N(0, I)``).
    """

    def __init__(self, config: HOAG, problem: BilevelProblem, w0: Tensor) -> None:
        self.cfg = config
        self.problem = problem
        inner = problem.inner
        self.lam = inner.initial_log_lambda(config.lambda0)
        self.lam0_min = float(self.lam.min())
        # tolerance_reference="aliased": the authors' "lambda0" is the iterate itself (None)
        # until the first rejected step freezes it at the rejected trial value
        self.lam0_alias: Tensor | None = None
        self.old_lam = self.lam.clone()
        self.w = w0.detach().to(dtype=inner.dtype, device=inner.device).clone()
        _, grad0 = inner.value_and_grad(self.w, self.lam)
        self.ref_norm = float(torch.linalg.vector_norm(grad0))
        self.memory: LBFGSMemory | None = None
        self.memory_lam = self.lam.clone()  # λ at which the memory's pairs were measured
        self.u: Tensor | None = None  # adjoint solution u = -q of the previous iteration
        self.lipschitz: float | None = None
        self.eps = config.tolerance.first()
        self.old_eps = self.eps
        self.g_old = math.inf
        self.iteration = 0
        # robust mode: the last accepted point and its hypergradient, and after a rejection the
        # outer loss of the point being re-evaluated
        self.accepted: dict[str, Any] | None = None
        self.retry_g: float | None = None

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        """Whether ``max_iter`` outer iterations were done."""
        return self.iteration >= self.cfg.max_iter

    @property
    def answer_w(self) -> Tensor:
        """The current inner solution (the model whose held-out loss is reported)."""
        return self.w

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (tensors, numbers, lists: checkpointable)."""
        return {
            "lam": self.lam,
            "old_lam": self.old_lam,
            "lam0_min": self.lam0_min,
            "lam0_alias": self.lam0_alias,
            "w": self.w,
            "ref_norm": self.ref_norm,
            "memory": memory_to_state(self.memory),
            "memory_lam": self.memory_lam,
            "u": self.u,
            "lipschitz": self.lipschitz,
            "eps": self.eps,
            "old_eps": self.old_eps,
            "g_old": self.g_old,
            "iteration": self.iteration,
            "accepted": self.accepted,
            "retry_g": self.retry_g,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors are moved to the problem's device)."""
        device = self.problem.inner.device

        def dev(t: Any) -> Any:
            return t.to(device) if isinstance(t, Tensor) else t

        self.lam, self.old_lam, self.w = dev(state["lam"]), dev(state["old_lam"]), dev(state["w"])
        self.lam0_min = float(state["lam0_min"])
        self.lam0_alias = dev(state.get("lam0_alias"))
        self.ref_norm = float(state["ref_norm"])
        mem = state["memory"]
        self.memory = (
            None if mem is None else memory_from_state({k: dev(v) for k, v in mem.items()})
        )
        self.memory_lam = dev(state["memory_lam"])
        self.u = dev(state["u"])
        self.lipschitz = state["lipschitz"]
        self.eps, self.old_eps = float(state["eps"]), float(state["old_eps"])
        self.g_old = float(state["g_old"])
        self.iteration = int(state["iteration"])
        acc = state["accepted"]
        self.accepted = None if acc is None else {k: dev(v) for k, v in acc.items()}
        self.retry_g = state["retry_g"]

    # ------------------------------------------------------------------ pieces
    def log_lambda_list(self) -> list[float]:
        """``λ`` as a list of floats (one per group)."""
        return [float(v) for v in self.lam.reshape(-1)]

    def _inner_solver(self, tol: float) -> LBFGS | ScipyLBFGSB:
        cfg = self.cfg
        if cfg.behaviour("inner_solver") == "scipy_lbfgsb":
            return ScipyLBFGSB(
                max_iter=cfg.max_inner_iter,
                tol=tol,
                memory=cfg.solver.memory,
                max_ls=cfg.solver.max_ls,
                stop_test=cfg.behaviour("inner_stop_test"),  # type: ignore[arg-type]
            )
        changes: dict[str, Any] = {
            "tol": tol,
            "rel_tol": 0.0,
            "max_iter": cfg.max_inner_iter,
            "stop_test": cfg.behaviour("inner_stop_test"),
        }
        if cfg.solver.opa_every is not None and cfg.behaviour("opa_schedule") == "countdown":
            changes["opa_every"] = max(1, (cfg.max_iter + 1 - self.iteration) // cfg.opa_countdown)
        if cfg.behaviour("inner_solver") == "authors_lbfgs":
            changes.update(AUTHORS_PURE_PYTHON_LBFGS)
        return replace(cfg.solver, **changes)

    def _opa_direction(self, lam: Tensor) -> Callable[[Tensor], Tensor] | None:
        if self.cfg.solver.opa_every is None:
            return None
        if self.cfg.opa_vector == "outer_gradient":
            return self.problem.outer.loss_grad
        inner = self.problem.inner

        def cross(w: Tensor) -> Tensor:
            d = inner.cross_derivative(w, lam)
            return d if d.dim() == 1 else d.sum(0)

        return cross

    def tolerance_factor(self) -> float:
        """``exp(min λ_ref - min λ_0)`` of the inner tolerance (``tolerance_reference``)."""
        reference = self.cfg.behaviour("tolerance_reference")
        if reference == "current":
            return math.exp(float(self.lam.min()) - self.lam0_min)
        if reference == "initial":
            return math.exp(float(self.old_lam.min()) - self.lam0_min)
        lam0 = self.lam if self.lam0_alias is None else self.lam0_alias
        return math.exp(float(self.old_lam.min()) - float(lam0.min()))

    def solve_inner(self, lam: Tensor) -> SolverResult:
        """L-BFGS on ``h(·, λ)`` from the current ``w`` to HOAG's tolerance; updates ``w``.

        The tolerance is ``ε_k ‖∇_w h(w_0, λ_0)‖ · tolerance_factor()``.
        """
        inner = self.problem.inner
        tol = self.eps * self.ref_norm * self.tolerance_factor()
        solver = self._inner_solver(tol)
        warm = None if self.cfg.inner_memory == "restart" else self.memory
        if warm is not None and self.cfg.inner_memory == "shift" and len(warm):
            y = inner.shift_curvature_pairs(warm.s, warm.y, self.memory_lam, lam)
            warm = LBFGSMemory(warm.s, y, list(warm.kinds or []), warm.gamma)
        res = solver(
            inner.objective(lam), self.w, opa_direction=self._opa_direction(lam), warm_start=warm
        )
        self.w = res.value
        self.memory = res.state
        self.memory_lam = lam.clone()
        return res

    def hypergradient(self, lam: Tensor, fwd: SolverResult) -> tuple[Tensor, Tensor, Any]:
        """Backward solve at the current ``w``; return ``(dL/dλ, u, adjoint stats)``."""
        inner, w = self.problem.inner, self.w
        outer_grad = self.problem.outer.loss_grad(w)
        strategy = backward_at(self.cfg.backward, self.eps)
        if self.cfg.behaviour("estimate") == "authors" and isinstance(fwd.state, LBFGSMemory):
            fwd = replace(fwd, inverse=self.authors_estimate(fwd))
        u0 = self.u if self.cfg.warm_start_backward else None
        if u0 is None and self.cfg.first_backward_start == "inner_solution":
            u0 = -w  # the authors' first CG starts from q = w, i.e. u = -w
        adj = strategy(inner.hvp_at(w, lam), -outer_grad, fwd, u0=u0)
        grad = inner.cross_vjp(w, lam, adj.value)
        return grad, adj.value, adj.stats

    def authors_estimate(self, fwd: SolverResult) -> Any:
        """The inverse-Hessian estimate the authors' SHINE used after the inner solve ``fwd``.

        With ``inner_memory="restart"`` (their Fortran L-BFGS-B, Figures 1 and E.1): SciPy's
        ``LbfgsInvHessProduct`` on the workspace, ``H0 = I`` and circular storage order; with a
        kept memory (their pure-Python L-BFGS, Figures 2 left and E.2): the two-loop recursion
        with ``H0 = I`` on the pairs oldest first.
        """
        memory = fwd.state
        circular = self.cfg.inner_memory == "restart"
        n_committed = int(fwd.stats.extra.get("n_committed", len(memory)))
        return lbfgsb_workspace_inverse(memory, n_committed, workspace_order=circular)

    def _clip(self, lam: Tensor) -> Tensor:
        return lam.clamp(self.cfg.bounds[0], self.cfg.bounds[1])

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, Any]:
        """One outer iteration; returns its metrics (time split, losses, counters)."""
        self.iteration += 1
        it = self.iteration
        lam = self.lam.clone()
        t0 = time.perf_counter()
        fwd = self.solve_inner(lam)
        t1 = time.perf_counter()
        g = float(self.problem.outer.loss(self.w))
        metrics: dict[str, Any] = {
            "outer_loss": g,
            "inner_iters": int(fwd.stats.nstep),
            "inner_evals": int(fwd.stats.n_evals),
            "inner_grad_norm": float(fwd.stats.residual),
            "inner_converged": bool(fwd.stats.converged),
            "tolerance": self.eps,
            "inner_time": t1 - t0,
            "n_opa_updates": int(fwd.stats.extra.get("n_opa_updates", 0)),
        }
        if self.cfg.behaviour("step_rule") == "authors":
            metrics.update(self._authors_update(lam, fwd, g, it))
        else:
            metrics.update(self._safeguarded_update(lam, fwd, g, it))
        metrics["lipschitz"] = self.lipschitz
        metrics["log_lambda"] = self.log_lambda_list()
        return metrics

    def _backward_metrics(self, lam: Tensor, fwd: SolverResult) -> tuple[Tensor, dict]:
        t0 = time.perf_counter()
        grad, u, stats = self.hypergradient(lam, fwd)
        dt = time.perf_counter() - t0
        self.u = u
        out = {
            "backward_time": dt,
            "backward_iters": int(stats.nstep),
            "backward_hvps": int(stats.n_vjps),
            "hypergradient": [float(v) for v in grad.reshape(-1)],
        }
        return grad, out

    def _authors_update(self, lam: Tensor, fwd: SolverResult, g: float, it: int) -> dict:
        grad, out = self._backward_metrics(lam, fwd)
        self.old_eps = self.eps
        self.eps = self.cfg.tolerance.next(self.eps, it)
        gnorm = float(torch.linalg.vector_norm(grad))
        out["rejected"] = False
        if gnorm == 0.0:
            logger.info("HOAG: zero hypergradient at iteration %d; skipping the update", it)
            out["skipped"] = True
            return out
        if self.lipschitz is None:
            self.lipschitz = gnorm / math.sqrt(grad.numel()) if gnorm > 1e-3 else 1.0
        step = 1.0 / self.lipschitz
        self.old_lam = lam.clone()
        new = self._clip(lam - step * grad)
        incr = float(torch.linalg.vector_norm(step * grad))
        c = self.cfg.step_c
        bound = (
            self.g_old
            + c * self.eps
            + self.old_eps * (c + 1.0) * incr
            - self.lipschitz * incr * incr
        )
        if g <= bound:
            self.lipschitz *= 0.95
            new = new - step * grad  # the authors' second step (quirk kept in faithful mode)
        elif g >= self.cfg.reject_factor * self.g_old:
            self.lipschitz *= 2.0
            if self.lam0_alias is None:  # the authors' "lambda0" stays at the rejected trial
                self.lam0_alias = new.clone()
            new = self.old_lam.clone()
            self.eps *= 0.5
            out["rejected"] = True
            logger.info(
                "HOAG: step rejected at iteration %d (%.6g >= %g x %.6g)",
                it,
                g,
                self.cfg.reject_factor,
                self.g_old,
            )
        else:
            self.old_lam = new.clone()
            new = new - step * grad
        self.lam = self._clip(new)
        self.g_old = g
        return out

    def _safeguarded_update(self, lam: Tensor, fwd: SolverResult, g: float, it: int) -> dict:
        acc = self.accepted
        out: dict[str, Any] = {"rejected": False}
        # self.lipschitz is set with the first accepted point (below): not None once acc is
        if acc is not None and g > acc["g"] + self.cfg.step_c * self.eps * abs(acc["g"]):
            # the last step increased the outer loss: undo it, shorten the next step and tighten
            # ε; the hypergradient at the accepted point is then recomputed at the tighter ε
            # (an inexact hypergradient may point the wrong way: reusing it would fail forever)
            self.lipschitz *= 2.0
            self.eps = max(self.eps * 0.5, self.cfg.tolerance.floor)
            if self.lam0_alias is None:
                self.lam0_alias = lam.clone()
            self.w = acc["w"].clone()
            self.lam = acc["lam"].clone()
            self.old_lam = self.lam.clone()
            self.accepted = None
            self.retry_g = acc["g"]
            out.update(backward_time=0.0, backward_iters=0, backward_hvps=0, rejected=True)
            logger.info(
                "HOAG(robust): step rejected at iteration %d (%.6g > %.6g)", it, g, acc["g"]
            )
            self.g_old = g
            return out
        grad, bw = self._backward_metrics(lam, fwd)
        out.update(bw)
        if acc is not None:
            predicted = float(torch.dot(acc["grad"].reshape(-1), acc["grad"].reshape(-1)))
            if acc["g"] - g >= self.cfg.step_c * predicted / self.lipschitz:
                self.lipschitz *= 0.95  # sufficient decrease: allow longer steps
        # after a rejection the loss to beat stays the one of the accepted point
        g_ref = min(g, self.retry_g) if self.retry_g is not None else g
        self.retry_g = None
        self.accepted = {"lam": lam.clone(), "g": g_ref, "grad": grad.clone(), "w": self.w.clone()}
        self.eps = self.cfg.tolerance.next(self.eps, it)
        gnorm = float(torch.linalg.vector_norm(grad))
        if self.lipschitz is None:
            self.lipschitz = gnorm / math.sqrt(grad.numel()) if gnorm > 1e-3 else 1.0
        delta = grad / self.lipschitz
        dnorm = float(torch.linalg.vector_norm(delta))
        if dnorm > self.cfg.max_step:
            delta = delta * (self.cfg.max_step / dnorm)
        self.old_lam = lam.clone()
        self.lam = self._clip(lam - delta)
        self.g_old = g
        return out
