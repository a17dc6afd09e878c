"""Grid search and random search over the log-regularisation (baselines of Figures 1 and E.1).

Each outer step evaluates one candidate ``λ``: an L-BFGS solve of ``h(·, λ)`` warm-started from
the previous solution, to ``rel_tol`` times the gradient norm at that warm start (the authors'
``hoag_lbfgs(only_fit=True)``: tolerance 1e-3, memory 10), then the outer loss. The best
candidate so far (lowest outer loss) is the answer; its inner solution is what the held-out
loss of a record is computed on.

* :class:`GridSearch`: ``n_points`` values ``linspace(low, high)`` in increasing order.
* :class:`RandomSearch`: ``n_points`` values drawn uniformly in ``[low, high]`` (seeded).

(The authors' ``shine`` branch swapped the two labels; here each name means what it says.)

``mode="faithful"`` (default) runs each inner solve with SciPy's L-BFGS-B
(:class:`shine.solvers.ScipyLBFGSB`, the tolerance tested at every evaluation, as the authors'
``hoag_lbfgs``) and draws the random candidates as their code did
(``RandomState(seed).uniform(low, high, n_points)``); ``mode="robust"`` runs ``solver`` (our
PyTorch L-BFGS) and draws from a torch generator seeded from ``seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from shine.bilevel.hoag import BilevelProblem
from shine.rng import derived_seed
from shine.solvers.lbfgs import LBFGS
from shine.solvers.scipy_lbfgsb import ScipyLBFGSB
from shine.validation import check_fields


@dataclass(frozen=True)
class _Search:
    """Shared settings of the search baselines.

    Attributes:
        solver: inner L-BFGS (``tol`` is replaced by ``rel_tol`` × the warm-start gradient).
        n_points: number of candidates (10 in the paper).
        low: smallest log-regularisation.
        high: largest log-regularisation.
        rel_tol: relative tolerance of each inner solve.
        warm_start: start each solve from the previous solution (else from ``w0``).
        mode: ``"faithful"`` or ``"robust"`` (see the module docstring).
        name: label of the method in logs, run summaries and figures.
    """

    solver: LBFGS = field(default_factory=lambda: LBFGS(memory=10, max_iter=1000))
    n_points: int = 10
    low: float = -12.0
    high: float = 12.0
    rel_tol: float = 1e-3
    warm_start: bool = True
    mode: Literal["faithful", "robust"] = "faithful"
    name: str = "search"

    kind = "grid"

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on an empty range or no candidates.
        """
        check_fields(self, minimum={"n_points": 1})
        if not self.low < self.high:
            raise ValueError(f"need low < high, got low={self.low}, high={self.high}")

    def inner_solver(self, tol: float) -> LBFGS | ScipyLBFGSB:
        """The solver of one candidate's inner problem, to the absolute tolerance ``tol``."""
        if self.mode == "faithful":
            return ScipyLBFGSB(
                max_iter=self.solver.max_iter,
                tol=tol,
                memory=self.solver.memory,
                max_ls=self.solver.max_ls,
            )
        return replace(self.solver, tol=tol, rel_tol=0.0)

    @property
    def max_iter(self) -> int:
        """Number of outer steps (one per candidate)."""
        return self.n_points

    def candidates(self, seed: int) -> list[float]:
        """The values of ``λ`` to try, in order."""
        raise NotImplementedError

    def stepper(self, problem: BilevelProblem, w0: Tensor, seed: int = 0) -> SearchStepper:
        """A fresh search on ``problem`` from ``w0``; ``seed`` draws random candidates."""
        return SearchStepper(self, problem, w0, self.candidates(seed))


@dataclass(frozen=True)
class GridSearch(_Search):
    """Regular grid ``linspace(low, high, n_points)`` of the log-regularisation."""

    kind = "grid"

    def candidates(self, seed: int) -> list[float]:
        """Evenly spaced values, increasing."""
        return torch.linspace(self.low, self.high, self.n_points, dtype=torch.float64).tolist()


