"""Image data: the torchvision import workaround, CIFAR-10 / ImageFolder readers on small files in
the real on-disk formats, digits and synthetic sets, (seed, epoch)-deterministic loaders."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from shine.data import (
    CIFAR10Data,
    DigitsData,
    GlobalBatchSampler,
    ImageNetData,
    RandomShift,
    SeededItems,
    SyntheticImages,
    TensorImageDataset,
    _torchvision,
    cifar10_transforms,
    imagenet_transforms,
    make_loader,
)
from shine.data.images import (
    CIFAR10_FOLDER,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dataset_targets,
)


# ------------------------------------------------------------------------------ torchvision import
def test_import_torchvision_is_idempotent_and_datasets_work() -> None:
    tv = _torchvision.import_torchvision()
    assert _torchvision.import_torchvision() is tv
    from torchvision.datasets import CIFAR10, ImageFolder
    from torchvision.transforms import v2

    assert tv.datasets.CIFAR10 is CIFAR10 and tv.datasets.ImageFolder is ImageFolder
    image = torch.rand(3, 40, 40)
    assert v2.RandomCrop(32)(image).shape == (3, 32, 32)
    assert tv.transforms.RandomCrop(32, padding=4)(image).shape == (3, 32, 32)
    # the two schemas exist (from the C extension or from the workaround) and are never redefined
    assert all(_torchvision._op_exists(name) for name in _torchvision._REQUIRED_SCHEMAS)
    assert _torchvision._define_missing_schemas() == []
    if not tv.extension._has_ops():  # the workaround is in effect: compiled ops fail cleanly
        with pytest.raises(RuntimeError, match="custom C\\+\\+ ops"):
            tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


_FRESH_IMPORT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s: %(message)s")
try:
    import torchvision  # fails with a CUDA torchvision next to a CPU torch
    print("PLAIN_IMPORT_OK")
except RuntimeError as error:
    print("PLAIN_IMPORT_FAILED", error)
from shine.data._torchvision import import_torchvision
tv = import_torchvision()
assert import_torchvision() is tv
from torchvision.datasets import CIFAR10, ImageFolder
print("HAS_OPS", tv.extension._has_ops())
"""


def test_import_torchvision_in_a_fresh_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if "PLAIN_IMPORT_OK" in out:  # matching builds: a plain import, nothing defined
        assert "HAS_OPS True" in out and "defined the schemas" not in out
    else:  # the workaround ran once, after the failed plain import, and says so at debug level
        assert "torchvision::nms does not exist" in out
        assert out.count("defined the schemas of torchvision::nms, torchvision::qnms") == 1
        assert "HAS_OPS False" in out


# ------------------------------------------------------------------------ CIFAR-10 pickles on disk
class _Python2Pickler(pickle._Pickler):  # type: ignore[misc, name-defined]
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as the real CIFAR-10 files (cPickle)."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump_py2(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


N_PER_BATCH, N_TEST = 4, 6
# the colour of the constant image written first in every file
CONSTANT_RGB = (200, 100, 50)


