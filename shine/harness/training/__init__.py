"""The shared trainer: one outer loop driver for the bi-level and the DEQ experiments."""

from shine.harness.training.trainer import Stepper, Trainer

__all__ = ["Stepper", "Trainer"]
