"""Data sets of the bi-level experiments (paper §3.1, Fig. 1, Fig. E.1), split train/outer/test.

The hyper-parameter optimisation problems (ℓ2-logistic regression, after Pedregosa 2016) need three
disjoint parts of one data set: the inner problem is fitted on ``train``, the outer optimiser sees
``outer`` (HOAG's "validation" set), and ``test`` is held out, never seen by the optimiser, and is
what the figures plot. The split is the authors' ``train_test_val_split`` (``hoag/benchmark.py``):

    train, rest = train_test_split(X, y, test_size=1 - train_fraction, random_state=seed)
    first, second = train_test_split(rest, test_size=0.5, random_state=seed)

with ``outer = first`` and ``test = second`` by default (``outer_half="first"``). The authors' script passes the *second* half to
HOAG and reports the loss on the first (``outer_half="second"`` reproduces that assignment).

Data sets (frozen dataclasses, meant to be built from configs; each has ``load() -> (X, y)`` with
numpy / scipy.sparse arrays and labels in ``{-1, +1}``, and ``split(seed) -> BilevelSplit``):

* :class:`News20`: the paper's 20news (scikit-learn's ``fetch_20newsgroups_vectorized``, train and
  test stacked, 18 846 × 130 107, label ``target < 10 -> -1``), rebuilt from the original archive.
* :class:`RealSim`: LIBSVM ``real-sim`` (72 309 × 20 958).
* :class:`BreastCancer`: scikit-learn's Wisconsin breast cancer (569 × 30), 50/25/25, standardised.
* :class:`SyntheticNews`: a deterministic sparse, 20news-like stand-in (no download).

Sparse designs become torch sparse CSR tensors, accepted by
:class:`shine.bilevel.problems.L2LogisticRegression`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from shine.data.tabular import TabularData
from shine.harness.runtime.devices import resolve_dtype

logger = logging.getLogger(__name__)

#: Which half of the split remainder the outer optimiser sees (the other one is the test set).
OuterHalf = Literal["first", "second"]

#: Where the original 20news "bydate" archive can be downloaded by hand.
NEWS20_URL = "http://qwone.com/~jason/20Newsgroups/20news-bydate.tar.gz"
#: File name of the 20news archive.
NEWS20_ARCHIVE = "20news-bydate.tar.gz"
#: Sub-directory of ``data_dir`` holding the extracted archive (scikit-learn's layout).
NEWS20_HOME = "20news_home"
#: sha256 of the archive scikit-learn downloads (``sklearn.datasets._twenty_newsgroups.ARCHIVE``).
NEWS20_SHA256 = "8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610"
#: Where the LIBSVM real-sim file can be downloaded.
REAL_SIM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/real-sim.bz2"

_NEWS20_TRAIN = "20news-bydate-train"
_NEWS20_TEST = "20news-bydate-test"
# scikit-learn's load_files shuffles with random_state=0, then fetch_20newsgroups (called by
# fetch_20newsgroups_vectorized) shuffles again with random_state=12: the row order of the paper.
_LOAD_FILES_SEED = 0
_FETCH_SEED = 12


# ------------------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class BilevelSplit:
    """The three disjoint parts of a bi-level data set.

    Attributes:
        train: inner-problem data (the logistic regression is fitted on it).
        outer: validation data seen by the outer (hyper-parameter) optimiser.
        test: held-out data, never seen by the optimiser (what the figures plot).
        name: data-set name (for logs).
    """

    train: TabularData
    outer: TabularData
    test: TabularData
    name: str = "bilevel"

    def __post_init__(self) -> None:
        widths = {part.n_features for part in (self.train, self.outer, self.test)}
        if len(widths) != 1:
            raise ValueError(f"the three parts have different numbers of features: {widths}")

    @property
    def n_features(self) -> int:
        """Number of features ``p`` (common to the three parts)."""
        return self.train.n_features

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Numbers of rows ``(n_train, n_outer, n_test)``."""
        return (self.train.n_samples, self.outer.n_samples, self.test.n_samples)

    def to(self, device: torch.device | str, dtype: torch.dtype | str) -> BilevelSplit:
        """Return a copy with the three parts on ``device`` in the floating ``dtype``."""
        resolved = resolve_dtype(dtype)
        return BilevelSplit(
            train=self.train.to(device, resolved),
            outer=self.outer.to(device, resolved),
            test=self.test.to(device, resolved),
            name=self.name,
        )


