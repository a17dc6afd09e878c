"""Seeds for explicit random generators (no global state), shared by the library and harness."""

from __future__ import annotations

import numpy as np


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. ``derived_seed(base_seed, index)``.

    Independent streams for ``(base, 0), (base, 1), ...`` that do not overlap those of
    ``(base + 1, ...)``, unlike ``base + index``.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
