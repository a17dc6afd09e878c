"""Entry point of every experiment: compose the config, build the objects, run the task.

    python train.py +experiment=opa_inversion                 # one run
    python train.py +experiment=opa_inversion task.n_seeds=5 experiment_name=tiny
    python train.py -m +experiment=NAME seed=0,1,2 hydra/launcher=slurm

The run directory (``cfg.paths.output_dir``) follows the run contract of
``shine.runtime.RunDirectory``: a complete run is skipped (``overwrite=true`` moves it aside and
starts again), an interrupted one resumes from its checkpoint. This is the only module that
calls ``hydra.utils.instantiate``; the library receives plain objects.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from shine.runtime import RunDirectory, seed_everything

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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Run the task selected by the composed configuration ``cfg``."""
    if cfg.get("task") is None:
        log.error("no task selected: run an experiment, e.g. `python train.py +experiment=NAME`")
        sys.exit(2)

    run_dir = RunDirectory(
        Path(cfg.paths.output_dir).resolve(), mirror=instantiate(cfg.logger.mirror)
    )
    if run_dir.is_complete() and not cfg.overwrite:
        log.info(
            "run already complete, nothing to do; results in %s (summary.json, metrics.jsonl). "
            "Pass overwrite=true to run it again (the old directory is kept as a backup).",
            run_dir.path,
        )
        return
    if cfg.overwrite and run_dir.has_results():
        run_dir.move_aside()
        _reopen_log_files(run_dir.path)

    seed_everything(int(cfg.seed))
    task = instantiate(cfg.task)
    state = run_dir.start(
        OmegaConf.to_yaml(cfg, resolve=True),
        config=OmegaConf.to_container(cfg, resolve=True),
        overrides=list(HydraConfig.get().overrides.task),
    )
    log.info("%s run in %s", "resuming" if state is not None else "starting", run_dir.path)

    metrics = task.run(run_dir)
    if metrics is None:
        run_dir.close()
        log.info("stopped before the end; run the same command again to resume %s", run_dir.path)
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