def split_train_outer_test(
    X: Any,
    y: Any,
    *,
    train_fraction: float,
    seed: int,
    name: str,
    standardize: bool = False,
    outer_half: OuterHalf = "first",
    dtype: torch.dtype | str = torch.float64,
    device: torch.device | str = "cpu",
) -> BilevelSplit:
    """Split ``(X, y)`` into train / outer / test with the authors' two ``train_test_split`` calls.

    ``train, rest = train_test_split(X, y, test_size=1 - train_fraction, random_state=seed)``, then
    ``first, second = train_test_split(rest, test_size=0.5, random_state=seed)``; ``outer`` is
    ``first`` and ``test`` is ``second`` (swapped with ``outer_half="second"``, the assignment of
    the authors' ``hoag/benchmark.py``). With ``standardize``, a ``StandardScaler`` (centring and
    scaling) is fitted on ``train`` only and applied to the three parts.

    Args:
        X: design matrix ``(n, p)``: a dense array or a ``scipy.sparse`` matrix.
        y: labels ``(n,)`` with two distinct values; ``{-1, +1}`` are kept, ``{0, 1}`` map to
            ``{-1, +1}``, any other pair maps smaller -> ``-1``, larger -> ``+1``.
        train_fraction: fraction of rows in ``train``, in ``(0, 1)`` (paper: 0.9).
        seed: ``random_state`` of both splits (the run index in the paper).
        name: data-set name; the parts are named ``name/train``, ``name/outer``, ``name/test``.
        standardize: fit a ``StandardScaler`` on ``train`` (dense ``X`` only).
        outer_half: which half of the remainder is ``outer`` (``"first"`` or ``"second"``).
        dtype: floating dtype of the tensors.
        device: device of the tensors.

    Returns:
        The split; a sparse ``X`` gives torch sparse CSR design matrices, a dense one strided
        tensors; labels are dense ``{-1, +1}`` tensors of the same dtype.

    Raises:
        ValueError: on an invalid ``train_fraction``, ``seed`` or ``outer_half``, mismatched
            shapes, labels with other than two values, a sparse ``X`` with ``standardize``, a
            non-floating ``dtype``, or a data set too small to give three non-empty parts.
    """
    from sklearn.model_selection import train_test_split

    _check_fraction(train_fraction)
    _check_outer_half(outer_half)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    resolved = resolve_dtype(dtype)
    if not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {resolved}")
    sparse = sp.issparse(X)
    if sparse:
        X = sp.csr_matrix(X, dtype=np.float64)
    else:
        X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a matrix (n, p), got shape {X.shape}")
    y = _as_plus_minus_one(y)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    if standardize and sparse:
        raise ValueError("standardize=True needs a dense X (centring would densify a sparse one)")

    X_train, X_rest, y_train, y_rest = train_test_split(
        X, y, test_size=1.0 - train_fraction, random_state=int(seed)
    )
    if X_rest.shape[0] < 2:
        raise ValueError(
            f"{X.shape[0]} rows with train_fraction={train_fraction} leave {X_rest.shape[0]} "
            "row(s) for the outer and test sets; at least 2 are needed"
        )
    X_first, X_second, y_first, y_second = train_test_split(
        X_rest, y_rest, test_size=0.5, random_state=int(seed)
    )
    if outer_half == "first":
        X_outer, y_outer, X_test, y_test = X_first, y_first, X_second, y_second
    else:
        X_outer, y_outer, X_test, y_test = X_second, y_second, X_first, y_first

    if standardize:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X_train)
        X_train, X_outer, X_test = (scaler.transform(a) for a in (X_train, X_outer, X_test))

    def part(X_part: Any, y_part: np.ndarray, suffix: str) -> TabularData:
        return TabularData(
            X=_design_tensor(X_part, resolved, device),
            y=torch.as_tensor(y_part, dtype=resolved, device=device),
            name=f"{name}/{suffix}",
        )

    return BilevelSplit(
        train=part(X_train, y_train, "train"),
        outer=part(X_outer, y_outer, "outer"),
        test=part(X_test, y_test, "test"),
        name=name,
    )


