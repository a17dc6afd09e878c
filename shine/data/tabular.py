"""Small tabular binary-classification data sets, as tensors with labels in ``{-1, +1}``.

The bi-level logistic-regression problems of the paper (§3.1, after Pedregosa 2016) use labels
``±1``; the loaders here return a :class:`TabularData` ready for
:class:`shine.bilevel.problems.L2LogisticRegression`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shine.harness.runtime.devices import resolve_dtype


@dataclass(frozen=True)
class TabularData:
    """A design matrix and its ``±1`` labels.

    Attributes:
        X: features, ``(n, p)``.
        y: labels in ``{-1, +1}``, ``(n,)``, same dtype as ``X``.
        name: data-set name (for logs).
    """

    X: Tensor
    y: Tensor
    name: str = "tabular"

    @property
    def n_samples(self) -> int:
        """Number of rows ``n``."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of columns ``p``."""
        return int(self.X.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TabularData:
        """Return a copy on ``device`` with floating tensors of ``dtype``."""
        return TabularData(self.X.to(device, dtype), self.y.to(device, dtype), self.name)


def load_breast_cancer(
    keep_fraction: float | None = 0.2,
    random_state: int = 3,
    dtype: torch.dtype | str = torch.float64,
    device: torch.device | str = "cpu",
) -> TabularData:
    """Wisconsin breast-cancer data (569 × 30, from scikit-learn), preprocessed as the authors did.

    This is the preprocessing of the authors' OPA inversion experiment (``main_plots_opa_df.py`` of zaccharieramzi/hoag, branch ``shine``).
    Steps: ``StandardScaler(with_mean=False)`` fitted on all 569 rows (scaling only, no centring);
    labels ``0 -> -1``, ``1 -> +1``; then, if ``keep_fraction`` is given, keep the "train" part of
    ``train_test_split(test_size=1 - keep_fraction, random_state=random_state)``. The defaults
    (0.2, 3) give the authors' 113 × 30 subset.

    Args:
        keep_fraction: fraction of rows kept, or ``None`` for all 569.
        random_state: seed of the subsampling split.
        dtype: floating dtype of the returned tensors.
        device: device of the returned tensors.

    Returns:
        The data set, named ``"breast_cancer"``.

    Raises:
        ValueError: if ``keep_fraction`` is not in ``(0, 1]``.
    """
    from sklearn.datasets import load_breast_cancer as sk_load
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = sk_load(return_X_y=True)
    X = StandardScaler(with_mean=False).fit_transform(X)
    y = np.where(y == 0, -1.0, 1.0)
    if keep_fraction is not None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if keep_fraction < 1.0:
            X, _, y, _ = train_test_split(
                X, y, test_size=1.0 - keep_fraction, random_state=random_state
            )
    resolved = resolve_dtype(dtype)
    return TabularData(
        X=torch.as_tensor(X, dtype=resolved, device=device),
        y=torch.as_tensor(y, dtype=resolved, device=device),
        name="breast_cancer",
    )
