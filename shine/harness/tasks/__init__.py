"""Experiments runnable by ``train.py``: objects with ``run(run_dir) -> metrics | None``."""

from shine.harness.tasks.base import Task
from shine.harness.tasks.classification import ImageClassification
from shine.harness.tasks.hyperopt import HyperparameterOptimization
from shine.harness.tasks.opa_inversion import OPAInversion

__all__ = ["HyperparameterOptimization", "ImageClassification", "OPAInversion", "Task"]