# ----------------------------------------------------------------------------------- data sets
class BilevelDataset(Protocol):
    """What the bi-level experiments need from a data set."""

    name: str

    def load(self) -> tuple[Any, np.ndarray]:
        """The whole data set: ``X`` (numpy or scipy.sparse, ``(n, p)``), ``y`` ``(n,)`` in ±1."""
        ...

    def split(
        self,
        seed: int,
        dtype: torch.dtype | str = torch.float64,
        device: torch.device | str = "cpu",
    ) -> BilevelSplit:
        """The train / outer / test split of seed ``seed``, as tensors."""
        ...


class _Splittable:
    """The split shared by the data-set dataclasses: validated fields, cached ``load``, ``split``.

    Each data set is a frozen dataclass deriving from this mixin; it declares the split fields
    ``train_fraction`` (fraction of rows in ``train``), ``outer_half`` (which half of the
    remainder the outer optimiser sees, module docstring) and ``name`` itself, so that its
    constructor keeps its own argument order and defaults. This mixin validates them
    (:meth:`__post_init__`; a data set with checks of its own calls it after them), loads the
    data once per instance and splits them by seed (:meth:`split`).
    """

    name: str
    train_fraction: float
    outer_half: OuterHalf

    def __post_init__(self) -> None:
        """Validate the split fields.

        Raises:
            ValueError: on an invalid ``train_fraction`` or ``outer_half``.
        """
        _check_fraction(self.train_fraction)
        _check_outer_half(self.outer_half)

    def load(self) -> tuple[Any, np.ndarray]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def _standardize(self) -> bool:
        return False

    @cached_property
    def _arrays(self) -> tuple[Any, np.ndarray]:
        # per-instance memo (frozen dataclasses have a __dict__): reading 20news / real-sim takes
        # seconds, and a run splits the same data for several seeds
        return self.load()

    def split(
        self,
        seed: int,
        dtype: torch.dtype | str = torch.float64,
        device: torch.device | str = "cpu",
    ) -> BilevelSplit:
        """The train / outer / test split of seed ``seed`` (see :func:`split_train_outer_test`).

        The data are loaded on the first call and kept by this instance.

        Args:
            seed: ``random_state`` of the two splits.
            dtype: floating dtype of the tensors.
            device: device of the tensors.

        Returns:
            The split, named after the data set.
        """
        X, y = self._arrays
        return split_train_outer_test(
            X,
            y,
            train_fraction=self.train_fraction,
            seed=seed,
            name=self.name,
            standardize=self._standardize,
            outer_half=self.outer_half,
            dtype=dtype,
            device=device,
        )


