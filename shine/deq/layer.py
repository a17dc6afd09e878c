"""Deep equilibrium layer with a pluggable forward solver and backward strategy.

Forward: solve ``z* = f(z*, x)``, i.e. the root of ``g(z) = f(z, x) - z``, without building a
graph, then take one differentiable step ``z_out = f(z*, x)``. Backward: the gradient ``∂L/∂z_out``
arriving at that step is replaced by the implicit one ``u = ∂L/∂z (I - J_f(z*))^{-1}``, computed by
the backward strategy from the adjoint system ``uᵀ J_g(z*) = -∂L/∂zᵀ`` (paper eq. 3), and
autograd carries ``uᵀ ∂f/∂θ`` and ``uᵀ ∂f/∂x`` on to the parameters and the input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from shine.backward.base import AdjointResult, BackwardStrategy
from shine.deq.flatten import State, StatePacker, zeros_like_state
from shine.solvers.base import RootSolver, SolverResult

logger = logging.getLogger(__name__)


class DEQLayer(nn.Module):
    """``z = DEQLayer(f, solver, backward)(x)``: the equilibrium ``z = f(z, x)`` as a layer.

    Args:
        f: the equilibrium function ``f(z, x) -> z``; a module (its parameters are registered) or
            any callable. ``z`` is a tensor or a list/tuple of tensors (multi-scale state) sharing
            the batch dimension; ``f`` must return the same structure, shapes and dtypes (no
            autocast inside ``f``: the implicit backward strategies solve their adjoint in the
            state's dtype, and only :class:`~shine.backward.JacobianFree` tolerates a
            mixed-precision ``f``; cast the whole model instead).
        solver: forward root solver, e.g. ``Broyden(max_iter=30, tol=1e-6, memory=30)``.
        backward: backward strategy, e.g. ``Shine()``, ``IFT(max_iter=20)``.

    The output is ``f(z*, x)``, one step after the solver's ``z*`` (so train and eval agree and
    the graph spans exactly one application of ``f``). Statistics of the last call are kept in
    :attr:`last_forward` (:class:`~shine.solvers.base.SolverResult`) and of the last backward in
    :attr:`last_backward` (:class:`~shine.backward.base.AdjointResult`) with its wall time in
    :attr:`last_backward_time` (seconds, not synchronised with CUDA).
    """

    def __init__(
        self,
        f: nn.Module | Callable[[State, Any], State],
        solver: RootSolver,
        backward: BackwardStrategy,
    ) -> None:
        super().__init__()
        self.f = f
        self.solver = solver
        self.backward = backward
        self.last_forward: SolverResult | None = None
        self.last_backward: AdjointResult | None = None
        self.last_backward_time: float | None = None

    def extra_repr(self) -> str:
        """Show the solver and strategy in ``print(model)``."""
        return f"solver={self.solver!r}, backward={self.backward!r}"

    def solve(
        self,
        x: Any,
        z0: State | None = None,
        outer_grad: Callable[[State], State] | None = None,
    ) -> tuple[Tensor, StatePacker]:
        """Run the forward solver only (no graph).

        Args:
            x: the input (injection), passed to ``f`` unchanged.
            z0: initial state; zeros shaped like ``x`` by default.
            outer_grad: ``z -> ∂L/∂z`` (same structure as ``z``) for solvers with OPA.

        Returns:
            ``z*`` flattened to ``(B, D)`` and the packer that restores its structure.
        """
        if z0 is None:
            if not isinstance(x, Tensor | list | tuple):
                raise ValueError("DEQLayer needs z0 when x is not a tensor or list of tensors")
            z0 = zeros_like_state(x)
        packer = StatePacker.like(z0)

        def g(zf: Tensor) -> Tensor:
            return packer.flatten(self.f(packer.unflatten(zf), x)) - zf

        # drop the previous result first: its inverse estimate (the U, V factors) would otherwise
        # stay alive during this solve, doubling the estimate's share of the peak memory
        self.last_forward = None
        kwargs: dict[str, Any] = {}
        if outer_grad is not None:
            kwargs["outer_grad"] = lambda zf: packer.flatten(outer_grad(packer.unflatten(zf)))
        with torch.no_grad():
            result = self.solver(g, packer.flatten(z0).detach(), **kwargs)
        self.last_forward = result
        return result.value, packer

    def forward(
        self,
        x: Any,
        z0: State | None = None,
        outer_grad: Callable[[State], State] | None = None,
    ) -> State:
        """Return ``f(z*, x)`` with implicit gradients; see the class docstring.

        Args:
            x: input of ``f`` (tensor, list of tensors or any object ``f`` accepts).
            z0: initial state (default zeros shaped like ``x``; give it for other shapes).
            outer_grad: ``z -> ∂L/∂z``, needed by forward solvers with OPA (adjoint Broyden).
        """
        z_star, packer = self.solve(x, z0, outer_grad)
        if not torch.is_grad_enabled():
            with torch.no_grad():
                return self.f(packer.unflatten(z_star), x)
        z_leaf = z_star.detach().requires_grad_(True)
        fz = packer.flatten(self.f(packer.unflatten(z_leaf), x))
        fwd = self.last_forward

        def vjp(u: Tensor) -> Tensor:
            # J_gᵀ u = J_fᵀ u - u, through the retained graph of the differentiable step
            return torch.autograd.grad(fz, z_leaf, u, retain_graph=True)[0] - u

        def implicit_grad(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # undefined incoming gradient: nothing to correct
                return None
            start = time.perf_counter()
            out = self.backward(vjp, -grad, fwd)
            self.last_backward_time = time.perf_counter() - start
            self.last_backward = out
            return out.value.to(grad.dtype)

        if not fz.requires_grad:
            return packer.unflatten(fz)
        # the hook sits on an identity node after fz, so that the VJPs of the backward solve,
        # which start at fz, do not trigger it again
        out = fz.view_as(fz)
        out.register_hook(implicit_grad)
        return packer.unflatten(out)