@dataclass(frozen=True)
class RandomSearch(_Search):
    """Uniform random candidates in ``[low, high]`` (Bergstra & Bengio 2012)."""

    kind = "random"

    def candidates(self, seed: int) -> list[float]:
        """``n_points`` uniform draws seeded by ``seed`` (see the module docstring)."""
        if self.mode == "faithful":
            draws = np.random.RandomState(seed).uniform(self.low, self.high, self.n_points)
            return [float(v) for v in draws]
        gen = torch.Generator().manual_seed(derived_seed(seed, 7919))
        draws = torch.rand(self.n_points, generator=gen, dtype=torch.float64)
        return (self.low + (self.high - self.low) * draws).tolist()


class SearchStepper:
    """State of a grid or random search; :meth:`step` evaluates the next candidate.

    Args:
        config: the search settings.
        problem: the bi-level problem.
        w0: initial inner point ``(p,)``.
        candidates: the values of ``λ`` to evaluate, in order.
    """

    def __init__(
        self, config: _Search, problem: BilevelProblem, w0: Tensor, candidates: list[float]
    ) -> None:
        self.cfg = config
        self.problem = problem
        inner = problem.inner
        if inner.groups is not None:
            raise ValueError("grid/random search tunes a single λ; use a problem without groups")
        self.candidates = list(candidates)
        self.w0 = w0.detach().to(dtype=inner.dtype, device=inner.device).clone()
        self.w = self.w0.clone()
        self.best_w = self.w0.clone()
        self.best_lam = inner.initial_log_lambda(0.0)
        self.best_loss = math.inf
        self.iteration = 0

    @property
    def finished(self) -> bool:
        """Whether every candidate was evaluated."""
        return self.iteration >= len(self.candidates)

    @property
    def lam(self) -> Tensor:
        """The best ``λ`` so far."""
        return self.best_lam

    @property
    def answer_w(self) -> Tensor:
        """The inner solution of the best ``λ`` so far (``w0`` before the first step)."""
        return self.best_w

    def log_lambda_list(self) -> list[float]:
        """Best ``λ`` so far as a one-element list."""
        return [float(self.best_lam)]

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state."""
        return {
            "w": self.w,
            "best_w": self.best_w,
            "best_lam": self.best_lam,
            "best_loss": self.best_loss,
            "iteration": self.iteration,
            "candidates": self.candidates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        device = self.problem.inner.device
        self.w = state["w"].to(device)
        self.best_w = state["best_w"].to(device)
        self.best_lam = state["best_lam"].to(device)
        self.best_loss = float(state["best_loss"])
        self.iteration = int(state["iteration"])
        self.candidates = [float(c) for c in state["candidates"]]

    def step(self) -> dict[str, Any]:
        """Evaluate the next candidate; return its metrics."""
        inner = self.problem.inner
        lam_value = self.candidates[self.iteration]
        self.iteration += 1
        lam = inner.initial_log_lambda(lam_value)
        start = self.w if self.cfg.warm_start else self.w0
        _, grad = inner.value_and_grad(start, lam)
        tol = self.cfg.rel_tol * float(torch.linalg.vector_norm(grad))
        t0 = time.perf_counter()
        res = self.cfg.inner_solver(tol)(inner.objective(lam), start)
        dt = time.perf_counter() - t0
        self.w = res.value
        loss = float(self.problem.outer.loss(self.w))
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_lam, self.best_w = loss, lam, self.w.clone()
        return {
            "candidate_log_lambda": lam_value,
            "candidate_outer_loss": loss,
            "outer_loss": self.best_loss,
            "improved": improved,
            "inner_iters": int(res.stats.nstep),
            "inner_evals": int(res.stats.n_evals),
            "inner_time": dt,
            "backward_time": 0.0,
            "log_lambda": self.log_lambda_list(),
        }


SearchKind = Literal["grid", "random"]
