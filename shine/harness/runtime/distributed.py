"""Multi-process data parallelism: the launch environment, the process group, small collectives.

A run is *distributed* when it was started as several processes, one per GPU (or CPU process),
by one of two launchers. :func:`detect_launch` reads where each process stands:

* ``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; they take precedence over everything else
  (also inside a SLURM job that runs torchrun once per node).
* ``srun`` with one task per GPU (``srun --ntasks-per-node=G --gpus-per-task=1 python train.py
  ...``) sets, for each task, ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID`` (rank on the
  node) and ``SLURM_STEP_NUM_TASKS`` (tasks of this step = world size). SLURM variables are only
  used inside an srun step, recognised by ``SLURM_STEP_NUM_TASKS``: a batch script itself also has
  ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` (the *allocation's* task count), and a plain ``python
  train.py`` there must stay a single process instead of waiting for peers that never start.
  The rendezvous address is ``MASTER_ADDR`` if set, otherwise the first host of
  ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), e.g. ``gpu017`` for ``gpu[017-020]``:
  task 0 runs there under srun's default block distribution; ``SLURM_LAUNCH_NODE_IPADDR`` (the
  node where srun was called, which is the first node of the allocation only when srun runs
  inside the batch script, not for an interactive srun from a login node) is the last resort.
  The port is ``MASTER_PORT`` if set, otherwise ``15000 + SLURM_JOB_ID % 20000`` (the same in
  every task of the job and across requeues; the formula of the ``slurm/`` launch scripts, which
  export both variables). Export ``MASTER_ADDR``/``MASTER_PORT`` for another task distribution
  (``-m cyclic``) or a node list the tasks cannot resolve.

:func:`init_distributed` creates the default process group from that and returns a
:class:`DistInfo`; the state lives in ``torch.distributed`` only (nothing global here), so
:func:`dist_info` gives the same answer anywhere later. The collectives below are no-ops in a
single process, so callers need no special case.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands in a launch, as read from the environment.

    Attributes:
        rank: global rank of this process.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        master_addr: rendezvous host (``None``: not given, single process).
        master_port: rendezvous port (``None``: not given, single process).
        source: ``"torchrun"``, ``"slurm"`` or ``"none"`` (plain single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "none"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group.

    Attributes:
        rank: global rank.
        world_size: number of processes (1 without a process group).
        local_rank: rank on this node.
        is_main: whether this is rank 0, the only process that writes results.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, e.g. ``"gpu[017-020,031],cpu1"`` → ``"gpu017"``.

    Args:
        nodelist: a compressed SLURM host list (``SLURM_JOB_NODELIST``).

    Raises:
        ValueError: if the list is empty.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if not first:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    # every bracket group becomes the first value of its first range: [017-020,031] -> 017
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launch environment (torchrun, then an srun step); see the module docstring.

    Args:
        environ: the environment (default ``os.environ``).

    Returns:
        The process's place; ``LaunchEnv()`` (rank 0 of 1) for a plain single process.

    Raises:
        ValueError: on inconsistent values (rank outside ``[0, world_size)``).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        launch = LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR"),
            master_port=None if port is None else int(port),
            source="torchrun",
        )
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            addr = first_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR")
        port = env.get("MASTER_PORT")
        if port is None:
            port = str(15000 + int(env.get("SLURM_JOB_ID", "14500")) % 20000)
        launch = LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=int(port),
            source="slurm",
        )
    else:
        return LaunchEnv()
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(
            f"inconsistent {launch.source} environment: rank {launch.rank} of {launch.world_size}"
        )
    return launch


def dist_info() -> DistInfo:
    """This process's place in the current default process group (rank 0 of 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return DistInfo(
        rank=rank, world_size=dist.get_world_size(), local_rank=local, is_main=rank == 0
    )


def init_distributed(
    backend: str | None = None, *, timeout: dt.timedelta | None = None
) -> DistInfo:
    """Join the process group of a multi-process launch (idempotent).

    Nothing is created for a single process (``world_size`` 1 without a rendezvous address)
    or when a default process group already exists: the result then describes the current one.
    On a machine with CUDA, the process's GPU is ``local_rank % device_count`` (with one visible
    GPU per task, e.g. ``srun --gpus-per-task=1``, every task uses its device 0) and is made the
    current device.

    Args:
        backend: the ``torch.distributed`` backend; default ``"cpu:gloo,cuda:nccl"`` with CUDA
            (NCCL for CUDA tensors, gloo for CPU ones such as CPU-side metrics), else ``"gloo"``.
        timeout: collective timeout (default: torch's).

    Returns:
        The process's :class:`DistInfo`.

    Raises:
        ValueError: if several processes were launched without a rendezvous address.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    launch = detect_launch()
    if launch.world_size == 1 and launch.master_addr is None:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if launch.master_addr is None or launch.master_port is None:
        raise ValueError(
            f"{launch.world_size} processes ({launch.source}) but no MASTER_ADDR/MASTER_PORT"
        )
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    device_id = None
    if cuda and "nccl" in backend:
        device_id = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    if launch.source == "torchrun":
        init_method = "env://"  # torchrun's variables (and its agent's store)
    else:
        host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr
        init_method = f"tcp://{host}:{launch.master_port}"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device_id,
    )
    info = DistInfo(launch.rank, launch.world_size, launch.local_rank, launch.rank == 0)
    logger.info(
        "process %d of %d (local rank %d, %s, backend %s, rendezvous %s:%s)",
        info.rank,
        info.world_size,
        info.local_rank,
        launch.source,
        backend,
        launch.master_addr,
        launch.master_port,
    )
    return info


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device() -> torch.device:
    backend = str(dist.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _all_reduce(values: Mapping[str, float], mean: bool) -> dict[str, float]:
    out = {k: float(v) for k, v in values.items()}
    if not _active() or not out:
        return out
    t = torch.tensor(list(out.values()), dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if mean:
        t /= dist.get_world_size()
    return dict(zip(out, t.tolist(), strict=True))


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalars over the processes (a collective: every rank must call it).

    Every rank must pass the same keys in the same order; NaN in any rank gives NaN.

    Args:
        values: name → float.

    Returns:
        name → mean over the ranks (float64 arithmetic); ``values`` as floats in one process.
    """
    return _all_reduce(values, mean=True)


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum scalars over the processes (a collective; same contract as :func:`all_reduce_mean`)."""
    return _all_reduce(values, mean=False)


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Wait for every process, then destroy the default process group (no-op without one).

    Call it on the normal path only: after an error, leave without it and let the launcher
    (torchrun, ``srun --kill-on-bad-exit=1``) stop the other processes, which may be blocked
    in a collective that this barrier would not match.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


__all__ = [
    "DistInfo",
    "LaunchEnv",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "detect_launch",
    "dist_info",
    "first_host",
    "init_distributed",
    "shutdown",
]
