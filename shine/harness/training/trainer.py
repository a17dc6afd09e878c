"""The shared outer-loop driver of every experiment: timing, logging, checkpoints, progress.

Both halves of the paper are the same loop (eq. 1): inner solve (forward) → outer loss →
hypergradient (backward strategy) → outer update. A *stepper* performs one such outer step;
the :class:`Trainer` runs steppers through a run directory:

* it times :meth:`Stepper.step` only (the per-record ``time`` is the cumulative time of the
  steps, so held-out evaluation, logging and checkpointing are off the clock);
* it logs one record per step (the step's metrics, ``time``, ``step_time`` and the untimed
  evaluation) to ``metrics.jsonl`` (and wandb when mirrored), and a record 0 for the initial
  point;
* it checkpoints the stepper's ``state_dict`` every ``checkpoint_every`` steps and resumes from
  the last checkpoint, so an interrupted run continues where it stopped and writes the same
  records;
* it logs progress with rates;
* it stops a run whose watched metrics (loss, residual, λ, ...) become non-finite, raising
  :class:`Diverged` (``on_nonfinite="stop"``), or undoes and skips such a step
  (``"skip_step"``, for steppers with a ``skip()`` method);
* it stops cleanly when the run directory's ``stop_requested`` is set (a signal, see train.py):
  the state after the current step is checkpointed and :meth:`Trainer.run` returns ``None``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shine.harness.runtime.run_dir import RunDirectory

logger = logging.getLogger(__name__)


#: metrics whose non-finite values mean the run diverged (those a stepper logs)
WATCHED_METRICS: tuple[str, ...] = (
    "loss",
    "outer_loss",
    "log_lambda",
    "hypergradient",
    "fwd_residual_max",
)


class Diverged(RuntimeError):  # noqa: N818 - an outcome of a run, reported as such
    """A watched metric became non-finite: the run cannot go on.

    Attributes:
        step: the step whose metrics were non-finite.
        cause: which metric, e.g. ``"loss = nan"``.
        last_finite: the watched metrics of the last step where all were finite (with its step),
            empty if there was none.
    """

    def __init__(self, step: int, cause: str, last_finite: Mapping[str, Any]) -> None:
        super().__init__(f"non-finite {cause} at step {step}")
        self.step = step
        self.cause = cause
        self.last_finite = dict(last_finite)


def nonfinite(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    """``"key = value"`` of the first watched metric with a non-finite value, else ``None``.

    Numbers and lists of numbers are checked; ``None`` counts as non-finite (NaN logged as JSON).
    """
    for key in keys:
        if key not in metrics:
            continue
        value = metrics[key]
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is None or (isinstance(v, int | float) and not math.isfinite(float(v))):
                return f"{key} = {v}"
    return None


class Stepper(Protocol):
    """One run of an outer loop (e.g. :class:`shine.bilevel.hoag.HOAGStepper`)."""

    @property
    def finished(self) -> bool:
        """Whether the loop is done."""
        ...

    def step(self) -> dict[str, Any]:
        """Perform one outer step; return its metrics (JSON-serialisable)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (see :meth:`RunDirectory.save_checkpoint`)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state given by :meth:`state_dict`."""
        ...


@dataclass(frozen=True)
class Trainer:
    """Runs a :class:`Stepper` to completion through a :class:`RunDirectory`.

    Attributes:
        checkpoint_every: checkpoint after every this many steps (and after the last).
        evaluate_every: run the untimed evaluation after every this many steps (and after the
            last, and for record 0); other records carry the step's metrics only.
        log_every: progress line every this many steps (0: about ten lines per run).
        max_steps: stop after this many steps even if the stepper is not finished (None: no
            limit).
        stop_after: return ``None`` (an interruption, to be resumed) after this many steps of
            this call; for tests and for splitting a run across short jobs.
        on_nonfinite: ``"stop"``: a non-finite watched metric raises :class:`Diverged`;
            ``"skip_step"``: the step is undone (the stepper's state before it is restored) and
            its data skipped (the stepper's ``skip()``); the record is logged with
            ``skipped_nonfinite`` and the run goes on (at most ``max_skips`` in a row).
        watch: the metrics checked (see :data:`WATCHED_METRICS`).
        max_skips: consecutive skipped steps after which the run is declared diverged.
    """

    checkpoint_every: int = 1
    evaluate_every: int = 1
    log_every: int = 0
    max_steps: int | None = None
    stop_after: int | None = None
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    watch: tuple[str, ...] = field(default=WATCHED_METRICS)
    max_skips: int = 10

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on non-positive intervals.
        """
        for name in ("checkpoint_every", "evaluate_every", "max_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.on_nonfinite not in ("stop", "skip_step"):
            raise ValueError(
                f"on_nonfinite must be 'stop' or 'skip_step', got {self.on_nonfinite!r}"
            )
        object.__setattr__(self, "watch", tuple(self.watch))

    def run(
        self,
        stepper: Stepper,
        run_dir: RunDirectory,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        total: int | None = None,
    ) -> list[dict[str, Any]] | None:
        """Run or resume ``stepper``.

        Args:
            stepper: the outer loop.
            run_dir: a started run directory (its checkpoint, if any, is resumed).
            evaluate: untimed metrics of the current state (held-out losses), added to every
                record.
            total: expected number of steps, for progress messages.

        Returns:
            All metric records of the run (read back from ``metrics.jsonl``), or ``None`` if
            it stopped early (``stop_after``, or a stop request of the run directory) and must
            be resumed.

        Raises:
            Diverged: a watched metric became non-finite (``on_nonfinite="stop"``, or too many
                skipped steps in a row).
            ValueError: ``on_nonfinite="skip_step"`` with a stepper that cannot skip a step.
        """
        evaluate = evaluate or (lambda: {})
        skipping = self.on_nonfinite == "skip_step"
        if skipping and not callable(getattr(stepper, "skip", None)):
            raise ValueError(
                f"{type(stepper).__name__} cannot skip a step (no skip() method): use "
                "on_nonfinite=stop"
            )
        last_finite: dict[str, Any] = {}
        n_skipped = 0
        state = run_dir.load_checkpoint()
        if state is None:
            step, timed = 0, 0.0
            record = {"time": 0.0, "step_time": 0.0, **evaluate()}
            run_dir.log_metrics(0, record)
            run_dir.save_checkpoint(
                {"stepper": stepper.state_dict(), "time": 0.0, "step": 0}, step=0
            )
        else:
            stepper.load_state_dict(state["stepper"])
            step, timed = int(state["step"]), float(state["time"])
            logger.info("resuming after step %d (%.2f s of steps done)", step, timed)
        every = self.log_every or max(1, (total or 10) // 10)
        done_now = 0
        wall0 = time.perf_counter()
        while not stepper.finished and (self.max_steps is None or step < self.max_steps):
            if self.stop_after is not None and done_now >= self.stop_after:
                logger.info("stopping after %d steps (stop_after); run again to resume", done_now)
                return None
            before = copy.deepcopy(stepper.state_dict()) if skipping else None
            t0 = time.perf_counter()
            metrics = stepper.step()
            dt = time.perf_counter() - t0
            timed += dt
            step += 1
            done_now += 1
            last = stepper.finished or (self.max_steps is not None and step >= self.max_steps)
            record = {**metrics, "time": timed, "step_time": dt}
            cause = nonfinite(metrics, self.watch)
            if cause is not None:
                n_skipped += 1
                if not skipping or n_skipped > self.max_skips:
                    run_dir.log_metrics(step, record)
                    logger.error("non-finite %s at step %d: the run diverged", cause, step)
                    raise Diverged(step, cause, last_finite)
                logger.warning("non-finite %s at step %d: step undone and skipped", cause, step)
                stepper.load_state_dict(before)  # type: ignore[arg-type]
                stepper.skip()  # type: ignore[attr-defined]
                record["skipped_nonfinite"] = cause
            else:
                n_skipped = 0
                last_finite = {"step": step, **{k: metrics[k] for k in self.watch if k in metrics}}
            if step % self.evaluate_every == 0 or last:
                record.update(evaluate())
            run_dir.log_metrics(step, record)
            stopping = run_dir.should_stop()
            if step % self.checkpoint_every == 0 or last or stopping:
                run_dir.save_checkpoint(
                    {"stepper": stepper.state_dict(), "time": timed, "step": step}, step=step
                )
            if stopping and not last:
                logger.warning(
                    "interrupted at step %d (%s): checkpointed", step, run_dir.stop_reason
                )
                run_dir.interrupted_at = step
                return None
            if step % every == 0 or last:
                rate = (time.perf_counter() - wall0) / done_now
                left = f", ~{rate * (total - step):.0f} s left" if total else ""
                logger.info(
                    "step %d%s: %.3f s/step (timed %.2f s)%s",
                    step,
                    f"/{total}" if total else "",
                    rate,
                    timed,
                    left,
                )
        return run_dir.read_metrics()
