"""Entry point of every experiment: compose the config, build the objects, run the task.

    python train.py +experiment=opa_inversion                 # one run
    python train.py +experiment=opa_inversion task.n_seeds=5 experiment_name=tiny
    python train.py -m +experiment=NAME seed=0,1,2 hydra/launcher=slurm
    torchrun --nproc_per_node=4 train.py +experiment=cifar_shine   # data parallel, 4 GPUs
    srun --ntasks-per-node=4 --gpus-per-task=1 python train.py +experiment=cifar_shine

The run directory (``cfg.paths.output_dir``) follows the run contract of
``shine.harness.runtime.RunDirectory``: a complete run is skipped (``overwrite=true`` moves it
aside and starts again), an interrupted one resumes from its checkpoint. This is the only module
that
calls ``hydra.utils.instantiate``; the library receives plain objects.

Multi-process launches (``shine.harness.runtime.distributed``): every process runs this script;
rank 0 owns the run directory and the others open it read-only (no writes, no train.log, warnings
only on their console). Barriers order the shared steps: every rank has checked completeness
before rank 0 moves anything aside, rank 0 has (re)started the directory before the others load
its checkpoint, they have loaded it before rank 0 writes the next one, and every rank has
finished before rank 0 writes ``summary.json``.

What a run does when things go wrong (exit codes in :data:`EXIT_CODES`):

* a second launch on a directory that another process writes fails at once, naming the holder;
* a resume with another configuration (result-neutral keys aside) is refused, with the diff;
* SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-timeout signal) finish the current step, checkpoint
  and exit with ``interrupted`` ("run the same command to resume"); a second Ctrl-C exits at once;
* a non-finite loss, residual or λ ends the run with ``status: diverged`` in ``summary.json``;
* any other failure writes its traceback to ``train.log`` before it propagates.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from shine.harness.runtime import RunDirectory, seed_everything
from shine.harness.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    detect_launch,
    init_distributed,
    shutdown,
)
from shine.harness.runtime.lock import RunLockedError
from shine.harness.runtime.run_dir import ConfigMismatchError, CorruptCheckpointError
from shine.harness.runtime.settings import TrainerSettings
from shine.harness.training.trainer import Diverged

log = logging.getLogger("train")
REPO = Path(__file__).resolve().parent

#: exit codes of train.py besides 0 (done, or already complete) and 1 (an error)
EXIT_CODES = {
    "usage": 2,  # no task selected
    "diverged": 65,  # non-finite loss / residual / λ (also when re-run without overwrite=true)
    "locked": 73,  # another process writes the run directory
    "damaged": 74,  # a checkpoint cannot be read
    "interrupted": 75,  # stopped by a signal after checkpointing: run the same command again
    "config": 78,  # the run directory holds a run of another configuration
}


def register_schemas() -> None:
    """Register the schemas of the groups without a class (``trainer/schema``).

    Every ``configs/trainer/*.yaml`` extends ``schema``: an unknown key or a wrong type is a
    composition error naming the key. Called at import, so that ``train.py``, its
    :func:`compose_task` and the tests (``tests/conftest.py`` imports this module) compose
    against it.
    """
    ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSettings)


register_schemas()
#: signals that stop a run cleanly (SIGUSR1: SLURM's warning before the time limit)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _reopen_log_files(old_dir: Path) -> None:
    """Point Hydra's file log handlers at the recreated run directory after a move aside.

    An open handler follows its file into the backup; closing it makes ``logging`` reopen the
    same path (now in the new, empty directory) at the next record.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(
            old_dir
        ):
            handler.close()


def _format_metrics(metrics: dict) -> str:
    return "\n".join(
        f"  {k:<40} {v:.6g}" if isinstance(v, float) else f"  {k:<40} {v}"
        for k, v in metrics.items()
    )


@contextmanager
def stop_on_signals(run_dir: RunDirectory) -> Iterator[None]:
    """Turn SIGTERM / SIGINT / SIGUSR1 into a stop request of ``run_dir`` (second Ctrl-C: now)."""

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if run_dir.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        run_dir.request_stop(name)
        log.warning(
            "%s received: finishing the current step, then checkpointing and stopping "
            "(Ctrl-C again to exit at once)",
            name,
        )

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def available_methods(setting: str) -> list[str]:
    """The methods of ``setting`` (``deq``, ``bilevel``): configs/method/impl/SETTING/*.yaml."""
    folder = REPO / "configs" / "method" / "impl" / setting
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "outer_loop")


def _remove_empty_run_dir(cfg: DictConfig) -> None:
    """Remove the directory Hydra created for a run refused before it started.

    It holds nothing but the log of the refusal (``train.log``), which went to the console too;
    the empty folders above it, up to ``paths.log_dir``, go with it.
    """
    output = OmegaConf.select(cfg, "paths.output_dir", default=None)
    log_dir = OmegaConf.select(cfg, "paths.log_dir", default=None)
    if not output or not log_dir:
        return
    path, root = Path(str(output)).resolve(), Path(str(log_dir)).resolve()
    if [p.name for p in path.glob("*")] == ["train.log"]:
        for handler in list(logging.getLogger().handlers):
            mine = isinstance(handler, logging.FileHandler)
            if mine and Path(handler.baseFilename).parent == path:
                logging.getLogger().removeHandler(handler)
                handler.close()
        (path / "train.log").unlink()
    while path != root and root in path.parents:
        try:
            path.rmdir()  # only empty folders go
        except OSError:
            return
        path = path.parent


def name_the_method(cfg: DictConfig, choices: dict[str, Any]) -> None:
    """Check that a task that runs a method has one, and record it under its one name.

    The ``method`` choice (``configs/method/NAME.yaml``) names the run (the experiments'
    ``<experiment>_<method>`` directories), the summary's ``method`` (``task.method_name``,
    read by collect.py) and the figures' legend. A hand-written ``task.method_name`` or
    ``method.name`` that disagrees is replaced by the choice, with a warning.
    """
    if OmegaConf.select(cfg, "task.method_name", default="__absent__", throw_on_missing=False) == (
        "__absent__"
    ):
        return  # the task compares several methods itself (timing, inversion quality)
    choice = str(choices.get("method") or "none")
    if choice == "none":
        setting = str(choices.get("setting") or "none")
        names = available_methods(setting) if setting != "none" else ["configs/method/*.yaml"]
        log.error(
            "this experiment runs a method: add method=NAME, one of %s (configs/method/)",
            ", ".join(names),
        )
        _remove_empty_run_dir(cfg)
        sys.exit(EXIT_CODES["usage"])
    with open_dict(cfg):
        for key in ("task.method_name", "method.name"):
            written = OmegaConf.select(cfg, key, default=None)
            if written != choice:
                log.warning(
                    "%s=%r disagrees with the method choice method=%s: the run is recorded as %r",
                    key,
                    written,
                    choice,
                    choice,
                )
                OmegaConf.update(cfg, key, choice, force_add=True)


def check_settings(cfg: DictConfig) -> None:
    """Range checks of the settings without a class (:class:`TrainerSettings`), before any
    object is built or data loaded; types and unknown keys are checked at composition.

    Raises:
        ValueError: naming the key (``trainer.KEY``) and its valid range.
    """
    trainer = OmegaConf.select(cfg, "trainer")
    if trainer is not None:
        TrainerSettings.check(OmegaConf.to_container(trainer, resolve=True))


def apply_thread_policy(cfg: DictConfig) -> None:
    """``trainer.num_threads`` CPU threads for torch (null: torch's default, one per core).

    One thread is the default of the CPU-scale experiments: on a loaded 2-core machine two
    OpenMP threads wait for each other (a 20-step digits run: 12.9 s with two, 1.6 s with one).
    """
    n = OmegaConf.select(cfg, "trainer.num_threads", default=None)
    if n is None:
        return
    import torch

    if int(n) < 1:
        raise ValueError(f"trainer.num_threads must be >= 1 or null, got {n}")
    torch.set_num_threads(int(n))
    os.environ.setdefault("OMP_NUM_THREADS", str(int(n)))  # for worker processes


def compose_task(overrides: list[str]) -> Any:
    """Compose ``configs/train.yaml`` with ``overrides`` and instantiate its task.

    For scripts (benchmarks) that need the exact objects of an experiment without a run
    directory, e.g. ``compose_task(["+experiment=breast_cancer", "method=shine", "seed=1"])``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_settings(cfg)
    return instantiate(cfg.task)


def _quiet_follower() -> None:
    """On a non-main rank: no log file in the run directory, warnings only on the console."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Run the task selected by the composed configuration ``cfg``."""
    if cfg.get("task") is None:
        log.error("no task selected: run an experiment, e.g. `python train.py +experiment=NAME`")
        sys.exit(EXIT_CODES["usage"])
    try:
        check_settings(cfg)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(EXIT_CODES["usage"])
    name_the_method(cfg, dict(HydraConfig.get().runtime.choices))
    launch = detect_launch()
    if launch.rank != 0:
        _quiet_follower()
    info = init_distributed() if launch.world_size > 1 else DistInfo()
    _run(cfg, info)
    # on the normal path only: after an error the launcher stops the other ranks
    shutdown()


def _run(cfg: DictConfig, info: DistInfo) -> None:
    main_rank = info.is_main
    path = Path(cfg.paths.output_dir).resolve()
    if main_rank:
        run_dir = RunDirectory(path, mirror=instantiate(cfg.logger.mirror))
        try:
            run_dir.acquire()
        except RunLockedError as err:
            log.error("%s", err)
            sys.exit(EXIT_CODES["locked"])
    else:
        run_dir = RunDirectory(path, read_only=True)
    if info.world_size > 1:
        run_dir.stop_sync = lambda flag: all_reduce_sum({"stop": float(flag)})["stop"] > 0
    try:
        with stop_on_signals(run_dir):
            _run_locked(cfg, info, run_dir)
    except SystemExit:
        raise
    except BaseException:
        log.exception("the run failed; %s is resumable from its last checkpoint", run_dir.path)
        raise
    finally:
        run_dir.release()


def _ended(cfg: DictConfig, run_dir: RunDirectory) -> None:
    """Report a run that ended before (complete or diverged); exit non-zero unless complete."""
    summary = run_dir.read_summary()
    if summary.get("status") == "diverged":
        details = summary.get("status_details") or {}
        log.error(
            "this run diverged at step %s (%s); results in %s. Pass overwrite=true to start it "
            "anew (the old directory is kept as a backup), e.g. with another learning rate.",
            details.get("step"),
            details.get("cause"),
            run_dir.path,
        )
        sys.exit(EXIT_CODES["diverged"])
    diff = run_dir.config_changes(OmegaConf.to_container(cfg, resolve=True))
    if diff:
        log.error(
            "%s holds a complete run of another configuration:\n%s\nPass overwrite=true to "
            "replace it (it is kept as a backup).",
            run_dir.path,
            "\n".join(f"    {line}" for line in diff[:40]),
        )
        sys.exit(EXIT_CODES["config"])
    log.info(
        "run already complete, nothing to do; results in %s (summary.json, metrics.jsonl). "
        "Pass overwrite=true to run it again (the old directory is kept as a backup).",
        run_dir.path,
    )


def _run_locked(cfg: DictConfig, info: DistInfo, run_dir: RunDirectory) -> None:
    main_rank = info.is_main
    complete = run_dir.is_complete()
    barrier()  # every rank has looked before rank 0 moves anything
    if complete and not cfg.overwrite:
        _ended(cfg, run_dir)
        return
    if main_rank and cfg.overwrite and run_dir.has_results():
        run_dir.move_aside()
        _reopen_log_files(run_dir.path)

    apply_thread_policy(cfg)
    seed_everything(int(cfg.seed))
    try:
        task = instantiate(cfg.task)
    except InstantiationException as err:
        if not isinstance(err.__cause__, ValueError | TypeError):
            raise
        # a constructor refused a setting: the message names the class, the setting, its valid
        # range and the config key (full_key); nothing has been loaded or written yet
        log.error("invalid configuration: %s", err)
        sys.exit(EXIT_CODES["usage"])
    if info.world_size > 1 and not hasattr(task, "distributed"):
        log.warning(
            "%s has no data parallelism: each of the %d processes runs all of it; only rank 0 "
            "writes the run directory",
            type(task).__name__,
            info.world_size,
        )

    def start() -> dict | None:
        return run_dir.start(
            OmegaConf.to_yaml(cfg, resolve=True),
            config=OmegaConf.to_container(cfg, resolve=True),
            overrides=list(HydraConfig.get().overrides.task),
        )

    try:
        state = start() if main_rank else None
        barrier()  # rank 0 has (re)started the directory (moved aside, truncated the metrics)
        if not main_rank:
            state = start()  # read-only: the checkpoint rank 0 resumes from
    except ConfigMismatchError as err:
        log.error("%s", err)
        sys.exit(EXIT_CODES["config"])
    except CorruptCheckpointError as err:
        log.error("%s", err)
        sys.exit(EXIT_CODES["damaged"])
    barrier()  # every rank holds it before rank 0 writes the next checkpoint
    log.info("%s run in %s", "resuming" if state is not None else "starting", run_dir.path)

    try:
        metrics = task.run(run_dir)
    except Diverged as err:
        run_dir.close()
        if main_rank:
            label = getattr(task, "label", None) or getattr(task, "method_name", "") or ""
            run_dir.finish(
                {"method": label, "n_steps": err.step},
                source_dir=REPO,
                status="diverged",
                details={"step": err.step, "cause": err.cause, "last_finite": err.last_finite},
            )
        log.error(
            "the run diverged: %s at step %d (last finite values: %s); summary.json says "
            "status: diverged. Start it anew with other settings and overwrite=true, or set "
            "trainer.on_nonfinite=skip_step to skip such steps.",
            err.cause,
            err.step,
            err.last_finite or "none",
        )
        sys.exit(EXIT_CODES["diverged"])
    barrier()  # every rank is done before the run is marked complete
    if metrics is None:
        run_dir.close()
        if run_dir.interrupted_at is not None:
            log.warning(
                "interrupted at step %d; run the same command to resume (%s, %s)",
                run_dir.interrupted_at,
                run_dir.stop_reason,
                run_dir.path,
            )
            sys.exit(EXIT_CODES["interrupted"])
        log.info("stopped before the end; run the same command again to resume %s", run_dir.path)
        return
    if not main_rank:
        return
    summary = run_dir.finish(metrics, source_dir=REPO)
    log.info(
        "done in %.1f s; results in %s\n%s",
        summary["wall_time_s"],
        run_dir.path,
        _format_metrics(RunDirectory.final_metrics(summary)),
    )


if __name__ == "__main__":
    main()
    if detect_launch().world_size > 1:
        # gloo's background threads can abort the interpreter's shutdown (SIGABRT, "terminate
        # called without an active exception") after all work is done, which the launcher would
        # report as a failure: leave without it (main returned, so the process group is gone)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
