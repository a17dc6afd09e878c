"""The run contract, library side: run directories, metrics, checkpoints and provenance.

Plain Python (no Hydra): ``train.py`` builds a :class:`RunDirectory` from the composed
configuration and hands it to the task, which logs metrics and checkpoints through it.
"""

from shine.runtime.devices import resolve_dtype
from shine.runtime.distributed import DistInfo, detect_launch, init_distributed
from shine.runtime.metrics import JsonlMetrics
from shine.runtime.provenance import environment_info, git_state
from shine.runtime.run_dir import RunDirectory
from shine.runtime.seeding import derived_seed, seed_everything
from shine.runtime.wandb_mirror import WandbMirror

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
