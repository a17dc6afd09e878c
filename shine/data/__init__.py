"""Data sets used by the experiments, returned as tensors."""

from shine.data.tabular import TabularData, load_breast_cancer

__all__ = ["TabularData", "load_breast_cancer"]
