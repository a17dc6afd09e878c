"""Data sets used by the experiments, returned as tensors."""

from shine.data.bilevel import (
    BilevelDataset,
    BilevelSplit,
    BreastCancer,
    News20,
    RealSim,
    SyntheticNews,
    split_train_outer_test,
)
from shine.data.tabular import TabularData, load_breast_cancer

__all__ = [
    "BilevelDataset",
    "BilevelSplit",
    "BreastCancer",
    "News20",
    "RealSim",
    "SyntheticNews",
    "TabularData",
    "load_breast_cancer",
    "split_train_outer_test",
]
