"""HOAG's configuration contract and the stepper's bookkeeping (module docstring of
:mod:`shine.bilevel.hoag`).

* the tolerance schedules ``ε_k`` per outer iteration (exponential, quadratic, cubic, exact) and
  the validation of :class:`ToleranceSchedule`, :class:`Scheduled` and :class:`HOAG`: every
  invalid setting fails naming the field, every valid boundary value is accepted;
* the behaviour table of the two presets (``mode``) and what each behaviour hands the inner
  problem: SciPy's L-BFGS-B with the ``memory`` / ``max_ls`` of ``solver``, the authors'
  pure-Python L-BFGS settings, the OPA countdown ``max(1, (maxiter - it) // opa_freq_coef)`` of
  their code (``maxiter = max_iter + 1``);
* the inner tolerance ``ε_k ‖∇_w h(w_0, λ_0)‖ exp(min λ_ref - min λ_0)`` for each
  ``tolerance_reference``, with ``‖∇_w h(0, λ)‖ = ‖Xᵀy‖/2`` for the logistic loss;
* the start of each backward solve (``warm_start_backward``, ``first_backward_start``), the
  backward metrics against an independent count of Hessian-vector products;
* checkpoints: a fresh stepper, a robust one after a rejection, the L-BFGS memory (kinds and
  ``γ``), and tensors moved to the problem's device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import pytest
import torch
from test_bilevel import make_problem

from shine.backward import IFT, ConjugateGradientAdjoint, JacobianFree, Shine
from shine.bilevel import HOAG, BilevelProblem, L2Regularized, LogisticLoss, Scheduled
from shine.bilevel.hoag import TOL_FLOOR, ToleranceSchedule, memory_from_state, memory_to_state
from shine.solvers import LBFGS, LBFGSMemory, ScipyLBFGSB

DT = torch.float64
CG = ConjugateGradientAdjoint()


def zeros() -> torch.Tensor:
    return torch.zeros(10, dtype=DT)


@dataclass(frozen=True)
class RecordingLBFGS(LBFGS):
    """An LBFGS that records, for each inner solve, itself (its settings), the OPA direction
    and the warm-start memory it was called with."""

    calls: list = field(default_factory=list, compare=False)

    def __call__(self, fun, z0, *, opa_direction=None, warm_start=None):
        self.calls.append({"solver": self, "opa": opa_direction, "warm": warm_start})
        return super().__call__(fun, z0, opa_direction=opa_direction, warm_start=warm_start)


class RecordingIFT:
    """The exact backward (CG to 1e-10) recording the start ``u0`` and the inner solution it
    receives, its solution, and the Hessian-vector products it really evaluates."""

    def __init__(self) -> None:
        self.starts: list = []
        self.w: list = []
        self.values: list = []
        self.hvps: list = []
        self.nsteps: list = []

    def __call__(self, vjp, rhs, fwd, *, u0=None):
        self.starts.append(None if u0 is None else u0.clone())
        self.w.append(fwd.value.clone())
        count = [0]

        def counted(v):
            count[0] += 1
            return vjp(v)

        out = IFT(solver=CG, max_iter=500, tol=1e-10)(counted, rhs, fwd, u0=u0)
        self.values.append(out.value.clone())
        self.hvps.append(count[0])
        self.nsteps.append(int(out.stats.nstep))
        return out


# ---------------------------------------------------------------------------- schedules
def test_tolerance_schedules_per_iteration():
    """``ε`` after outer iteration ``k``: ``ε_0/k²``, ``ε_0/k³``, the floor, never below it."""
    cubic = ToleranceSchedule(kind="cubic", initial=1e-3)
    quadratic = ToleranceSchedule(kind="quadratic", initial=1e-3)
    for k in (1, 2, 3, 5):
        # the schedules depend on k only, not on the ε they are given
        assert cubic.next(0.5, k) == pytest.approx(1e-3 / k**3, rel=1e-14)
        assert quadratic.next(0.5, k) == pytest.approx(1e-3 / k**2, rel=1e-14)
    assert cubic.first() == 1e-3
    assert ToleranceSchedule(kind="cubic", initial=1e-9).next(1e-9, 100) == TOL_FLOOR  # 1e-15
    exact = ToleranceSchedule(kind="exact", floor=1e-8)
    assert exact.first() == 1e-8
    assert exact.next(1e-3, 1) == exact.next(1e-8, 7) == 1e-8
    assert ToleranceSchedule(kind="exact").next(1e-3, 2) == TOL_FLOOR
    # decrease = 1 is valid: a constant tolerance
    assert ToleranceSchedule(decrease=1.0).next(1e-3, 4) == 1e-3


def test_tolerance_schedule_rejects_out_of_range_constants():
    for initial in (0.0, -1e-3):
        with pytest.raises(ValueError, match=r"ToleranceSchedule\.initial must be > 0"):
            ToleranceSchedule(initial=initial)
    for decrease in (0.0, -0.5, 1.5, 2.0):
        with pytest.raises(ValueError, match=r"decrease must be in \(0, 1\]"):
            ToleranceSchedule(decrease=decrease)
    ToleranceSchedule(initial=1e-300, decrease=1e-9)  # tiny but valid


def test_scheduled_validates_its_fields():
    ift = IFT(solver=CG)
    with pytest.raises(ValueError, match=r"Scheduled\.min_steps must be >= 0, got -1"):
        Scheduled(ift, steps_field="max_iter", min_steps=-1)
    for scale in (0.0, -100.0):
        with pytest.raises(ValueError, match=r"Scheduled\.steps_scale must be > 0"):
            Scheduled(ift, steps_field="max_iter", steps_scale=scale)
    with pytest.raises(TypeError, match=r"Scheduled\.min_steps must be int"):
        Scheduled(ift, steps_field="max_iter", min_steps=2.5)
    # the boundary min_steps = 0 is the authors' refine rule: 0 iterations while ε >= 1e-4
    sched = Scheduled(ift, steps_field="max_iter", min_steps=0)
    assert sched.at(1e-3).max_iter == 0  # floor(1 / (100 · 1e-3^0.5)) = 0
    assert sched.at(1e-6).max_iter == 10


# ---------------------------------------------------------------------------- HOAG settings
def test_hoag_rejects_invalid_settings_naming_them():
    backwards = (
        r"HOAG needs a backward strategy: e\.g\. "
        r"Scheduled\(IFT\(solver=ConjugateGradientAdjoint\(\)\)\) for HOAG, Shine\(\), "
        r"JacobianFree\(\) or Scheduled\(Refine\(Shine\(\), "
        r"solver=ConjugateGradientAdjoint\(\)\)\)"
    )
    with pytest.raises(ValueError, match=backwards):
        HOAG()
    shine = Shine()
    for name in ("step_c", "max_step"):
        with pytest.raises(ValueError, match=rf"HOAG\.{name} must be > 0"):
            HOAG(backward=shine, **{name: 0.0})
    with pytest.raises(ValueError, match=r"bounds must be \(low, high\) with low < high"):
        HOAG(backward=shine, bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="max_inner_iter must be >= 1, got 0"):
        HOAG(backward=shine, max_inner_iter=0)
    for name in ("step_rule", "tolerance_reference", "estimate", "inner_solver"):
        with pytest.raises(ValueError, match=rf"HOAG\.{name} must be one of '.* or None, got 'x'"):
            HOAG(backward=shine, **{name: "x"})
    # boundary values that are valid
    HOAG(backward=shine, max_inner_iter=1, max_iter=1, bounds=(0.0, 1e-9))


def test_scipy_inner_solver_needs_a_restarted_memory_and_no_opa():
    needs = (
        r"inner_solver='scipy_lbfgsb' restarts its memory at every solve and has no OPA: it "
        r"needs inner_memory='restart' and solver\.opa_every=None \(got inner_memory={}, "
        r"opa_every={}\); use inner_solver='solver'"
    )
    for mode in ("faithful", "robust"):
        with pytest.raises(ValueError, match=needs.format("'keep'", "None")):
            HOAG(backward=Shine(), mode=mode, inner_solver="scipy_lbfgsb", inner_memory="keep")
        with pytest.raises(ValueError, match=needs.format("'restart'", "3")):
            HOAG(
                solver=LBFGS(memory=30, opa_every=3),
                backward=Shine(),
                mode=mode,
                inner_solver="scipy_lbfgsb",
            )
        HOAG(backward=Shine(), mode=mode, inner_solver="scipy_lbfgsb")  # restart, no OPA: valid


FAITHFUL = {
    "step_rule": "authors",
    "tolerance_reference": "aliased",
    "estimate": "authors",
    "inner_solver": "scipy_lbfgsb",
    "inner_stop_test": "every_evaluation",
    "opa_schedule": "countdown",
}
#: faithful with a kept memory or OPA: their pure-Python L-BFGS, tested at accepted iterates
FAITHFUL_PURE_PYTHON = FAITHFUL | {"inner_solver": "authors_lbfgs", "inner_stop_test": "iterates"}
ROBUST = {
    "step_rule": "safeguarded",
    "tolerance_reference": "current",
    "estimate": "solver",
    "inner_solver": "solver",
    "inner_stop_test": "iterates",
    "opa_schedule": "fixed",
}


@pytest.mark.parametrize(
    ("inner_memory", "opa_every", "faithful"),
    [
        ("restart", None, FAITHFUL),
        ("keep", None, FAITHFUL_PURE_PYTHON),
        ("shift", None, FAITHFUL_PURE_PYTHON),
        ("restart", 5, FAITHFUL_PURE_PYTHON),
    ],
)
def test_preset_behaviours_follow_the_table_of_the_module_docstring(
    inner_memory, opa_every, faithful
):
    solver = LBFGS(memory=30, opa_every=opa_every)
    kw = {"solver": solver, "backward": Shine(), "inner_memory": inner_memory}
    assert HOAG(**kw).behaviours == faithful
    assert HOAG(mode="robust", **kw).behaviours == ROBUST
    # a field that is set overrides the preset
    assert HOAG(inner_stop_test="every_evaluation", **kw).behaviour("inner_stop_test") == (
        "every_evaluation"
    )
    with pytest.raises(KeyError, match="unknown behaviour 'max_iter'"):
        HOAG(**kw).behaviour("max_iter")


# ---------------------------------------------------------------------------- inner solvers
def inner_solver_at(method: HOAG, iterations, tol: float = 1e-5) -> list:
    """The solver that each outer iteration ``k`` (1-based) runs on the inner problem."""
    stepper = method.stepper(make_problem(), zeros())
    out = []
    for k in iterations:
        stepper.iteration = k  # step() increments the counter before the inner solve
        out.append(stepper._inner_solver(tol))
    return out


def test_scipy_lbfgsb_runs_with_the_memory_and_line_search_of_the_solver():
    solver = LBFGS(memory=7, max_ls=13, max_iter=5, tol=1.0)
    method = HOAG(solver=solver, backward=Shine(), max_inner_iter=77)
    (got,) = inner_solver_at(method, [1])
    assert got == ScipyLBFGSB(
        max_iter=77, tol=1e-5, memory=7, max_ls=13, stop_test="every_evaluation"
    )
    (got,) = inner_solver_at(replace(method, inner_stop_test="iterates"), [1])
    assert got == ScipyLBFGSB(max_iter=77, tol=1e-5, memory=7, max_ls=13, stop_test="iterates")


USER_SOLVER = LBFGS(
    memory=7,
    max_ls=13,
    max_iter=5,
    tol=1.0,
    rel_tol=1e-3,
    scale_gamma=True,
    c2=0.5,
    curvature_check=True,
    min_iter=0,
    noise_floor=10.0,
)


def test_authors_pure_python_lbfgs_settings_replace_those_of_the_solver():
    # hoag/lbfgs.py: H0 = I (no γ), c1 = 1e-4, c2 = 9e-4, no curvature check, at least one
    # iteration, their OPA rule and rescaling, no noise floor; memory and max_ls stay the user's
    method = HOAG(solver=USER_SOLVER, backward=Shine(), inner_memory="keep", max_inner_iter=77)
    (got,) = inner_solver_at(method, [1])
    authors = LBFGS(
        memory=7,
        max_ls=13,
        max_iter=77,
        tol=1e-5,
        rel_tol=0.0,
        stop_test="iterates",
        scale_gamma=False,
        c1=1e-4,
        c2=9e-4,
        curvature_check=False,
        min_iter=1,
        opa_schedule="authors",
        opa_normalize=True,
        noise_floor=0.0,
    )
    assert got == authors
    # inner_solver="solver": the solver as configured, only tol / max_iter / stop test set
    (got,) = inner_solver_at(replace(method, mode="robust"), [1])
    assert got == replace(USER_SOLVER, tol=1e-5, rel_tol=0.0, max_iter=77, stop_test="iterates")


def test_opa_countdown_is_the_authors_maxiter_minus_it_over_their_coefficient():
    opa = LBFGS(memory=60, opa_every=5)
    # logistic regression: maxiter = 30, freq = maxiter - it = 29, 28, ..., 1
    method = HOAG(solver=opa, backward=Shine(), max_iter=29)
    got = [s.opa_every for s in inner_solver_at(method, range(1, 30))]
    assert got == list(range(29, 0, -1))
    # NLS: maxiter = 50, opa_freq_coef = 4: max(1, (50 - it) // 4)
    method = HOAG(solver=opa, backward=Shine(), max_iter=49, opa_countdown=4)
    got = [s.opa_every for s in inner_solver_at(method, range(1, 50))]
    assert got == [max(1, (50 - it) // 4) for it in range(1, 50)]
    assert got[:5] == [12, 12, 11, 11, 11] and got[-6:] == [1] * 6
    # the fixed schedule keeps the solver's own frequency; no OPA stays no OPA
    fixed = [s.opa_every for s in inner_solver_at(replace(method, mode="robust"), [1, 30, 49])]
    assert fixed == [5, 5, 5]
    no_opa = HOAG(backward=Shine(), inner_memory="keep", max_iter=49, opa_countdown=4)
    assert [s.opa_every for s in inner_solver_at(no_opa, [1, 48])] == [None, None]


# ---------------------------------------------------------------------------- tolerances
def test_inner_tolerance_is_eps_times_the_initial_gradient_norm_times_the_factor():
    """Robust mode (``tolerance_reference="current"``): solve ``k`` at ``λ_k`` runs to
    ``ε_k ‖∇_w h(w_0, λ_0)‖ exp(λ_k - λ_0)``, and meets it."""
    problem = make_problem()
    data = problem.inner.data_loss
    # logistic loss at w0 = 0: ∇ = -Xᵀy σ(0) = -Xᵀy / 2 (the regulariser's gradient vanishes)
    ref = float(torch.linalg.vector_norm(data.X.mT @ data.y)) / 2
    spy = RecordingLBFGS(memory=10)
    method = HOAG(solver=spy, backward=JacobianFree(), mode="robust", lambda0=-1.0, max_iter=3)
    stepper = method.stepper(problem, zeros())
    lam = -1.0
    for k in range(3):
        m = stepper.step()
        tol = spy.calls[k]["solver"].tol
        assert tol == pytest.approx(m["tolerance"] * ref * math.exp(lam + 1.0), rel=1e-12)
        assert m["inner_grad_norm"] <= tol
        lam = m["log_lambda"][0]
    assert lam != -1.0  # the factor was not 1 throughout


@pytest.mark.parametrize("mode", ["faithful", "robust"])
def test_tolerance_factor_of_each_reference(mode):
    """``exp(min λ_ref - min λ_0)`` on three groups: ``current`` reads ``λ_k``, ``initial``
    the ``λ`` before the last step (``old_lam``) against the fixed ``λ_0``; ``aliased`` the
    same against the iterate itself, or against the value frozen by the first rejection."""
    groups = torch.arange(10) % 3
    problem = make_problem(groups=groups)
    base = HOAG(backward=Shine(), mode=mode, lambda0=-1.0)
    lam = torch.tensor([0.5, -0.3, 1.0], dtype=DT)
    old = torch.tensor([-2.0, 0.4, 0.0], dtype=DT)

    def factor(**kw):
        stepper = replace(base, **kw).stepper(problem, zeros())
        assert stepper.lam0_min == -1.0
        stepper.lam, stepper.old_lam = lam.clone(), old.clone()
        return stepper, stepper.tolerance_factor()

    default = {"faithful": math.exp(-2.0 + 0.3), "robust": math.exp(-0.3 + 1.0)}[mode]
    assert factor()[1] == pytest.approx(default, rel=1e-14)
    assert factor(tolerance_reference="current")[1] == pytest.approx(math.exp(0.7), rel=1e-14)
    assert factor(tolerance_reference="initial")[1] == pytest.approx(math.exp(-1.0), rel=1e-14)
    stepper, aliased = factor(tolerance_reference="aliased")
    assert aliased == pytest.approx(math.exp(-2.0 + 0.3), rel=1e-14)
    stepper.lam0_alias = torch.tensor([3.0, 2.5, 4.0], dtype=DT)
    assert stepper.tolerance_factor() == pytest.approx(math.exp(-2.0 - 2.5), rel=1e-14)


def test_outer_iterations_are_counted_from_one():
    """``max_iter`` steps, numbered 1, 2, ...: the quadratic schedule gives ``ε_0/(k-1)²`` to
    step ``k >= 2``."""
    tol = ToleranceSchedule(kind="quadratic", initial=1e-3)
    exact = IFT(solver=CG, max_iter=500, tol=1e-10)
    method = HOAG(backward=exact, mode="robust", max_iter=3, tolerance=tol)
    stepper = method.stepper(make_problem(), zeros())
    assert stepper.iteration == 0 and not stepper.finished
    metrics = []
    while not stepper.finished:
        metrics.append(stepper.step())
    assert len(metrics) == 3 and stepper.iteration == 3
    assert not any(m["rejected"] for m in metrics)
    assert [m["tolerance"] for m in metrics] == pytest.approx([1e-3, 1e-3, 1e-3 / 4], rel=1e-14)


# ---------------------------------------------------------------------------- backward
@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("first", ["inner_solution", "zero"])
def test_backward_start_and_metrics(warm, first):
    """The first CG starts from ``u = -w`` (the authors' ``q = w``) or 0; later ones from the
    previous solution when ``warm_start_backward``, else as the first. The metrics report the
    backward's own counts and its time."""
    rec = RecordingIFT()
    method = HOAG(backward=rec, max_iter=3, warm_start_backward=warm, first_backward_start=first)
    stepper = method.stepper(make_problem(), zeros())
    for k in range(3):
        t0 = time.perf_counter()
        m = stepper.step()
        elapsed = time.perf_counter() - t0
        assert m["backward_hvps"] == rec.hvps[k] > 0
        assert m["backward_iters"] == rec.nsteps[k]
        assert isinstance(m["backward_time"], float) and 0.0 < m["backward_time"] <= elapsed
        cold = -rec.w[k] if first == "inner_solution" else None
        expected = rec.values[k - 1] if warm and k > 0 else cold
        if expected is None:
            assert rec.starts[k] is None
        else:
            torch.testing.assert_close(rec.starts[k], expected, rtol=0, atol=0)
    torch.testing.assert_close(stepper.u, rec.values[-1], rtol=0, atol=0)


def test_opa_cross_derivative_direction_is_taken_at_the_current_lambda():
    """``opa_vector="cross_derivative"``: the inner solve at ``λ_k`` targets ``e^{λ_k} w``."""
    spy = RecordingLBFGS(memory=30, opa_every=1)
    method = HOAG(
        solver=spy,
        backward=Shine(),
        mode="robust",
        opa_vector="cross_derivative",
        lambda0=-1.0,
        max_iter=2,
    )
    stepper = method.stepper(make_problem(), zeros())
    lams = [-1.0]
    for _ in range(2):
        lams.append(stepper.step()["log_lambda"][0])
    z = torch.linspace(-1.0, 1.0, 10, dtype=DT)
    for call, lam in zip(spy.calls, lams, strict=False):
        torch.testing.assert_close(call["opa"](z), math.exp(lam) * z, rtol=1e-14, atol=0)


def test_shifted_memory_keeps_the_kinds_and_the_scale_of_its_pairs():
    """``inner_memory="shift"`` moves ``y`` to the new ``λ`` (tested in test_bilevel); the OPA
    kinds of the pairs and ``γ`` of ``H0 = γ I`` are handed over unchanged."""
    spy = RecordingLBFGS(memory=30, opa_every=2, scale_gamma=True)
    method = HOAG(solver=spy, backward=Shine(), mode="robust", inner_memory="shift", max_iter=2)
    stepper = method.stepper(make_problem(), zeros())
    stepper.step()
    first = stepper.memory
    stepper.step()
    handed = spy.calls[1]["warm"]
    assert "opa" in first.kinds and "regular" in first.kinds
    assert handed.kinds == first.kinds
    assert first.gamma != 1.0 and handed.gamma == first.gamma


# ---------------------------------------------------------------------------- checkpoints
def test_memory_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    s, y = torch.randn(2, 3, 10, dtype=DT, generator=gen)
    memory = LBFGSMemory(s, y, ["regular", "opa", "regular"], 0.37)
    back = memory_from_state(memory_to_state(memory))
    assert torch.equal(back.s, s) and torch.equal(back.y, y)
    assert back.kinds == ["regular", "opa", "regular"] and back.gamma == 0.37
    assert memory_from_state(memory_to_state(None)) is None


def test_checkpoint_of_a_fresh_stepper_restores_it():
    """A checkpoint taken before the first step (no memory yet) loads and continues alike."""
    problem = make_problem()
    method = HOAG(backward=JacobianFree(), max_iter=2)
    a = method.stepper(problem, zeros())
    b = method.stepper(problem, torch.ones(10, dtype=DT))
    b.load_state_dict(a.state_dict())
    assert b.memory is None and torch.equal(b.w, a.w)
    ma, mb = a.step(), b.step()
    assert ma["outer_loss"] == mb["outer_loss"] and ma["log_lambda"] == mb["log_lambda"]


class Uphill:
    """A wrong hypergradient (the exact one negated): every step goes uphill."""

    def __call__(self, vjp, rhs, fwd, *, u0=None):
        out = IFT(solver=CG, max_iter=200, tol=1e-10)(vjp, rhs, fwd)
        out.value = -out.value
        return out


def test_checkpoint_after_a_robust_rejection_keeps_the_loss_to_beat():
    problem = make_problem()
    method = HOAG(backward=Uphill(), mode="robust", max_iter=4, lambda0=-2.0)
    a = method.stepper(problem, zeros())
    a.step()
    assert a.step()["rejected"] and a.retry_g is not None
    b = method.stepper(problem, zeros())
    b.load_state_dict(a.state_dict())
    retry = a.retry_g
    assert b.retry_g == retry
    ma, mb = a.step(), b.step()  # re-evaluated at the accepted point
    assert mb["outer_loss"] == pytest.approx(ma["outer_loss"], rel=1e-12)
    # the loss to beat is min(re-evaluated loss, the accepted point's first loss)
    assert b.accepted["g"] == pytest.approx(min(ma["outer_loss"], retry), rel=1e-12)
    assert a.accepted["g"] == pytest.approx(min(ma["outer_loss"], retry), rel=1e-12)


def test_checkpoint_tensors_are_moved_to_the_problem_device(monkeypatch):
    """``load_state_dict`` moves every tensor to the problem's device. Without an accelerator
    here, PyTorch's ``meta`` device stands in for it (the problem reports it)."""
    problem = make_problem()
    method = HOAG(
        solver=LBFGS(memory=10), backward=JacobianFree(), mode="robust", inner_memory="keep"
    )
    a = method.stepper(problem, zeros())
    a.step()
    a.step()
    state = a.state_dict()
    b = method.stepper(problem, zeros())
    monkeypatch.setattr(L2Regularized, "device", property(lambda self: torch.device("meta")))
    b.load_state_dict(state)
    tensors = [b.lam, b.old_lam, b.w, b.memory_lam, b.u, b.memory.s, b.memory.y]
    tensors += [v for v in b.accepted.values() if isinstance(v, torch.Tensor)]
    assert all(t.device.type == "meta" for t in tensors)


def test_initial_point_is_cast_to_the_problem_dtype():
    stepper = HOAG(backward=JacobianFree()).stepper(make_problem(), torch.zeros(10))
    assert stepper.w.dtype == DT
    assert stepper.step()["inner_converged"]


@pytest.mark.gpu  # CUDA-only mutants (equivalent.txt "cuda-only"); skipped without a device
def test_initial_point_moves_to_the_problem_device():
    cpu = make_problem()
    on = {k: getattr(cpu, k) for k in ("inner", "outer")}
    cuda = BilevelProblem(
        L2Regularized(
            LogisticLoss(on["inner"].data_loss.X.cuda(), on["inner"].data_loss.y.cuda())
        ),
        LogisticLoss(on["outer"].X.cuda(), on["outer"].y.cuda()),
    )
    method = HOAG(solver=LBFGS(memory=10), backward=JacobianFree(), mode="robust")
    stepper = method.stepper(cuda, torch.zeros(10))  # a CPU float32 initial point
    assert stepper.w.device.type == "cuda" and stepper.w.dtype == DT
    state = method.stepper(cpu, zeros()).state_dict()
    stepper.load_state_dict(state)
    assert stepper.w.device.type == "cuda" and stepper.lam.device.type == "cuda"
    assert stepper.step()["inner_iters"] > 0
