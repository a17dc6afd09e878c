"""Schemas of the configuration groups that hold plain settings rather than objects.

The groups with a ``_target_`` (solvers, backward strategies, methods, data sets, models,
tasks) are validated by the constructors of their classes. The ``trainer`` group has no class:
its values are read through interpolations (``${trainer.f_thres}``, ...) by the other groups.
:class:`TrainerSettings` is its schema: ``train.py`` registers it in Hydra's ConfigStore as
``trainer/schema`` and every ``configs/trainer/*.yaml`` extends it, so that at composition

- an unknown key (``trainer.max_step=3``, ``+trainer.max_step=3``) is an error naming the key,
- a wrong type (``trainer.batch_size=abc``) is an error naming the key and the type,

and :meth:`TrainerSettings.check` (called by ``train.py`` before anything is built) rejects
out-of-range values with the key and the valid range.

Plain dataclasses (no Hydra import): the registration lives in ``train.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

#: valid values of the string settings
ON_NONFINITE = ("stop", "skip_step")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class TrainerSettings:
    """The ``trainer`` group: schedule of the DEQ trainings and the run policy of every run.

    ``None`` (YAML ``null``) means "not used by this experiment" for the schedule keys (the
    bi-level and OPA experiments run their own outer loop: ``configs/trainer/none.yaml``).

    Attributes:
        epochs: training epochs (pretraining included), >= 1.
        batch_size: global batch size, >= 1.
        pretrain_steps: unrolled weight-tied pretraining steps, >= 0.
        f_thres: forward solver iterations (and Broyden memory), >= 1.
        b_thres: iterations of the original (iterative) backward, >= 1.
        f_tol: forward solver tolerance, finite and > 0.
        checkpoint_every: steps between checkpoints, >= 1.
        device: ``cpu``, ``cuda``, ``cuda:N``, ... (``auto``: CUDA when available).
        dtype: one of :data:`DTYPES`.
        num_workers: data-loader worker processes, >= 0.
        num_threads: CPU threads of torch, >= 1 (``None``: torch's default).
        on_nonfinite: one of :data:`ON_NONFINITE`.
    """

    epochs: Optional[int] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    batch_size: Optional[int] = None  # noqa: UP045
    pretrain_steps: Optional[int] = None  # noqa: UP045
    f_thres: Optional[int] = None  # noqa: UP045
    b_thres: Optional[int] = None  # noqa: UP045
    f_tol: Optional[float] = None  # noqa: UP045
    checkpoint_every: Optional[int] = None  # noqa: UP045
    device: Optional[str] = None  # noqa: UP045
    dtype: Optional[str] = None  # noqa: UP045
    num_workers: Optional[int] = None  # noqa: UP045
    num_threads: Optional[int] = None  # noqa: UP045
    on_nonfinite: str = "stop"

    #: smallest valid value of each integer key
    MINIMA = {
        "epochs": 1,
        "batch_size": 1,
        "pretrain_steps": 0,
        "f_thres": 1,
        "b_thres": 1,
        "checkpoint_every": 1,
        "num_workers": 0,
        "num_threads": 1,
    }

    @classmethod
    def check(cls, values: dict[str, Any]) -> None:
        """Check the ranges of a composed ``trainer`` node (a plain dict).

        Raises:
            ValueError: naming the first out-of-range key (as ``trainer.KEY``) and its range.
        """
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"trainer.{key} is not a trainer setting; valid: {sorted(known)}")
            if value is None:
                continue
            if key in cls.MINIMA and value < cls.MINIMA[key]:
                raise ValueError(f"trainer.{key} must be >= {cls.MINIMA[key]}, got {value}")
        tol = values.get("f_tol")
        if tol is not None and not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"trainer.f_tol must be finite and > 0, got {tol}")
        if values.get("on_nonfinite", "stop") not in ON_NONFINITE:
            raise ValueError(
                f"trainer.on_nonfinite must be one of {ON_NONFINITE}, "
                f"got {values['on_nonfinite']!r}"
            )
        dtype = values.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"trainer.dtype must be one of {DTYPES}, got {dtype!r}")