@dataclass(frozen=True)
class News20(_Splittable):
    """The paper's 20news: ``fetch_20newsgroups_vectorized`` train + test, binarised.

    18 846 × 130 107 sparse rows of ℓ2-normalised word counts (vocabulary of the 11 314 training
    documents), training documents first; label ``-1`` for the first ten (sorted) newsgroups,
    ``+1`` for the others. Sources, in this order:

    1. the extracted archive ``data_dir/20news_home/20news-bydate-{train,test}/<group>/<doc>`` (or
       the two folders directly in ``data_dir``), vectorised exactly as scikit-learn does it (same
       row order, vocabulary and values; nothing is unpickled);
    2. the archive ``data_dir/20news-bydate.tar.gz`` (or ``data_dir/20news_home/...``), extracted
       safely to ``data_dir/20news_home`` first;
    3. with ``download=True``, scikit-learn's ``fetch_20newsgroups_vectorized(data_home=data_dir)``
       (needs network; scikit-learn keeps its own pickled caches in ``data_dir``).

    Args:
        data_dir: data root (the ``paths.data_dir`` config key).
        download: let scikit-learn download the data when the files are absent.
        train_fraction: fraction of rows in ``train`` (paper: 0.9, i.e. 90/5/5).
        outer_half: which half of the remainder the outer optimiser sees (module docstring).
        name: data-set name.

    Raises:
        ValueError: on an invalid ``train_fraction`` or ``outer_half``.
    """

    data_dir: str
    download: bool = False
    train_fraction: float = 0.9
    outer_half: OuterHalf = "first"
    name: str = "20news"

    def load(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """Read (or download) and vectorise 20news.

        Returns:
            ``X``: CSR float64 ``(18846, 130107)`` for the real data; ``y``: float64 ``±1``.

        Raises:
            FileNotFoundError: if the data are absent and ``download`` is false; the message says
                where to put the archive.
            ValueError: if the archive has a member with an unsafe path, or the extracted tree is
                inconsistent (different newsgroups in train and test).
        """
        data_dir = Path(self.data_dir).expanduser()
        root = _find_news20_tree(data_dir)
        if root is None:
            archive = _find_news20_archive(data_dir)
            if archive is not None:
                root = data_dir / NEWS20_HOME
                _extract_news20(archive, root)
        if root is not None:
            X, target = _vectorize_news20(root)
        elif self.download:
            from sklearn.datasets import fetch_20newsgroups_vectorized

            logger.info("20news not found in %s: downloading it with scikit-learn", data_dir)
            X, target = fetch_20newsgroups_vectorized(
                subset="all", data_home=str(data_dir), download_if_missing=True, return_X_y=True
            )
            X = sp.csr_matrix(X, dtype=np.float64)
        else:
            raise FileNotFoundError(_news20_missing_message(data_dir))
        # the authors' binarisation (hoag/benchmark.py::get_20_news)
        y = np.where(np.asarray(target) < 10, -1.0, 1.0)
        return X, y


@dataclass(frozen=True)
class RealSim(_Splittable):
    """LIBSVM ``real-sim`` (72 309 × 20 958, sparse, labels ``±1``).

    Read with ``sklearn.datasets.load_svmlight_file`` (plain or ``.bz2``), as is (the number of
    features is the largest index in the file).

    Args:
        path: the ``real-sim`` / ``real-sim.bz2`` file, or a directory holding one of them; the
            other of the two names is tried too.
        train_fraction: fraction of rows in ``train`` (paper: 0.9).
        outer_half: which half of the remainder the outer optimiser sees (module docstring).
        name: data-set name.

    Raises:
        ValueError: on an invalid ``train_fraction`` or ``outer_half``.
    """

    path: str
    train_fraction: float = 0.9
    outer_half: OuterHalf = "first"
    name: str = "real-sim"

    def load(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """Read the svmlight file.

        Returns:
            ``X``: CSR float64 ``(n, p)``; ``y``: float64 ``±1``.

        Raises:
            FileNotFoundError: if no candidate file exists; the message gives the download URL
                and the expected path.
        """
        from sklearn.datasets import load_svmlight_file

        path = Path(self.path).expanduser()
        if path.is_dir():
            compressed, plain = path / "real-sim.bz2", path / "real-sim"
        elif path.suffix == ".bz2":
            compressed, plain = path, path.with_suffix("")
        else:
            compressed, plain = path.with_name(path.name + ".bz2"), path
        candidates = [compressed, plain] if path.suffix == ".bz2" else [plain, compressed]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"real-sim not found: no file {plain} or {compressed}. Download {REAL_SIM_URL} "
                f"and save it as {compressed} (or decompressed as {plain}), or set the "
                "dataset's `path` (dataset.path; the configs put it under the config key "
                "paths.data_dir, which defaults to the environment variable SHINE_DATA)."
            )
        logger.info("reading %s", found)
        X, y = load_svmlight_file(str(found), dtype=np.float64)
        return sp.csr_matrix(X), _as_plus_minus_one(y)


@dataclass(frozen=True)
class BreastCancer(_Splittable):
    """scikit-learn's Wisconsin breast cancer (569 × 30), the offline dense stand-in.

    Labels ``-1`` for class 0 (malignant), ``+1`` otherwise. Default split 50/25/25 (the paper's
    90/5/5 leaves 28 outer rows, a degenerate hyper-parameter problem), with a ``StandardScaler``
    fitted on ``train``.

    Args:
        train_fraction: fraction of rows in ``train``.
        standardize: fit a ``StandardScaler`` on ``train`` and apply it to the three parts.
        outer_half: which half of the remainder the outer optimiser sees (module docstring).
        name: data-set name.

    Raises:
        ValueError: on an invalid ``train_fraction`` or ``outer_half``.
    """

    train_fraction: float = 0.5
    standardize: bool = True
    outer_half: OuterHalf = "first"
    name: str = "breast_cancer"

    @property
    def _standardize(self) -> bool:
        return self.standardize

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw (unscaled) data.

        Returns:
            ``X``: float64 ``(569, 30)``; ``y``: float64 ``±1``.
        """
        from sklearn.datasets import load_breast_cancer

        X, target = load_breast_cancer(return_X_y=True)
        return np.asarray(X, dtype=np.float64), np.where(target == 0, -1.0, 1.0)


@dataclass(frozen=True)
class SyntheticNews(_Splittable):
    """A deterministic sparse, 20news-like logistic-regression data set (no download).

    The generator (deterministic given ``data_seed``)::

        rng = RandomState(data_seed)
        cols = rng.randint(0, d, (n, k)); vals = rng.rand(n, k)
        X = CSR((vals, cols, arange(0, n·k + 1, k))); X.sum_duplicates(); X = normalize(X)
        w = rng.randn(d) · 8
        y_i = +1 if rng.rand() < σ(x_iᵀw) else -1

    Presets: small ``(8000, 5000, 50)`` (the defaults) and 20news-sized
    ``(18000, 100000, 100)``.

    With ``zipf_exponent = a > 0`` the columns are drawn with probabilities ``∝ 1/r^a`` over a
    random ranking of the columns instead of uniformly (word frequencies in text follow such a
    law with ``a ≈ 1``): a few columns are dense, most are rare, and the inner Hessian becomes
    as ill-conditioned as 20news's, which is what makes the iterative backward of HOAG costly.
    ``a = 0`` is the recipe above, bit for bit.

    Args:
        n_samples: rows ``n``.
        n_features: columns ``d``.
        nnz_per_row: draws per row ``k`` (columns drawn twice are summed, so rows have at most
            ``k`` non-zeros).
        data_seed: seed of the generator (the split seed is separate).
        train_fraction: fraction of rows in ``train``.
        outer_half: which half of the remainder the outer optimiser sees (module docstring).
        name: data-set name.
        zipf_exponent: ``a >= 0`` of the column law (0: uniform).

    Raises:
        ValueError: on non-positive sizes, a negative ``data_seed`` or ``zipf_exponent``, an
            invalid ``train_fraction`` or ``outer_half``.
    """

    n_samples: int = 8000
    n_features: int = 5000
    nnz_per_row: int = 50
    data_seed: int = 0
    train_fraction: float = 0.9
    outer_half: OuterHalf = "first"
    name: str = "synthetic_news"
    zipf_exponent: float = 0.0

    def __post_init__(self) -> None:
        if not float(self.zipf_exponent) >= 0.0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent!r}")
        for field_name in ("n_samples", "n_features", "nnz_per_row"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        seed = self.data_seed
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"data_seed must be a non-negative integer, got {seed!r}")
        super().__post_init__()

    def load(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """Generate the data.

        Returns:
            ``X``: CSR float64 ``(n_samples, n_features)`` with unit-norm rows; ``y``: float64 ±1.
        """
        from scipy.special import expit
        from sklearn.preprocessing import normalize

        n, d, k = int(self.n_samples), int(self.n_features), int(self.nnz_per_row)
        rng = np.random.RandomState(int(self.data_seed))
        if self.zipf_exponent > 0:
            ranking = rng.permutation(d)
            probs = 1.0 / np.arange(1, d + 1, dtype=np.float64) ** float(self.zipf_exponent)
            cols = ranking[rng.choice(d, size=(n, k), p=probs / probs.sum())]
        else:
            cols = rng.randint(0, d, (n, k))
        vals = rng.rand(n, k)
        X = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, d))
        X.sum_duplicates()
        X = sp.csr_matrix(normalize(X, norm="l2"))  # x_i / ‖x_i‖ (a zero row would stay zero)
        X.sum_duplicates()  # already canonical; sets the flag
        w = rng.randn(d) * 8
        y = np.where(rng.rand(n) < expit(X @ w), 1.0, -1.0)
        return X, y


# ------------------------------------------------------------------------------------- helpers
def _check_fraction(train_fraction: float) -> None:
    """Raise unless ``0 < train_fraction < 1``."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float):
        raise ValueError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}")
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")


