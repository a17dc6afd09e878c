"""Image-classification data of the DEQ experiments (paper §3.2) and deterministic data loaders.

Data sets (frozen dataclasses, meant to be built from Hydra ``_target_`` configs; each has
``name``, ``num_classes``, ``image_shape`` and ``build() -> (train_dataset, test_dataset)``):

* :class:`CIFAR10Data`: torchvision's CIFAR-10 (python pickles, never downloaded here), with the
  authors' augmentation (the CIFAR-LARGE config of zaccharieramzi/shine).
* :class:`ImageNetData`: an ImageNet-format folder tree read with ``ImageFolder``; the image size
  is a parameter so that a smaller folder in the same format can be used.
* :class:`DigitsData`: scikit-learn's 8×8 digits (1 797 images, 10 classes), upsampled; the real
  image data set that trains on a CPU in minutes.
* :class:`SyntheticImages`: a deterministic, learnable synthetic set for tests and smoke runs.

Loaders: :func:`make_loader` gives a ``DataLoader`` whose order (and, by default, whose random
augmentation) depends only on ``(seed, epoch)``, and whose global batches are the same for any
number of processes; see :class:`GlobalBatchSampler` for the sharding rule.

torchvision is imported lazily, through :func:`shine.data._torchvision.import_torchvision` (which
works around a CUDA torchvision next to a CPU torch), only by what needs it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from shine.data._torchvision import import_torchvision
from shine.harness.runtime.seeding import derived_seed

logger = logging.getLogger(__name__)

#: A transform from a PIL image (or a tensor) to a normalised ``(C, H, W)`` tensor.
Transform = Callable[[Any], Tensor]

#: Per-channel mean and std of the CIFAR-10 normalisation used by the authors (MDEQ code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
#: The usual ImageNet per-channel mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Where the CIFAR-10 python archive can be downloaded by hand.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Directory that the CIFAR-10 archive extracts to, under a data set's ``root``.
CIFAR10_FOLDER = "cifar-10-batches-py"
#: Files of :data:`CIFAR10_FOLDER` read by torchvision.
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)

# tags of the independent random streams derived from (seed, epoch)
_ORDER_STREAM = 0
_ITEM_STREAM = 1
_WORKER_STREAM = 2

_DATA_DIR_HINT = (
    "(the configs put data sets under the config key paths.data_dir, which defaults to the "
    "environment variable SHINE_DATA)"
)


# ---------------------------------------------------------------------------------- transforms
def cifar10_transforms(augment: bool = True) -> tuple[Transform, Transform]:
    """The authors' CIFAR-10 transforms ``(train, test)``.

    Train: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
    ``Normalize(CIFAR10_MEAN, CIFAR10_STD)``; test: ``ToTensor()`` and the same normalisation.

    Args:
        augment: if false, the train transform is the test transform.

    Returns:
        The train and test transforms (PIL image to ``(3, 32, 32)`` float tensor).
    """
    transforms = import_torchvision().transforms
    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    test = transforms.Compose([transforms.ToTensor(), normalize])
    if not augment:
        return test, test
    train = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, test


def _default_resize(image_size: int) -> int:
    """The resize side of the evaluation transform: 256 for 224, in proportion otherwise."""
    return round(image_size * 256 / 224)


def imagenet_transforms(
    image_size: int = 224, resize: int | None = None, augment: bool = True
) -> tuple[Transform, Transform]:
    """The ImageNet transforms ``(train, val)``, parameterised by the image size.

    Train: ``RandomResizedCrop(image_size)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
    ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``; val: ``Resize(resize)``,
    ``CenterCrop(image_size)``, ``ToTensor()`` and the same normalisation. The defaults are the
    paper's (224, 256).

    Args:
        image_size: side of the square crops.
        resize: side of the shorter edge before the centre crop; ``None`` means
            ``round(image_size * 256 / 224)`` (256 for 224).
        augment: if false, the train transform is the val transform.

    Returns:
        The train and val transforms (PIL image to ``(3, image_size, image_size)`` float tensor).

    Raises:
        ValueError: if ``resize < image_size`` or ``image_size < 1``.
    """
    resize = _default_resize(image_size) if resize is None else resize
    if image_size < 1 or resize < image_size:
        raise ValueError(f"need 1 <= image_size <= resize, got {image_size} and {resize}")
    transforms = import_torchvision().transforms
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    if not augment:
        return val, val
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, val


class RandomShift:
    """Shift a ``(C, H, W)`` tensor by up to ``max_shift`` pixels in each direction.

    The offsets are uniform in ``{-max_shift, ..., max_shift}`` (drawn from torch's global CPU
    generator, as torchvision's random transforms); the uncovered border repeats the edge pixels.

    Args:
        max_shift: largest shift, in pixels.
    """

    def __init__(self, max_shift: int = 1) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = max_shift

    def __call__(self, image: Tensor) -> Tensor:
        """Return the shifted image (same shape)."""
        m = self.max_shift
        if m == 0:
            return image
        dy, dx = (int(v) for v in torch.randint(-m, m + 1, (2,)))
        height, width = image.shape[-2:]
        padded = F.pad(image.unsqueeze(0), (m, m, m, m), mode="replicate").squeeze(0)
        return padded[..., m + dy : m + dy + height, m + dx : m + dx + width]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_shift={self.max_shift})"


# ---------------------------------------------------------------------------------- data sets
class ImageDataSpec(Protocol):
    """What the training code needs from an image data set description."""

    @property
    def name(self) -> str:
        """Data-set name (for logs)."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one transformed image."""
        ...

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """Return ``(train_dataset, test_dataset)``, items ``(image, label)``."""
        ...


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory as one tensor, with an optional per-item transform.

    Args:
        images: ``(N, C, H, W)`` float tensor.
        targets: ``(N,)`` integer labels.
        transform: applied to each ``(C, H, W)`` image when it is read (e.g. :class:`RandomShift`).
    """

    def __init__(
        self, images: Tensor, targets: Tensor, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if images.dim() != 4 or targets.shape != images.shape[:1]:
            raise ValueError(
                f"need images (N, C, H, W) and targets (N,), got {tuple(images.shape)} and "
                f"{tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


@functools.cache
def _cifar10_class() -> type[Any]:
    """Return torchvision's ``CIFAR10`` with a switchable md5 check (made once, on first use).

    The class is made lazily so that importing this module does not import torchvision; it is
    reachable as ``shine.data.images._CIFAR10`` (module ``__getattr__``) so that data sets built
    from it pickle (data-loader workers under ``spawn`` / ``forkserver``).
    """
    cifar10 = import_torchvision().datasets.CIFAR10

    class _CIFAR10(cifar10):  # type: ignore[misc, valid-type]
        """CIFAR10 whose md5 check of the batch files can be turned off (tests only)."""

        def __init__(self, *args: Any, verify_integrity: bool = True, **kwargs: Any) -> None:
            self.verify_integrity = verify_integrity
            if not verify_integrity:
                # torchvision's check_integrity(path, md5=None) only checks that the file exists
                self.meta = {**type(self).meta, "md5": None}
            super().__init__(*args, **kwargs)

        def _check_integrity(self) -> bool:
            if self.verify_integrity:
                return bool(super()._check_integrity())
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    _CIFAR10.__module__ = __name__
    _CIFAR10.__qualname__ = _CIFAR10.__name__
    return _CIFAR10


def __getattr__(name: str) -> Any:
    """Module attributes made on first use (``_CIFAR10``, see :func:`_cifar10_class`)."""
    if name == "_CIFAR10":
        return _cifar10_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _md5(path: Path) -> str:
    """Hex md5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CIFAR10Data:
    """CIFAR-10 (50 000 train / 10 000 test images, 32×32 RGB, 10 classes), read by torchvision.

    ``root`` must contain ``cifar-10-batches-py/`` with the python-version files ``data_batch_1``
    ... ``data_batch_5``, ``test_batch`` and ``batches.meta`` (what
    ``https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz`` extracts to). Nothing is
    downloaded. The md5 sum of every file is checked against torchvision's list first.

    Args:
        root: directory holding ``cifar-10-batches-py/``.
        augment: apply the authors' train augmentation (random crop with 4-pixel padding,
            horizontal flip); the test set is never augmented.
        verify_integrity: check the md5 sums of the files (torchvision's check). Only tests, on
            small files in the real format, should turn it off.
    """

    root: str | Path
    augment: bool = True
    verify_integrity: bool = True

    name: ClassVar[str] = "cifar10"
    num_classes: ClassVar[int] = 10
    image_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)

    @property
    def folder(self) -> Path:
        """The ``cifar-10-batches-py`` directory."""
        return Path(self.root).expanduser() / CIFAR10_FOLDER

    def check_files(self) -> None:
        """Check that the files are present (and, if ``verify_integrity``, their md5 sums).

        Raises:
            FileNotFoundError: if a file is missing; the message says where to put the data.
            RuntimeError: if a file's md5 sum is not the official one; the message names it.
        """
        folder = self.folder
        missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
        if missing:
            hint = ""
            if Path(self.root).name == CIFAR10_FOLDER:
                hint = f" (root should be the parent of {CIFAR10_FOLDER}/, not the folder itself)"
            raise FileNotFoundError(
                f"CIFAR-10 not found: missing {', '.join(missing)} in {folder}{hint}. Put the "
                f"python-version files ({', '.join(CIFAR10_FILES)}) in {folder}/: download "
                f"{CIFAR10_URL} and extract it under {Path(self.root).expanduser()} "
                f"(tar -xzf cifar-10-python.tar.gz -C <root>). Set the data set's `root` "
                f"{_DATA_DIR_HINT}."
            )
        if not self.verify_integrity:
            return
        cifar10 = _cifar10_class()
        expected = dict(cifar10.train_list + cifar10.test_list)
        expected[cifar10.meta["filename"]] = cifar10.meta["md5"]
        corrupted = [name for name in CIFAR10_FILES if _md5(folder / name) != expected[name]]
        if corrupted:
            raise RuntimeError(
                f"CIFAR-10 in {folder}: md5 checksum mismatch for {', '.join(corrupted)}; the "
                f"files are corrupted or not the official release. Download {CIFAR10_URL} again "
                f"and extract it under {Path(self.root).expanduser()}."
            )

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """Return the ``(train, test)`` data sets (items ``(image (3, 32, 32), label)``).

        Raises:
            FileNotFoundError: if a file is missing (see :meth:`check_files`).
            RuntimeError: if a file's md5 sum is wrong while ``verify_integrity`` is true.
        """
        self.check_files()
        if not self.verify_integrity:
            logger.warning("CIFAR-10: md5 check of %s disabled (tests only)", self.folder)
        train_transform, test_transform = cifar10_transforms(self.augment)
        cifar10 = _cifar10_class()
        root = str(Path(self.root).expanduser())
        # check_files already hashed the files: torchvision's own (identical) check is skipped
        train = cifar10(root, train=True, transform=train_transform, verify_integrity=False)
        test = cifar10(root, train=False, transform=test_transform, verify_integrity=False)
        logger.info(
            "CIFAR-10 from %s: %d train / %d test images", self.folder, len(train), len(test)
        )
        return train, test


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-directories of ``folder`` (ImageFolder's classes)."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


@dataclass(frozen=True)
class ImageNetData:
    """An ImageNet-format folder tree: ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``.

    Read with torchvision's ``ImageFolder`` (classes = sorted sub-directory names, the same in
    ``train`` and ``val``). The authors' layout is ``ROOT/images/{train,val}``: pass
    ``ROOT/images`` as ``root``. Any image format PIL reads is accepted, so a smaller folder in
    the same layout (e.g. a 100-class subset at 64×64, with ``image_size=64``) works too.

    Args:
        root: directory holding ``train/`` and ``val/``.
        image_size: side of the square crops (224 in the paper).
        resize: shorter side before the evaluation centre crop; ``None`` means
            ``round(image_size * 256 / 224)`` (256 for 224).
        augment: random-resized-crop and flip augmentation of the train set.
    """

    root: str | Path
    image_size: int = 224
    resize: int | None = None
    augment: bool = True

    name: ClassVar[str] = "imagenet"

    def __post_init__(self) -> None:
        resize = _default_resize(self.image_size) if self.resize is None else self.resize
        if self.image_size < 1 or resize < self.image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got {self.image_size}, {resize}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``root/train`` (1 000 for ImageNet-1k).

        Raises:
            FileNotFoundError: if the folder tree is missing.
        """
        return len(self._classes())

    def _split_folder(self, split: str) -> Path:
        """``root/<split>``, checked to exist and to contain class folders."""
        root = Path(self.root).expanduser()
        folder = root / split
        if not folder.is_dir() or not _class_folders(folder):
            hint = ""
            if (root / "images" / split).is_dir():
                hint = f" ({root / 'images'} has this layout: pass it as root)"
            raise FileNotFoundError(
                f"ImageNet-format data not found: {folder} is missing or has no class folder"
                f"{hint}. Expected the layout {root}/train/<wnid>/*.JPEG and "
                f"{root}/val/<wnid>/*.JPEG (one folder per class, the same class folders in "
                f"train and val; validation images sorted into class folders). Set the data "
                f"set's `root` {_DATA_DIR_HINT}."
            )
        return folder

    def _classes(self) -> list[str]:
        """Class folder names of the train split, checked against the val split."""
        train = _class_folders(self._split_folder("train"))
        val = _class_folders(self._split_folder("val"))
        if train != val:
            only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            raise ValueError(
                f"ImageNet-format data in {self.root}: train and val have different class "
                f"folders (only in train: {only_train[:5]}, only in val: {only_val[:5]}), "
                "so their labels would not agree"
            )
        return train

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """Return the ``(train, val)`` data sets (items ``(image (3, S, S), label)``).

        Raises:
            FileNotFoundError: if the tree is missing or a class folder has no image.
            ValueError: if train and val have different class folders.
        """
        self._classes()
        train_transform, val_transform = imagenet_transforms(
            self.image_size, self.resize, self.augment
        )
        image_folder = import_torchvision().datasets.ImageFolder
        train = image_folder(str(self._split_folder("train")), transform=train_transform)
        val = image_folder(str(self._split_folder("val")), transform=val_transform)
        logger.info(
            "ImageNet-format data from %s: %d classes, %d train / %d val images",
            self.root,
            len(train.classes),
            len(train),
            len(val),
        )
        return train, val


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn's handwritten digits (1 797 images, 8×8, 10 classes) as small images.

    The 8×8 images (values 0..16) are upsampled bilinearly to ``image_size``, normalised to zero
    mean and unit std with the statistics of the training pixels (one scalar mean and std), and
    repeated over ``channels``. The split is stratified and deterministic
    (``train_test_split(stratify=y, random_state=seed)``); both parts keep the original order.

    Args:
        image_size: side of the upsampled images.
        test_fraction: fraction of the images in the test set.
        seed: seed of the split.
        channels: 1 (grey) or 3 (the grey image repeated, for RGB models).
        augment: shift the train images randomly by up to ``max_shift`` pixels (off by default).
        max_shift: largest shift of the augmentation, in pixels.
    """

    image_size: int = 16
    test_fraction: float = 0.2
    seed: int = 0
    channels: int = 1
    augment: bool = False
    max_shift: int = 1

    name: ClassVar[str] = "digits"
    num_classes: ClassVar[int] = 10

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)

    def build(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        """Return the ``(train, test)`` data sets (items ``(image, label)``)."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        train_idx, test_idx = train_test_split(
            np.arange(len(y)), test_size=self.test_fraction, stratify=y, random_state=self.seed
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        images = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)
        if self.image_size != 8:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            )
        train_images, test_images = images[train_idx], images[test_idx]
        mean, std = train_images.mean(), train_images.std()
        train_images = ((train_images - mean) / std).expand(-1, self.channels, -1, -1)
        test_images = ((test_images - mean) / std).expand(-1, self.channels, -1, -1)
        targets = torch.as_tensor(y, dtype=torch.long)
        transform = RandomShift(self.max_shift) if self.augment else None
        train = TensorImageDataset(
            train_images.contiguous(), targets[train_idx], transform=transform
        )
        test = TensorImageDataset(test_images.contiguous(), targets[test_idx])
        logger.info(
            "digits %dx%d: %d train / %d test images", *self.image_shape[1:], len(train), len(test)
        )
        return train, test


@dataclass(frozen=True)
class SyntheticImages:
    """A deterministic, learnable synthetic image-classification set.

    Each class has a smooth random prototype (a ``4×4`` Gaussian pattern per channel, upsampled
    bilinearly); an image is its class prototype plus i.i.d. Gaussian noise of std ``noise``.
    Labels are balanced and shuffled. Everything is drawn from a ``torch.Generator`` seeded with
    ``seed``: the same arguments always give the same tensors.

    Args:
        n_train: number of train images.
        n_test: number of test images.
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.
        seed: seed of the generator.
        noise: std of the per-pixel noise (the prototypes have unit variance).
    """

    n_train: int = 512
    n_test: int = 256
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (3, 32, 32)
    seed: int = 0
    noise: float = 1.0

    name: ClassVar[str] = "synthetic"

    def __post_init__(self) -> None:
        # configs give lists
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.num_classes < 2 or self.n_train < 1 or self.n_test < 1:
            raise ValueError("need num_classes >= 2 and n_train, n_test >= 1")

    def build(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        """Return the ``(train, test)`` data sets (items ``(image, label)``)."""
        generator = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.image_shape
        coarse = torch.randn(self.num_classes, channels, 4, 4, generator=generator)
        prototypes = F.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=False
        )
        prototypes = prototypes / prototypes.std(dim=(1, 2, 3), keepdim=True)

        def draw(n: int) -> TensorImageDataset:
            labels = torch.arange(n) % self.num_classes
            labels = labels[torch.randperm(n, generator=generator)]
            noise = torch.randn(n, channels, height, width, generator=generator)
            return TensorImageDataset(prototypes[labels] + self.noise * noise, labels)

        return draw(self.n_train), draw(self.n_test)


# ------------------------------------------------------------------------------------ loaders
class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a global order that depends only on ``(seed, epoch)``, sharded over ranks.

    Sharding rule. The global order is ``torch.randperm(n)`` drawn from a generator seeded with
    ``derived_seed(seed, epoch, 0)`` (or ``0, ..., n - 1`` without shuffling); it does not depend
    on ``world_size``. Global batch ``k`` is ``order[k * batch_size : (k + 1) * batch_size]``. At
    step ``k``, rank ``r`` takes the ``r``-th contiguous chunk of global batch ``k``
    (``batch_size // world_size`` indices), so concatenating the batches of ranks
    ``0, ..., world_size - 1`` at a step gives the single-process batch, in order. With
    ``drop_last``, the incomplete last global batch is dropped; otherwise it is split into
    chunks whose sizes differ by at most one (first ranks larger); if it has fewer indices than
    there are ranks, the ranks left without one repeat one of its indices (every rank must take a
    step), so only then do the ranks see a duplicate. Every rank yields ``len(self)`` batches.

    Args:
        num_samples: size of the data set.
        batch_size: global batch size (sum over ranks), divisible by ``world_size``.
        shuffle: random global order; otherwise the data-set order.
        seed: non-negative base seed.
        epoch: non-negative epoch number (see :meth:`set_epoch`).
        drop_last: drop the incomplete last global batch.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: number of processes.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 0 or batch_size < 1:
            raise ValueError(
                f"need num_samples >= 0, batch_size >= 1: {num_samples}, {batch_size}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the global batch size {batch_size} is not divisible by world_size {world_size}"
            )
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def global_order(self) -> Tensor:
        """The order of the whole data set for the current epoch (same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(
            derived_seed(self.seed, self.epoch, _ORDER_STREAM)
        )
        return torch.randperm(self.num_samples, generator=generator)

    def _share(self, batch: Tensor) -> Tensor:
        """This rank's chunk of one global batch."""
        m = int(batch.numel())
        base, extra = divmod(m, self.world_size)
        size = base + (self.rank < extra)
        if size == 0:  # fewer indices than ranks (last batch only): repeat one of them
            return batch[self.rank % m : self.rank % m + 1]
        start = self.rank * base + min(self.rank, extra)
        return batch[start : start + size]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        for k in range(len(self)):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield self._share(batch).tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class SeededItems(Dataset[Any]):
    """A view of a data set whose item ``i`` is read under the CPU seed ``(seed, epoch, i)``.

    While ``dataset[i]`` runs, torch's default CPU generator is seeded with
    ``derived_seed(seed, epoch, 1, i)`` and restored afterwards, so random transforms drawing from
    it (all of torchvision's, :class:`RandomShift`) give the same augmentation for the same
    ``(seed, epoch, i)`` whatever the worker, the number of workers or processes, or the state of
    the global generator (e.g. after a resume). CUDA generators, ``random`` and ``numpy`` are not
    touched.

    Args:
        dataset: the underlying map-style data set.
        seed: non-negative base seed.
        epoch: non-negative epoch number.
    """

    def __init__(self, dataset: Dataset[Any], seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(derived_seed(self.seed, self.epoch, _ITEM_STREAM, int(index)))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy`` from torch's per-worker seed.

    torch seeds each worker with ``base_seed + worker_id``, ``base_seed`` drawn from the loader's
    generator; this propagates it to the other two generators (otherwise every forked worker
    starts from the parent's numpy state).

    Args:
        worker_id: index of the worker (unused: torch's seed already includes it).
    """
    del worker_id
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed_items: bool = True,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A ``DataLoader`` for one epoch, reproducible from ``(seed, epoch)`` alone.

    The batches are those of :class:`GlobalBatchSampler`: ``batch_size`` is the **global** batch
    size; each of the ``world_size`` processes gets ``batch_size // world_size`` indices per step,
    the ``rank``-th contiguous chunk of the global batch, so the global batches (and with
    ``seed_items`` the augmented images) are the same with 1 or N processes. Make one loader per
    epoch (``epoch=...``). Workers are seeded from a generator seeded with ``(seed, epoch, rank)``
    and :func:`seed_worker` seeds their ``random`` and ``numpy``.

    Args:
        dataset: a map-style data set.
        batch_size: global batch size, divisible by ``world_size``.
        shuffle: random order (training); otherwise the data-set order (evaluation).
        seed: non-negative base seed.
        num_workers: loader worker processes.
        drop_last: drop the incomplete last global batch.
        rank: this process's rank.
        world_size: number of processes.
        epoch: non-negative epoch number.
        seed_items: read items through :class:`SeededItems`, making random augmentation a
            function of ``(seed, epoch, index)``.
        pin_memory: the ``DataLoader`` option (for CUDA transfers).

    Returns:
        The loader; ``loader.batch_sampler`` is the :class:`GlobalBatchSampler`.
    """
    sampler = GlobalBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    source = SeededItems(dataset, seed, epoch) if seed_items else dataset
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, _WORKER_STREAM, rank))
    return DataLoader(
        source,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        pin_memory=pin_memory,
    )


def dataset_targets(dataset: Dataset[Any]) -> Sequence[int]:
    """Labels of a data set built here, without reading (or transforming) the images.

    Args:
        dataset: a data set returned by a ``build()`` of this module (or wrapped in
            :class:`SeededItems`).

    Returns:
        The labels, in data-set order.

    Raises:
        TypeError: if the data set exposes no ``targets``.
    """
    if isinstance(dataset, SeededItems):
        return dataset_targets(dataset.dataset)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no targets attribute")
    if isinstance(targets, Tensor):
        return [int(t) for t in targets.tolist()]
    return [int(t) for t in targets]
