"""Train the tiny MDEQ through ImageClassification, under DDP (torchrun, gloo) or in one process.

Usage: ``python ddp_classification_worker.py OUT_DIR STRATEGY...`` (one process) or
``torchrun --standalone --nproc_per_node=2 ddp_classification_worker.py OUT_DIR STRATEGY...``
with STRATEGY ``ift`` or ``shine``, optionally suffixed ``:cut`` (stop after 3 steps, then
resume in the same processes), ``:stop`` (stop after 3 steps) or ``:finish`` (run to the end; in
the directory of ``:stop``, so that another process count can resume what ``:stop`` started).
Each strategy runs in its own run directory ``OUT_DIR/STRATEGY`` (``STRATEGY_cut``,
``STRATEGY_moved`` for ``:stop``/``:finish``),
ordered as ``train.py`` orders it: rank 0 writes it, the other ranks open it read-only.
The global batch is the same with 1 and 2 processes.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import shine.models
from shine.backward import IFT, Shine
from shine.data import SyntheticImages
from shine.harness.runtime import RunDirectory
from shine.harness.runtime.distributed import barrier, detect_launch, init_distributed, shutdown
from shine.harness.tasks import ImageClassification
from shine.harness.training import Trainer
from shine.models import MDEQClassifier, MDEQConfig
from shine.solvers import Broyden


class PerSampleMDEQ(MDEQClassifier):
    """The MDEQ with per-sample normalisation everywhere and a contractive ``f``.

    With 2 processes, a BatchNorm normalises each process's share of the batch (as the authors'
    nn.DataParallel runs did; SyncBatchNorm is CUDA-only), which one process cannot match. The
    head of ``MDEQConfig(group_norm=True)`` keeps a BatchNorm (as the official code): it becomes
    a one-group GroupNorm, so that every sample's output depends on that sample only. ``f`` is
    made contractive as in tests/test_mdeq.py (small GroupNorm gains, alternating biases: MDEQ
    at initialisation is not), so that the solves converge to the tight tolerances.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    w = child.weight
                    norm = nn.GroupNorm(1, child.num_features, device=w.device, dtype=w.dtype)
                    setattr(module, name, norm)
        with torch.no_grad():
            for m in self.f.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.fill_(0.5)
                    signs = torch.tensor([(-1.0) ** k for k in range(m.num_channels)])
                    m.bias.copy_(signs.to(m.bias))


# ImageClassification.build() imports the class from shine.models when it runs
shine.models.MDEQClassifier = PerSampleMDEQ


def make_task(strategy: str) -> ImageClassification:
    # IFT is exact: solve both sides to near machine precision, so that 1e-16 differences of
    # the batch split cannot move a stopping iteration by more than ~1e-12. SHINE's estimate is
    # only as accurate as its secant pairs: 1e-9 keeps them well above rounding
    # (tests/helpers/ddp_deq_worker.py)
    tol = 1e-11 if strategy == "ift" else 1e-9
    backward = IFT(max_iter=60, tol=1e-12) if strategy == "ift" else Shine()
    return ImageClassification(
        data=SyntheticImages(n_train=32, n_test=20, image_shape=(1, 8, 8)),
        # GroupNorm in the stem and head, and PerSampleMDEQ for the head's last BatchNorm
        model=MDEQConfig.tiny(image_size=8, in_channels=1, group_norm=True),
        solver=Broyden(max_iter=40, tol=tol, memory=40),
        backward=backward,
        # SGD: Adam would turn 1e-17 gradient differences of zero-gradient entries into lr steps
        optimizer=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.5),
        epochs=2,
        batch_size=8,  # 4 steps an epoch; 4 samples per process with 2
        eval_batch_size=8,  # test batches 8, 8, 4: rank 0 takes two, rank 1 one
        pretrain_steps=2,
        max_steps=6,
        dtype="float64",
        method_name=strategy,
        trainer=Trainer(checkpoint_every=2),
    )


def run(path: Path, task: ImageClassification, main_rank: bool) -> None:
    run_dir = RunDirectory(path, read_only=not main_rank)
    if main_rank:
        run_dir.start("config: test\n")
    barrier()
    if not main_rank:
        run_dir.start("config: test\n")
    barrier()
    out = task.run(run_dir)
    barrier()
    if main_rank and out is not None:
        run_dir.finish(out)


def main(out: str, strategies: list[str]) -> None:
    distributed = detect_launch().world_size > 1
    info = init_distributed()
    torch.set_num_threads(1)
    for item in strategies:
        strategy, _, mode = item.partition(":")
        if mode not in ("", "cut", "stop", "finish"):
            raise ValueError(f"unknown mode {mode!r} in {item!r}")
        task = make_task(strategy)
        suffix = {"": "", "cut": "_cut"}.get(mode, "_moved")
        path = Path(out) / f"{strategy}{suffix}"
        if mode in ("cut", "stop"):
            run(
                path,
                replace(task, trainer=Trainer(checkpoint_every=2, stop_after=3)),
                info.is_main,
            )
        if mode != "stop":
            run(path, task, info.is_main)
    if distributed:
        shutdown()
        # gloo's background threads can abort the interpreter's shutdown ("terminate called
        # without an active exception", SIGABRT) after all work is done: leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