def _check_outer_half(outer_half: str) -> None:
    """Raise unless ``outer_half`` is ``"first"`` or ``"second"``."""
    if outer_half not in ("first", "second"):
        raise ValueError(f"outer_half must be 'first' or 'second', got {outer_half!r}")


def _as_plus_minus_one(y: Any) -> np.ndarray:
    """Map two-valued labels to float64 ``{-1, +1}`` (see :func:`split_train_outer_test`)."""
    y = np.asarray(y).reshape(-1)
    values = np.unique(y)
    if values.size > 2 or values.size == 0:
        raise ValueError(f"binary labels expected, got {values.size} distinct values")
    if set(values.tolist()) <= {-1, 1}:
        return y.astype(np.float64)
    if set(values.tolist()) <= {0, 1}:
        return np.where(y == 0, -1.0, 1.0)
    if values.size == 1:
        raise ValueError(f"cannot tell the sign of the single label value {values[0]!r}")
    return np.where(y == values[0], -1.0, 1.0)


def _design_tensor(X: Any, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A dense array as a strided tensor, a scipy.sparse matrix as a sparse CSR tensor."""
    if not sp.issparse(X):
        return torch.from_numpy(np.array(X, dtype=np.float64)).to(device=device, dtype=dtype)
    csr = sp.csr_matrix(X, dtype=np.float64, copy=True)
    csr.sum_duplicates()  # canonical format: sorted, unique column indices
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        tensor = torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data).to(dtype),
            size=csr.shape,
            check_invariants=False,
        )
    return tensor.to(device)


def _find_news20_tree(data_dir: Path) -> Path | None:
    """The directory holding both extracted 20news folders, if any."""
    for root in (data_dir / NEWS20_HOME, data_dir):
        if (root / _NEWS20_TRAIN).is_dir() and (root / _NEWS20_TEST).is_dir():
            return root
    return None


def _find_news20_archive(data_dir: Path) -> Path | None:
    """The 20news archive, if any."""
    for archive in (data_dir / NEWS20_ARCHIVE, data_dir / NEWS20_HOME / NEWS20_ARCHIVE):
        if archive.is_file():
            return archive
    return None


def _news20_missing_message(data_dir: Path) -> str:
    """The message of the ``FileNotFoundError`` raised when 20news is absent."""
    message = (
        f"20news not found in {data_dir}: expected the folders "
        f"{data_dir / NEWS20_HOME / _NEWS20_TRAIN} and {data_dir / NEWS20_HOME / _NEWS20_TEST}, "
        f"or the archive {data_dir / NEWS20_ARCHIVE}. Download {NEWS20_URL} and put it at "
        f"{data_dir / NEWS20_ARCHIVE} (dataset.data_dir; the configs put it under the config key "
        "paths.data_dir, which defaults to the environment variable SHINE_DATA), or pass "
        "dataset.download=true on a machine with network access (scikit-learn then downloads "
        "and caches it there)."
    )
    caches = sorted(p.name for p in data_dir.glob("20news*.pk*")) if data_dir.is_dir() else []
    if caches:
        message += (
            f" scikit-learn caches are present ({', '.join(caches)}); dataset.download=true "
            "reads them through scikit-learn (which unpickles them)."
        )
    return message


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse archive members that could write outside the destination, links and devices."""
    name = member.name
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or name.startswith(("/", "\\"))
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise ValueError(f"refusing to extract {archive}: member {name!r} has an unsafe path")
    if not (member.isfile() or member.isdir()):
        raise ValueError(
            f"refusing to extract {archive}: member {name!r} is not a regular file or directory"
        )


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_news20(archive: Path, root: Path) -> None:
    """Extract the two 20news folders of ``archive`` into ``root`` (members checked first).

    Extraction goes to a temporary directory next to ``root``; the folders are then moved into
    place, so an interrupted extraction leaves no half-written tree behind.
    """
    digest = _sha256(archive)
    if digest != NEWS20_SHA256:
        logger.warning(
            "%s has sha256 %s, not that of the archive scikit-learn downloads (%s)",
            archive,
            digest,
            NEWS20_SHA256,
        )
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(archive, member)
        tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
        missing = {_NEWS20_TRAIN, _NEWS20_TEST} - tops
        if missing:
            raise ValueError(f"{archive} has no folder {', '.join(sorted(missing))} at its top")
        logger.info("extracting %s into %s", archive, root)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
        try:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: belt and braces
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; the members were checked above
                tar.extractall(tmp, members=members)
            for folder in (_NEWS20_TRAIN, _NEWS20_TEST):
                if not (root / folder).exists():
                    os.replace(tmp / folder, root / folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_news20_folder(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Documents and targets of one 20news folder, in the order of ``fetch_20newsgroups``."""
    from sklearn.datasets import load_files

    # load_files: sorted newsgroup folders, sorted files, latin-1, shuffled with random_state=0
    bunch = load_files(str(folder), encoding="latin1", random_state=_LOAD_FILES_SEED)
    order = np.arange(len(bunch.data))
    np.random.RandomState(_FETCH_SEED).shuffle(order)
    docs: Sequence[str] = bunch.data
    return [docs[i] for i in order], np.asarray(bunch.target)[order], list(bunch.target_names)


def _vectorize_news20(root: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """``fetch_20newsgroups_vectorized(subset="all")`` computed from the extracted archive."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    logger.info("vectorising 20news from %s", root)
    train_docs, train_target, train_groups = _read_news20_folder(root / _NEWS20_TRAIN)
    test_docs, test_target, test_groups = _read_news20_folder(root / _NEWS20_TEST)
    if train_groups != test_groups:
        raise ValueError(
            f"{root}: the train and test folders hold different newsgroups "
            f"({train_groups} vs {test_groups})"
        )
    # scikit-learn stores the counts as int16 (and so do we: same values, overflow included)
    vectorizer = CountVectorizer(dtype=np.int16)
    X_train = normalize(vectorizer.fit_transform(train_docs).tocsr().astype(np.float64))
    X_test = normalize(vectorizer.transform(test_docs).tocsr().astype(np.float64))
    X = sp.csr_matrix(sp.vstack((X_train, X_test)))
    return X, np.concatenate((train_target, test_target))


__all__ = [
    "NEWS20_ARCHIVE",
    "NEWS20_URL",
    "REAL_SIM_URL",
    "BilevelDataset",
    "BilevelSplit",
    "BreastCancer",
    "News20",
    "OuterHalf",
    "RealSim",
    "SyntheticNews",
    "split_train_outer_test",
]
