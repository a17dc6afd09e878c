"""Experiments runnable by ``train.py``: objects with ``run(run_dir) -> metrics | None``."""

from shine.tasks.base import Task
from shine.tasks.classification import ImageClassification
from shine.tasks.hyperopt import HyperparameterOptimization
from shine.tasks.opa_inversion import OPAInversion

__all__ = ["HyperparameterOptimization", "ImageClassification", "OPAInversion", "Task"]
