"""The run contract, library side: run directories, metrics, checkpoints and provenance.

Plain Python (no Hydra): ``train.py`` builds a :class:`RunDirectory` from the composed
configuration and hands it to the task, which logs metrics and checkpoints through it.
"""

from shine.harness.runtime.devices import resolve_dtype
from shine.harness.runtime.distributed import DistInfo, detect_launch, init_distributed
from shine.harness.runtime.metrics import JsonlMetrics
from shine.harness.runtime.provenance import environment_info, git_state
from shine.harness.runtime.run_dir import RunDirectory
from shine.harness.runtime.seeding import derived_seed, seed_everything
from shine.harness.runtime.wandb_mirror import WandbMirror

__all__ = [
    "DistInfo",
    "JsonlMetrics",
    "RunDirectory",
    "WandbMirror",
    "derived_seed",
    "detect_launch",
    "environment_info",
    "git_state",
    "init_distributed",
    "resolve_dtype",
    "seed_everything",
]
