"""Train a small DEQ for a few SGD steps, under DDP (torchrun, gloo) or in one process.

Usage: ``python ddp_deq_worker.py OUT.pt STRATEGY STEPS`` (one process) or
``torchrun --standalone --nproc_per_node=2 ddp_deq_worker.py OUT.pt STRATEGY STEPS`` with
STRATEGY ``ift`` or ``shine``. The global batch is the
same in both cases; rank r takes its contiguous share. Rank 0 saves the final parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from shine.backward import IFT, Shine
from shine.deq import DEQLayer
from shine.solvers import Broyden

DT = torch.float64
GLOBAL_BATCH, DIM = 8, 6
STRATEGIES = {"ift": IFT(max_iter=60, tol=1e-13), "shine": Shine()}


class Model(nn.Module):
    def __init__(self, strategy: str = "shine") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(DIM, DIM, dtype=DT, generator=gen)
        self.W = nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, 2))
        self.head = nn.Linear(DIM, 1, dtype=DT)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, DIM, dtype=DT, generator=gen))
            self.head.bias.zero_()
        # SHINE's estimate is only as accurate as its secant pairs: a solve pushed to 1e-12
        # stores steps ‖s‖ ~ 1e-12 whose differences y carry 1e-4 relative rounding, which the
        # different batch split of DDP changes; 1e-9 keeps the pairs well above rounding
        tol = 1e-12 if strategy == "ift" else 1e-9
        self.deq = DEQLayer(self.f, Broyden(max_iter=50, tol=tol), STRATEGIES[strategy])

    def f(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(x)).squeeze(-1)


def main(out: str, strategy: str, steps: int) -> None:
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    model = Model(strategy)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    share = GLOBAL_BATCH // world
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, DIM, dtype=DT, generator=gen)
        y = torch.randn(GLOBAL_BATCH, dtype=DT, generator=gen)
        xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad()
        loss = ((net(xs) - ys) ** 2).mean()  # DDP averages the per-rank means
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
        # gloo's background threads can abort the interpreter's shutdown ("terminate called
        # without an active exception", SIGABRT) after all work is done: leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
