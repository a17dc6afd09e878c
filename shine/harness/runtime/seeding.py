"""Seeding of the global random number generators (python, numpy, torch)."""

from __future__ import annotations

import random

import numpy as np
import torch

from shine.rng import derived_seed

__all__ = ["derived_seed", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices) with ``seed``.

    Library code should prefer explicit ``torch.Generator`` objects; this only fixes the global
    streams that third-party code (initialisers, data loaders) draws from.

    Args:
        seed: a non-negative integer.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
