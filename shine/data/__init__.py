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
from shine.data.images import (
    CIFAR10Data,
    DigitsData,
    GlobalBatchSampler,
    ImageDataSpec,
    ImageNetData,
    RandomShift,
    SeededItems,
    SyntheticImages,
    TensorImageDataset,
    cifar10_transforms,
    imagenet_transforms,
    make_loader,
    seed_worker,
)
from shine.data.tabular import TabularData, load_breast_cancer

__all__ = [
    "BilevelDataset",
    "BilevelSplit",
    "BreastCancer",
    "CIFAR10Data",
    "DigitsData",
    "GlobalBatchSampler",
    "ImageDataSpec",
    "ImageNetData",
    "News20",
    "RandomShift",
    "RealSim",
    "SeededItems",
    "SyntheticImages",
    "SyntheticNews",
    "TabularData",
    "TensorImageDataset",
    "cifar10_transforms",
    "imagenet_transforms",
    "load_breast_cancer",
    "make_loader",
    "seed_worker",
    "split_train_outer_test",
]
