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
* it logs progress with rates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shine.runtime.run_dir import RunDirectory

logger = logging.getLogger(__name__)


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
    """

    checkpoint_every: int = 1
    evaluate_every: int = 1
    log_every: int = 0
    max_steps: int | None = None
    stop_after: int | None = None

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: on non-positive intervals.
        """
        for name in ("checkpoint_every", "evaluate_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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
            it stopped early (``stop_after``) and must be resumed.
        """
        evaluate = evaluate or (lambda: {})
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
            t0 = time.perf_counter()
            metrics = stepper.step()
            dt = time.perf_counter() - t0
            timed += dt
            step += 1
            done_now += 1
            last = stepper.finished or (self.max_steps is not None and step >= self.max_steps)
            record = {**metrics, "time": timed, "step_time": dt}
            if step % self.evaluate_every == 0 or last:
                record.update(evaluate())
            run_dir.log_metrics(step, record)
            if step % self.checkpoint_every == 0 or last:
                run_dir.save_checkpoint(
                    {"stepper": stepper.state_dict(), "time": timed, "step": step}, step=step
                )
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