def _cifar_batch(rng: np.random.Generator, n: int, label: bytes) -> dict[bytes, Any]:
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[0] = np.asarray(CONSTANT_RGB, dtype=np.uint8)[:, None, None]
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": images.reshape(n, 3072),  # channel-major rows, as the real files
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    folder = root / CIFAR10_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = _cifar_batch(rng, N_PER_BATCH, f"training batch {i} of 5".encode())
        _dump_py2(batch, folder / f"data_batch_{i}")
    _dump_py2(_cifar_batch(rng, N_TEST, b"testing batch 1 of 1"), folder / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": N_PER_BATCH, b"label_names": names, b"num_vis": 3072}
    _dump_py2(meta, folder / "batches.meta")
    return root


def _read_batch(path: Path) -> dict[Any, Any]:
    with path.open("rb") as file:
        return pickle.load(file, encoding="bytes")


def test_fake_cifar_files_have_the_real_layout(cifar_root: Path) -> None:
    # the loading recipe of the CIFAR-10 web page gives bytes keys, uint8 (N, 3072) rows
    batch = _read_batch(cifar_root / CIFAR10_FOLDER / "data_batch_1")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (N_PER_BATCH, 3072)
    assert isinstance(batch[b"labels"], list)


def test_cifar10_reads_files_shapes_and_normalisation(cifar_root: Path) -> None:
    data = CIFAR10Data(str(cifar_root), augment=False, verify_integrity=False)
    assert (data.name, data.num_classes, data.image_shape) == ("cifar10", 10, (3, 32, 32))
    train, test = data.build()
    assert (len(train), len(test)) == (5 * N_PER_BATCH, N_TEST)
    expected_labels = []
    for i in range(1, 6):
        expected_labels += _read_batch(cifar_root / CIFAR10_FOLDER / f"data_batch_{i}")[b"labels"]
    assert list(dataset_targets(train)) == expected_labels
    assert train.classes[3] == "cat"
    raw = _read_batch(cifar_root / CIFAR10_FOLDER / "test_batch")[b"data"][1]
    image, label = test[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    pixels = torch.from_numpy(raw.reshape(3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(image, (pixels - mean) / std)
    # a constant image: per-channel mean (c/255 - m)/s, std 0
    for dataset in (train, test):
        constant = dataset[0][0]
        expected = (torch.tensor(CONSTANT_RGB) / 255 - mean.flatten()) / std.flatten()
        torch.testing.assert_close(constant.mean(dim=(1, 2)), expected)
        assert float(constant.std(dim=(1, 2)).max()) < 1e-5


def test_cifar10_augmentation_differs_between_epochs(cifar_root: Path) -> None:
    train, test = CIFAR10Data(str(cifar_root), verify_integrity=False).build()

    def images(dataset: Dataset[Any], epoch: int) -> torch.Tensor:
        loader = make_loader(dataset, 20, shuffle=False, seed=0, drop_last=False, epoch=epoch)
        return torch.cat([x for x, _ in loader])

    first = images(train, 0)
    torch.testing.assert_close(images(train, 0), first)  # a function of (seed, epoch)
    second = images(train, 1)
    changed = (first - second).flatten(1).abs().amax(dim=1) > 0
    assert int(changed.sum()) >= len(train) // 2  # crops/flips differ between epochs
    torch.testing.assert_close(images(test, 0), images(test, 1))  # no test augmentation
    assert first.shape == (len(train), 3, 32, 32)


def test_cifar10_missing_data_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10Data(str(tmp_path)).build()
    message = str(error.value)
    for fragment in (CIFAR10_URL, CIFAR10_FOLDER, "data_batch_1", "batches.meta", "SHINE_DATA"):
        assert fragment in message
    assert "paths.data_dir" in message
    # one file missing is named
    (tmp_path / CIFAR10_FOLDER).mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "test_batch"):
        (tmp_path / CIFAR10_FOLDER / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing data_batch_5, batches.meta"):
        CIFAR10Data(str(tmp_path), verify_integrity=False).build()
    with pytest.raises(FileNotFoundError, match="parent of"):
        CIFAR10Data(str(tmp_path / CIFAR10_FOLDER)).build()


def test_cifar10_md5_check_is_on_by_default(cifar_root: Path) -> None:
    assert CIFAR10Data(str(cifar_root)).verify_integrity
    with pytest.raises(RuntimeError, match="md5 checksum mismatch for data_batch_1") as error:
        CIFAR10Data(str(cifar_root)).build()
    assert CIFAR10_URL in str(error.value)
    # torchvision's own class rejects the same files, and so does the subclass when verifying
    tv = _torchvision.import_torchvision()
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        tv.datasets.CIFAR10(str(cifar_root), train=True, download=False)
    from shine.data.images import _CIFAR10

    with pytest.raises(RuntimeError, match="not found or corrupted"):
        _CIFAR10(str(cifar_root), train=False)
    assert len(_CIFAR10(str(cifar_root), train=False, verify_integrity=False)) == N_TEST


def test_cifar10_dataset_pickles_for_spawned_workers(cifar_root: Path) -> None:
    _, test = CIFAR10Data(str(cifar_root), verify_integrity=False).build()
    clone = pickle.loads(pickle.dumps(test))
    assert type(clone) is type(test)
    torch.testing.assert_close(clone[2][0], test[2][0])


# ----------------------------------------------------------------------- ImageNet-format folder
def _write_png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            for i in range(count):
                colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
                _write_png(root / split / wnid / f"{wnid}_{i}.png", (24, 20), colour)
    return root


def test_imagenet_folder_shapes_labels_and_normalisation(imagenet_root: Path) -> None:
    data = ImageNetData(str(imagenet_root), image_size=16)
    assert (data.num_classes, data.image_shape, data.name) == (2, (3, 16, 16), "imagenet")
    train, val = data.build()
    assert (len(train), len(val)) == (6, 4)
    assert train.classes == val.classes == ["n01440764", "n01443537"]
    assert list(dataset_targets(val)) == [0, 0, 1, 1]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for dataset in (train, val):
        for index in range(len(dataset)):
            image, _ = dataset[index]
            assert image.shape == (3, 16, 16)
            colour = torch.tensor(Image.open(dataset.samples[index][0]).getpixel((0, 0))) / 255
            # resizing and cropping a constant image keeps it constant
            torch.testing.assert_close(
                image.mean(dim=(1, 2)), (colour - mean) / std, atol=1e-5, rtol=0
            )


def test_imagenet_transforms_paper_defaults() -> None:
    train, val = imagenet_transforms()
    assert "RandomResizedCrop(size=(224, 224)" in repr(train)
    assert "Resize(size=256" in repr(val) and "CenterCrop(size=(224, 224))" in repr(val)
    image = Image.new("RGB", (300, 260), (10, 20, 30))
    assert train(image).shape == val(image).shape == (3, 224, 224)
    _, val64 = imagenet_transforms(64)
    assert "Resize(size=73" in repr(val64)
    with pytest.raises(ValueError):
        imagenet_transforms(64, resize=32)
    train, test = cifar10_transforms()
    assert "RandomCrop(size=(32, 32), padding=4)" in repr(train)
    assert "RandomHorizontalFlip" in repr(train) and "Random" not in repr(test)


def test_imagenet_missing_and_inconsistent_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        ImageNetData(str(tmp_path)).build()
    assert "train/<wnid>/*.JPEG" in str(error.value) and "val/<wnid>/*.JPEG" in str(error.value)
    assert "SHINE_DATA" in str(error.value)
    _write_png(tmp_path / "images" / "train" / "a" / "0.png", (8, 8), (0, 0, 0))
    _write_png(tmp_path / "images" / "val" / "b" / "0.png", (8, 8), (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="pass it as root"):
        ImageNetData(str(tmp_path)).num_classes
    with pytest.raises(ValueError, match="different class folders"):
        ImageNetData(str(tmp_path / "images"), image_size=8).build()


# --------------------------------------------------------------------------------------- digits
def test_digits_sizes_normalisation_and_stratification() -> None:
    data = DigitsData()
    assert (data.name, data.num_classes, data.image_shape) == ("digits", 10, (1, 16, 16))
    train, test = data.build()
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 16, 16) and test.images.shape == (360, 1, 16, 16)
    assert abs(float(train.images.mean())) < 1e-5
    assert abs(float(train.images.std()) - 1) < 1e-4
    counts_train = torch.bincount(train.targets, minlength=10)
    counts_test = torch.bincount(test.targets, minlength=10)
    for n_train, n_test in zip(counts_train.tolist(), counts_test.tolist(), strict=True):
        assert abs(n_test - 0.2 * (n_train + n_test)) <= 1
    image, label = train[0]
    assert image.shape == (1, 16, 16) and isinstance(label, int)


def test_digits_determinism_channels_and_augmentation() -> None:
    train, test = DigitsData(image_size=12, seed=3).build()
    again, _ = DigitsData(image_size=12, seed=3).build()
    torch.testing.assert_close(train.images, again.images)
    assert torch.equal(train.targets, again.targets)
    other, _ = DigitsData(image_size=12, seed=4).build()
    assert not torch.equal(train.targets, other.targets)
    rgb, _ = DigitsData(image_size=12, seed=3, channels=3).build()
    assert rgb.images.shape[1:] == (3, 12, 12)
    torch.testing.assert_close(rgb.images[:, 1], train.images[:, 0])
    assert DigitsData(image_size=8).build()[0].images.shape[-1] == 8
    augmented, plain_test = DigitsData(image_size=12, seed=3, augment=True).build()
    assert isinstance(augmented.transform, RandomShift) and plain_test.transform is None
    shifted = torch.stack([augmented[i][0] for i in range(50)])
    assert not torch.equal(shifted, train.images[:50])
    with pytest.raises(ValueError):
        DigitsData(test_fraction=1.0)
    with pytest.raises(ValueError):
        DigitsData(channels=2)


def test_random_shift_moves_by_at_most_one_pixel() -> None:
    image = torch.zeros(1, 9, 9)
    image[0, 4, 4] = 1.0
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        out = RandomShift(1)(image)
        assert out.shape == image.shape and float(out.sum()) == 1.0
        row, col = divmod(int(out.flatten().argmax()), 9)
        seen.add((row - 4, col - 4))
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


# ------------------------------------------------------------------------------------ synthetic
def test_synthetic_images_deterministic_and_learnable() -> None:
    data = SyntheticImages(n_train=200, n_test=100, num_classes=4, image_shape=[1, 8, 8], seed=5)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 4
    train, test = data.build()
    again_train, again_test = SyntheticImages(200, 100, 4, (1, 8, 8), 5).build()
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(test.targets, again_test.targets)
    other, _ = SyntheticImages(200, 100, 4, (1, 8, 8), 6).build()
    assert not torch.equal(train.images, other.images)
    assert torch.bincount(train.targets).tolist() == [50, 50, 50, 50]
    # nearest class mean (from train) classifies the test set well
    means = torch.stack([train.images[train.targets == c].mean(0) for c in range(4)])
    distances = torch.cdist(test.images.flatten(1), means.flatten(1))
    accuracy = float((distances.argmin(1) == test.targets).float().mean())
    assert accuracy > 0.9


# -------------------------------------------------------------------------------------- loaders
class _Probe(Dataset[tuple[int, float]]):
    """Item ``i`` is ``(i, a draw of torch's global generator)``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(torch.rand(()))


class _NumpyProbe(_Probe):
    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(np.random.rand())


def _batches(**kwargs: Any) -> list[tuple[list[int], list[float]]]:
    loader = make_loader(_Probe(kwargs.pop("n", 23)), **kwargs)
    return [(i.tolist(), v.tolist()) for i, v in loader]


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    kwargs: dict[str, Any] = {"batch_size": 5, "shuffle": True, "drop_last": False}
    first = _batches(seed=1, epoch=0, **kwargs)
    assert first == _batches(seed=1, epoch=0, **kwargs)  # indices and augmentation draws
    torch.manual_seed(123)  # the global generator's state does not matter
    assert first == _batches(seed=1, epoch=0, **kwargs)
    assert [len(i) for i, _ in first] == [5, 5, 5, 5, 3]
    assert sorted(sum((i for i, _ in first), [])) == list(range(23))
    other_epoch = _batches(seed=1, epoch=1, **kwargs)
    assert [i for i, _ in other_epoch] != [i for i, _ in first]
    assert [i for i, _ in _batches(seed=2, epoch=0, **kwargs)] != [i for i, _ in first]
    # the same index gets a different draw in another epoch
    draws = {i: v for ids, vs in first for i, v in zip(ids, vs, strict=True)}
    draws_1 = {i: v for ids, vs in other_epoch for i, v in zip(ids, vs, strict=True)}
    assert all(draws[i] != draws_1[i] for i in range(23))
    in_order = _batches(seed=1, batch_size=5, shuffle=False, drop_last=True)
    assert [i for i, _ in in_order] == [list(range(k, k + 5)) for k in range(0, 20, 5)]


def test_loader_restores_the_global_generator() -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _batches(seed=0, batch_size=4, shuffle=True, drop_last=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(23, 6, 2), (13, 6, 2), (20, 6, 3)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shards_make_up_the_single_process_batches(
    n: int, batch_size: int, world_size: int, drop_last: bool
) -> None:
    common: dict[str, Any] = {"n": n, "batch_size": batch_size, "shuffle": True, "seed": 4}
    common |= {"drop_last": drop_last, "epoch": 2}
    single = _batches(**common)
    shards = [_batches(rank=r, world_size=world_size, **common) for r in range(world_size)]
    assert all(len(shard) == len(single) for shard in shards)  # every rank takes every step
    for step, (indices, values) in enumerate(single):
        parts = [shard[step] for shard in shards]
        if len(indices) % world_size == 0 or len(indices) >= world_size:
            # rank batches, concatenated in rank order, are the single-process batch
            assert sum((p[0] for p in parts), []) == indices
            assert sum((p[1] for p in parts), []) == values  # same augmentation draws
        assert {i for p in parts for i in p[0]} == set(indices)
    if not drop_last and n % batch_size:
        assert len(single[-1][0]) == n % batch_size


def test_rank_shards_with_fewer_samples_than_ranks_in_the_last_batch() -> None:
    sampler = [
        list(
            GlobalBatchSampler(7, 6, shuffle=False, seed=0, drop_last=False, rank=r, world_size=2)
        )
        for r in range(2)
    ]
    assert sampler[0] == [[0, 1, 2], [6]] and sampler[1] == [[3, 4, 5], [6]]


def test_sampler_validation_and_set_epoch() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(10, 5, shuffle=True, seed=0, drop_last=False, world_size=2)
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 4, shuffle=True, seed=0, drop_last=False, rank=2, world_size=2)
    sampler = GlobalBatchSampler(10, 4, shuffle=True, seed=0, drop_last=True)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and len(sampler) == 2
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_loader_workers_are_seeded_deterministically() -> None:
    def run(dataset: Dataset[Any], workers: int) -> list[float]:
        loader = make_loader(
            dataset, 4, shuffle=True, seed=3, drop_last=False, num_workers=workers, epoch=1
        )
        return [v for _, values in loader for v in values.tolist()]

    # augmentation through torch: the same with and without workers
    assert run(_Probe(16), 0) == run(_Probe(16), 2)
    # numpy in workers: seeded from torch's per-worker seed, reproducible, distinct per worker
    draws = run(_NumpyProbe(16), 2)
    assert draws == run(_NumpyProbe(16), 2)
    assert len(set(draws)) == len(draws)


def test_seeded_items_wraps_tensor_datasets() -> None:
    dataset = TensorImageDataset(torch.zeros(4, 1, 3, 3), torch.arange(4), RandomShift(1))
    view = SeededItems(dataset, seed=0, epoch=0)
    assert len(view) == 4 and list(dataset_targets(view)) == [0, 1, 2, 3]
    torch.testing.assert_close(view[2][0], SeededItems(dataset, 0, 0)[2][0])
