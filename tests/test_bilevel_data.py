"""Bi-level data layer: the train/outer/test split recipe and the four data sets (all offline)."""

from __future__ import annotations

import bz2
import io
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.datasets import dump_svmlight_file
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler, normalize

from shine.bilevel.problems import L2LogisticRegression
from shine.data import (
    BilevelSplit,
    BreastCancer,
    News20,
    RealSim,
    SyntheticNews,
    TabularData,
    split_train_outer_test,
)
from shine.data.bilevel import NEWS20_URL, REAL_SIM_URL


# --------------------------------------------------------------------------------- helpers
def _ids(part: TabularData) -> list[int]:
    """Row identities: column 0 of the test designs holds the original row index."""
    X = part.X.to_dense() if part.X.layout != torch.strided else part.X
    return [int(v) for v in X[:, 0].tolist()]


def _identified(n: int = 101, p: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.arange(n, dtype=float), rng.normal(size=(n, p - 1))])
    y = np.where(rng.random(n) < 0.5, 0, 1)
    return X, y


def _sizes(n: int, train_fraction: float) -> tuple[int, int, int]:
    """What scikit-learn's two train_test_split calls give (n_test = ceil(test_size * n))."""
    n_rest = math.ceil((1.0 - train_fraction) * n)
    n_second = math.ceil(0.5 * n_rest)
    return n - n_rest, n_rest - n_second, n_second


def _dense(X: torch.Tensor) -> torch.Tensor:
    return X.to_dense() if X.layout != torch.strided else X


# ----------------------------------------------------------------------------------- split
@pytest.mark.parametrize("train_fraction", [0.9, 0.5, 0.7])
def test_split_sizes_disjoint_and_complete(train_fraction):
    X, y = _identified()
    split = split_train_outer_test(X, y, train_fraction=train_fraction, seed=3, name="toy")
    assert isinstance(split, BilevelSplit)
    assert split.sizes == _sizes(101, train_fraction)
    ids = [set(_ids(part)) for part in (split.train, split.outer, split.test)]
    assert sum(map(len, ids)) == 101
    assert set().union(*ids) == set(range(101))
    assert split.n_features == 4
    assert split.train.name == "toy/train" and split.test.name == "toy/test"
    assert split.train.X.dtype == torch.float64 and split.train.y.dtype == torch.float64
    for part in (split.train, split.outer, split.test):  # {0, 1} labels mapped to ±1
        assert set(part.y.tolist()) <= {-1.0, 1.0}
        # labels travel with their rows
        expected = np.where(y[_ids(part)] == 0, -1.0, 1.0)
        assert part.y.tolist() == expected.tolist()


def test_split_matches_sklearn_first_half_outer_second_half_test():
    X, y = _identified()
    split = split_train_outer_test(X, y, train_fraction=0.9, seed=7, name="toy")
    ids = np.arange(101)
    train, rest = train_test_split(ids, test_size=1 - 0.9, random_state=7)
    first, second = train_test_split(rest, test_size=0.5, random_state=7)
    assert _ids(split.train) == train.tolist()
    assert _ids(split.outer) == first.tolist()
    assert _ids(split.test) == second.tolist()
    swapped = split_train_outer_test(
        X, y, train_fraction=0.9, seed=7, name="toy", outer_half="second"
    )
    assert _ids(swapped.outer) == second.tolist()
    assert _ids(swapped.test) == first.tolist()


def test_split_deterministic_per_seed_and_different_across_seeds():
    X, y = _identified()
    a = split_train_outer_test(X, y, train_fraction=0.5, seed=0, name="toy")
    b = split_train_outer_test(X, y, train_fraction=0.5, seed=0, name="toy")
    c = split_train_outer_test(X, y, train_fraction=0.5, seed=1, name="toy")
    for pa, pb in zip((a.train, a.outer, a.test), (b.train, b.outer, b.test), strict=True):
        assert torch.equal(pa.X, pb.X) and torch.equal(pa.y, pb.y)
    assert _ids(a.train) != _ids(c.train)
    assert _ids(a.outer) != _ids(c.outer)


