"""Shared pytest configuration: tests marked ``gpu`` are skipped without a CUDA device.

Importing ``train`` registers the config schemas (``trainer/schema``) that the tests which
compose configs directly need.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402, F401  (registers the config schemas)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _config_schemas():
    """Register the config schemas before each test (a test may reset Hydra's singletons)."""
    train.register_schemas()
