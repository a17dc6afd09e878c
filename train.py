"""Entry point of every experiment: compose the config, build the objects, run the task.

    python train.py +experiment=opa_inversion                 # one run
    python train.py +experiment=opa_inversion task.n_seeds=5 experiment_name=tiny
    python train.py -m +experiment=NAME seed=0,1,2 hydra/launcher=slurm
    torchrun --nproc_per_node=4 train.py +experiment=cifar_shine   # data parallel, 4 GPUs
    srun --ntasks-per-node=4 --gpus-per-task=1 python train.py +experiment=cifar_shine

The run directory (``cfg.paths.output_dir``) follows the run contract of
``shine.runtime.RunDirectory``: a complete run is skipped (``overwrite=true`` moves it aside and
starts again), an interrupted one resumes from its checkpoint. This is the only module that
calls ``hydra.utils.instantiate``; the library receives plain objects.

Multi-process launches (``shine.runtime.distributed``): every process runs this script; rank 0
owns the run directory and the others open it read-only (no writes, no train.log, warnings
only on their console). Barriers order the shared steps: every rank has checked completeness
before rank 0 moves anything aside, rank 0 has (re)started the directory before the others load
its checkpoint, they have loaded it before rank 0 writes the next one, and every rank has
finished before rank 0 writes ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from shine.runtime import RunDirectory, seed_everything
from shine.runtime.distributed import (
    DistInfo,
    barrier,
    detect_launch,
    init_distributed,
    shutdown,
)

log = logging.getLogger("train")
REPO = Path(__file__).resolve().parent


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


def compose_task(overrides: list[str]) -> Any:
    """Compose ``configs/train.yaml`` with ``overrides`` and instantiate its task.

    For scripts (benchmarks) that need the exact objects of an experiment without a run
    directory, e.g. ``compose_task(["+experiment=breast_cancer_shine", "seed=1"])``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
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
        sys.exit(2)
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
    else:
        run_dir = RunDirectory(path, read_only=True)
    complete = run_dir.is_complete()
    barrier()  # every rank has looked before rank 0 moves anything
    if complete and not cfg.overwrite:
        log.info(
            "run already complete, nothing to do; results in %s (summary.json, metrics.jsonl). "
            "Pass overwrite=true to run it again (the old directory is kept as a backup).",
            run_dir.path,
        )
        return
    if main_rank and cfg.overwrite and run_dir.has_results():
        run_dir.move_aside()
        _reopen_log_files(run_dir.path)

    seed_everything(int(cfg.seed))
    task = instantiate(cfg.task)
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

    state = start() if main_rank else None
    barrier()  # rank 0 has (re)started the directory (moved aside, truncated the metrics)
    if not main_rank:
        state = start()  # read-only: the checkpoint rank 0 resumes from
    barrier()  # every rank holds it before rank 0 writes the next checkpoint
    log.info("%s run in %s", "resuming" if state is not None else "starting", run_dir.path)

    metrics = task.run(run_dir)
    barrier()  # every rank is done before the run is marked complete
    if metrics is None:
        run_dir.close()
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
