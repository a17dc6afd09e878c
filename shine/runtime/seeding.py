"""Seeding of the global random number generators (python, numpy, torch)."""

from __future__ import annotations

import random

import numpy as np
import torch


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


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. ``derived_seed(base_seed, index)``.

    Independent streams for ``(base, 0), (base, 1), ...`` that do not overlap those of
    ``(base + 1, ...)``, unlike ``base + index``.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