def test_standardization_is_fitted_on_train_only():
    X, y = _identified(n=200, p=5)
    X[:, 1:] = X[:, 1:] * 3.0 + 5.0
    split = split_train_outer_test(X, y, train_fraction=0.5, seed=2, name="toy", standardize=True)
    raw = split_train_outer_test(X, y, train_fraction=0.5, seed=2, name="toy")
    scaler = StandardScaler().fit(raw.train.X.numpy())
    for scaled, plain in ((split.train, raw.train), (split.outer, raw.outer)):
        expected = scaler.transform(plain.X.numpy())
        np.testing.assert_allclose(scaled.X.numpy(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(split.train.X.mean(0), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(
        split.train.X.std(0, unbiased=False), torch.ones(5, dtype=torch.float64)
    )
    # the outer and test parts are not re-centred on themselves
    assert split.outer.X.mean(0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dense"):
        split_train_outer_test(
            sp.csr_matrix(X), y, train_fraction=0.5, seed=0, name="toy", standardize=True
        )


def test_sparse_split_matches_dense_and_gives_the_same_logistic_loss():
    rng = np.random.default_rng(0)
    X = sp.random(80, 30, density=0.2, format="csr", random_state=1)
    X = sp.csr_matrix(sp.hstack([sp.csr_matrix(np.arange(80.0)[:, None]), X]))
    y = np.where(rng.random(80) < 0.5, -1, 1)
    sparse = split_train_outer_test(X, y, train_fraction=0.5, seed=4, name="s")
    dense = split_train_outer_test(X.toarray(), y, train_fraction=0.5, seed=4, name="d")
    assert sparse.train.X.layout == torch.sparse_csr
    assert dense.train.X.layout == torch.strided
    sparse_parts = (sparse.train, sparse.outer, sparse.test)
    for ps, pd in zip(sparse_parts, (dense.train, dense.outer, dense.test), strict=True):
        assert torch.equal(ps.X.to_dense(), pd.X)
        assert torch.equal(ps.y, pd.y)
    w = torch.randn(31, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss_sparse = L2LogisticRegression(sparse.train.X, sparse.train.y).loss(w)
    loss_dense = L2LogisticRegression(dense.train.X, dense.train.y).loss(w)
    torch.testing.assert_close(loss_sparse, loss_dense, rtol=1e-12, atol=0)
    # dtype/device conversion of a sparse split
    single = sparse.to("cpu", "float32")
    assert single.train.X.layout == torch.sparse_csr and single.train.X.dtype == torch.float32
    assert single.test.y.dtype == torch.float32
    lowered = split_train_outer_test(X, y, train_fraction=0.5, seed=4, name="s", dtype="float32")
    assert lowered.outer.X.dtype == torch.float32
    L2LogisticRegression(single.train.X, single.train.y).loss(w.float())


def test_split_rejects_bad_arguments():
    X, y = _identified(n=20)
    for fraction in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_fraction"):
            split_train_outer_test(X, y, train_fraction=fraction, seed=0, name="t")
    with pytest.raises(ValueError, match="outer_half"):
        split_train_outer_test(X, y, train_fraction=0.5, seed=0, name="t", outer_half="third")
    with pytest.raises(ValueError, match="rows"):
        split_train_outer_test(X, y[:-1], train_fraction=0.5, seed=0, name="t")
    with pytest.raises(ValueError, match="binary"):
        split_train_outer_test(X, np.arange(20) % 3, train_fraction=0.5, seed=0, name="t")
    with pytest.raises(ValueError, match="at least 2"):
        split_train_outer_test(X, y, train_fraction=0.99, seed=0, name="t")
    with pytest.raises(ValueError, match="seed"):
        split_train_outer_test(X, y, train_fraction=0.5, seed=None, name="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating"):
        split_train_outer_test(X, y, train_fraction=0.5, seed=0, name="t", dtype=torch.int64)
    with pytest.raises(ValueError, match="train_fraction"):
        BreastCancer(train_fraction=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        SyntheticNews(n_samples=0)
    with pytest.raises(ValueError, match="nnz_per_row"):
        SyntheticNews(nnz_per_row=-1)
    with pytest.raises(ValueError, match="data_seed"):
        SyntheticNews(data_seed=-1)
    with pytest.raises(ValueError, match="outer_half"):
        News20(data_dir=".", outer_half="last")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- breast cancer
def test_breast_cancer_split():
    data = BreastCancer()
    X, y = data.load()
    assert X.shape == (569, 30)
    assert set(np.unique(y).tolist()) == {-1.0, 1.0}
    assert (y == -1).sum() == 212  # malignant = class 0
    split = data.split(0)
    assert split.sizes == _sizes(569, 0.5) == (284, 142, 143)
    assert split.name == "breast_cancer"
    torch.testing.assert_close(split.train.X.mean(0), torch.zeros(30, dtype=torch.float64))
    assert set(split.test.y.tolist()) == {-1.0, 1.0}
    raw = BreastCancer(standardize=False).split(0)
    assert raw.train.X.mean(0).abs().max() > 100  # unscaled features


# -------------------------------------------------------------------------------- synthetic
def test_synthetic_news_shapes_norms_labels_determinism():
    data = SyntheticNews(n_samples=300, n_features=200, nnz_per_row=10, data_seed=3)
    X, y = data.load()
    assert X.shape == (300, 200) and sp.isspmatrix_csr(X)
    row_nnz = np.diff(X.indptr)
    assert row_nnz.max() <= 10 and X.nnz > 0.9 * 300 * 10  # few duplicates summed
    assert X.has_canonical_format
    np.testing.assert_allclose(sp.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
    assert set(np.unique(y).tolist()) == {-1.0, 1.0}
    X2, y2 = SyntheticNews(n_samples=300, n_features=200, nnz_per_row=10, data_seed=3).load()
    assert np.array_equal(X.indptr, X2.indptr) and np.array_equal(X.indices, X2.indices)
    assert np.array_equal(X.data, X2.data) and np.array_equal(y, y2)  # bit for bit
    X3, _ = SyntheticNews(n_samples=300, n_features=200, nnz_per_row=10, data_seed=4).load()
    assert (X3 != X).nnz > 0
    split = data.split(1)
    assert split.sizes == _sizes(300, 0.9) == (270, 15, 15)
    assert split.train.X.layout == torch.sparse_csr


def test_synthetic_news_recipe_reproduces_the_notes_numbers():
    # SyntheticNews' default preset, seed-0 split 7200/400/400 with 358 270 train nnz
    split = SyntheticNews().split(0)
    assert split.sizes == (7200, 400, 400)
    assert split.n_features == 5000
    assert split.train.X.values().numel() == 358_270


def test_synthetic_news_recipe_is_the_documented_one():
    from scipy.special import expit

    n, d, k = 50, 40, 6
    rng = np.random.RandomState(0)
    cols = rng.randint(0, d, (n, k))
    vals = rng.rand(n, k)
    X = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, d))
    X.sum_duplicates()
    X = sp.csr_matrix(normalize(X))
    w = rng.randn(d) * 8
    y = np.where(rng.rand(n) < expit(X @ w), 1.0, -1.0)
    X_ours, y_ours = SyntheticNews(n_samples=n, n_features=d, nnz_per_row=k).load()
    assert np.array_equal(X_ours.indptr, X.indptr) and np.array_equal(X_ours.indices, X.indices)
    assert np.array_equal(X_ours.data, X.data) and np.array_equal(y_ours, y)


def test_datasets_instantiate_from_a_config():
    from hydra.utils import instantiate

    data = instantiate(
        {"_target_": "shine.data.bilevel.SyntheticNews", "n_samples": 60, "n_features": 30}
    )
    split = data.split(seed=0, dtype="float32")
    assert split.train.X.dtype == torch.float32
    assert data.split(0).sizes == split.sizes  # cached data, same split


# ------------------------------------------------------------------------------------ 20news
GROUPS = [  # the real newsgroup names; sorted, the first ten are labelled -1
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
]
WORDS = ["apple", "Bike", "crypt", "hockey", "key", "naïve", "café", "über", "x11", "god", "mac"]


def _write_news_tree(root: Path) -> None:
    """A miniature 20news-bydate tree: latin-1 files named by numbers, as in the archive."""
    rng = np.random.default_rng(0)
    doc_id = 10_000
    for folder, n_docs in (("20news-bydate-train", 3), ("20news-bydate-test", 2)):
        for group in GROUPS:
            (root / folder / group).mkdir(parents=True)
            for _ in range(n_docs):
                words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
                text = f"From: someone@{group}\nSubject: {words[0]}\n\n" + " ".join(words)
                (root / folder / group / str(doc_id)).write_bytes(text.encode("latin-1"))
                doc_id += int(rng.integers(1, 500))


def _expected_news(root: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """fetch_20newsgroups_vectorized(subset='all'), computed directly from the files."""
    docs, targets = {}, {}
    for folder in ("20news-bydate-train", "20news-bydate-test"):
        groups = sorted(p.name for p in (root / folder).iterdir())
        entries = [
            (label, path)
            for label, group in enumerate(groups)
            for path in sorted((root / folder / group).iterdir(), key=lambda p: p.name)
        ]
        # load_files shuffles with RandomState(0), fetch_20newsgroups with RandomState(12)
        order = np.arange(len(entries))
        np.random.RandomState(0).shuffle(order)
        second = np.arange(len(entries))
        np.random.RandomState(12).shuffle(second)
        order = order[second]
        docs[folder] = [entries[i][1].read_bytes().decode("latin-1") for i in order]
        targets[folder] = np.array([entries[i][0] for i in order])
    vectorizer = CountVectorizer()
    X_train = normalize(vectorizer.fit_transform(docs["20news-bydate-train"]).astype(float))
    X_test = normalize(vectorizer.transform(docs["20news-bydate-test"]).astype(float))
    target = np.concatenate([targets["20news-bydate-train"], targets["20news-bydate-test"]])
    return sp.csr_matrix(sp.vstack([X_train, X_test])), np.where(target < 10, -1.0, 1.0)


def _make_archive(tree: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for folder in ("20news-bydate-train", "20news-bydate-test"):
            tar.add(tree / folder, arcname=folder)


def _assert_same(a: tuple, b: tuple) -> None:
    (Xa, ya), (Xb, yb) = a, b
    assert Xa.shape == Xb.shape
    assert abs(Xa - Xb).max() == 0
    assert np.array_equal(ya, yb)


@pytest.fixture(scope="module")
def news_tree(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("news") / "data"
    _write_news_tree(data_dir / "20news_home")
    return data_dir


def test_news20_from_extracted_tree(news_tree):
    data = News20(data_dir=str(news_tree))
    X, y = data.load()
    assert X.shape[0] == len(GROUPS) * 5 and sp.isspmatrix_csr(X)
    _assert_same((X, y), _expected_news(news_tree / "20news_home"))
    np.testing.assert_allclose(sp.linalg.norm(X, axis=1), 1.0, rtol=1e-12)
    assert (y == -1).sum() == 10 * 5 and (y == 1).sum() == 2 * 5
    # training documents come first: the last 2 * 12 rows are the test ones
    split = data.split(0)
    assert split.sizes == _sizes(60, 0.9)
    assert split.train.X.layout == torch.sparse_csr


def test_news20_from_archive_and_through_sklearn(news_tree, tmp_path, monkeypatch):
    expected = News20(data_dir=str(news_tree)).load()
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    _make_archive(news_tree / "20news_home", archive_dir / "20news-bydate.tar.gz")
    _assert_same(News20(data_dir=str(archive_dir)).load(), expected)
    assert (archive_dir / "20news_home" / "20news-bydate-train" / "sci.crypt").is_dir()
    assert not [p for p in (archive_dir / "20news_home").iterdir() if p.name.startswith(".")]

    # download=True goes through scikit-learn's own fetcher: only the network fetch is replaced,
    # by a copy of the same archive, so this checks row order and values against scikit-learn
    import sklearn.datasets._twenty_newsgroups as twenty

    def fake_fetch(remote, dirname, n_retries=3, delay=1.0):
        target = Path(dirname) / remote.filename
        shutil.copy(archive_dir / "20news-bydate.tar.gz", target)
        return str(target)

    monkeypatch.setattr(twenty, "_fetch_remote", fake_fetch)
    fetched = tmp_path / "fetched"
    _assert_same(News20(data_dir=str(fetched), download=True).load(), expected)
    # scikit-learn removed the extracted tree and kept pickles, which we do not read ourselves
    with pytest.raises(FileNotFoundError, match="scikit-learn caches"):
        News20(data_dir=str(fetched)).load()


def test_news20_archive_refuses_unsafe_members(tmp_path):
    for bad_name, kind in (("../evil.txt", tarfile.REGTYPE), ("/tmp/evil.txt", tarfile.REGTYPE)):
        data_dir = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        data_dir.mkdir()
        with tarfile.open(data_dir / "20news-bydate.tar.gz", "w:gz") as tar:
            ok = tarfile.TarInfo("20news-bydate-train/alt.atheism/1")
            ok.size = 3
            tar.addfile(ok, io.BytesIO(b"abc"))
            bad = tarfile.TarInfo(bad_name)
            bad.type = kind
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
        with pytest.raises(ValueError, match="unsafe path"):
            News20(data_dir=str(data_dir)).load()
        assert not (tmp_path / "evil.txt").exists()
        assert not (data_dir / "20news_home" / "20news-bydate-train").exists()
    data_dir = tmp_path / "link"
    data_dir.mkdir()
    with tarfile.open(data_dir / "20news-bydate.tar.gz", "w:gz") as tar:
        link = tarfile.TarInfo("20news-bydate-train/alt.atheism/1")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ValueError, match="not a regular file"):
        News20(data_dir=str(data_dir)).load()


def test_news20_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        News20(data_dir=str(tmp_path / "nowhere")).load()
    message = str(info.value)
    assert NEWS20_URL in message
    assert str(tmp_path / "nowhere" / "20news-bydate.tar.gz") in message
    assert "dataset.download=true" in message
    assert "SHINE_DATA" in message and "paths.data_dir" in message


# ---------------------------------------------------------------------------------- real-sim
@pytest.fixture()
def svmlight(tmp_path) -> tuple[Path, sp.csr_matrix, np.ndarray]:
    X = sp.random(40, 25, density=0.3, format="lil", random_state=0)
    X[0, 24] = 0.5  # the last column is used: the width is read from the file
    y = np.where(np.random.default_rng(0).random(40) < 0.5, -1, 1)
    path = tmp_path / "real-sim"
    dump_svmlight_file(X, y, str(path), zero_based=False)  # LIBSVM files are one-based
    return path, sp.csr_matrix(X), y.astype(float)


def test_real_sim_plain_and_bz2(svmlight, tmp_path):
    path, X, y = svmlight
    for source in (str(path), str(tmp_path)):
        X_read, y_read = RealSim(path=source).load()
        assert X_read.shape == (40, 25)
        assert abs(X_read - X).max() < 1e-15
        assert np.array_equal(y_read, y)
    compressed = tmp_path / "bz" / "real-sim.bz2"
    compressed.parent.mkdir()
    compressed.write_bytes(bz2.compress(path.read_bytes()))
    for source in (compressed, compressed.parent, compressed.with_suffix("")):
        X_read, y_read = RealSim(path=str(source)).load()
        assert abs(X_read - X).max() < 1e-15 and np.array_equal(y_read, y)
    split = RealSim(path=str(compressed), train_fraction=0.5).split(0)
    assert split.sizes == _sizes(40, 0.5)
    assert split.train.X.layout == torch.sparse_csr


def test_real_sim_zero_one_labels_are_mapped(tmp_path):
    X = sp.random(10, 5, density=0.5, format="csr", random_state=0)
    dump_svmlight_file(X, np.arange(10) % 2, str(tmp_path / "real-sim"), zero_based=False)
    _, y = RealSim(path=str(tmp_path / "real-sim")).load()
    assert y.tolist() == [-1.0, 1.0] * 5


def test_real_sim_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        RealSim(path=str(tmp_path)).load()
    message = str(info.value)
    assert REAL_SIM_URL in message
    assert str(tmp_path / "real-sim.bz2") in message


def test_zipf_columns_make_a_few_dense_columns_and_keep_the_uniform_recipe():
    uniform = SyntheticNews(n_samples=400, n_features=300, nnz_per_row=10)
    zipf = SyntheticNews(n_samples=400, n_features=300, nnz_per_row=10, zipf_exponent=1.0)
    Xu, yu = uniform.load()
    Xz, _ = zipf.load()
    Xu0, yu0 = SyntheticNews(
        n_samples=400, n_features=300, nnz_per_row=10, zipf_exponent=0.0
    ).load()
    assert (Xu != Xu0).nnz == 0 and np.array_equal(yu, yu0)
    counts_u = np.sort(np.bincount(Xu.indices, minlength=300))[::-1]
    counts_z = np.sort(np.bincount(Xz.indices, minlength=300))[::-1]
    assert counts_z[0] > 5 * counts_u[0]  # the most frequent "word" is far more frequent
    assert np.allclose(np.sqrt(Xz.multiply(Xz).sum(axis=1)).A1, 1.0)
    with pytest.raises(ValueError, match="zipf_exponent"):
        SyntheticNews(zipf_exponent=-1.0)
