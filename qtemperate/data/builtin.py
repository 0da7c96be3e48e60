"""The built-in datasets: Fashion-MNIST, sklearn digits, CIFAR-10/100, ImageNet, synthetic.

Each builder sits next to its facts (the ``*_info`` function a :class:`DatasetSpec`
carries) and its availability check; all are registered in :data:`DATASETS` when
:mod:`qtemperate.data` is imported. Nothing is downloaded: files must be on disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from qtemperate.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetOptionError,
    DatasetSpec,
    RawSplits,
    _pair,
)
from qtemperate.data.formats import CIFAR_IMAGE_SHAPE, load_cifar_batch, read_idx
from qtemperate.data.splits import stratified_holdout

__all__ = [
    "CIFAR10_ENV",
    "CIFAR100_ENV",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGENET_ENV",
    "SYNTHETIC_DEFAULTS",
    "resolve_fashion_mnist_root",
]

FASHION_MNIST_ENV = "QTEMPERATE_FASHION_MNIST"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_ENV = "QTEMPERATE_CIFAR10"
CIFAR100_ENV = "QTEMPERATE_CIFAR100"
IMAGENET_ENV = "QTEMPERATE_IMAGENET"

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Fixed per-dataset normalisation constants (of pixel values scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



# --------------------------------------------------------------------------- fashion_mnist

FASHION_MNIST_INFO = DatasetInfo(10, 1, (28, 28))


def resolve_fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Find the Fashion-MNIST folder: ``root``, then ``$QTEMPERATE_FASHION_MNIST``,
    then ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: naming the folder and the missing file, with how to get it.
    """
    if root is not None:
        folder, origin = Path(root), "root argument"
    elif os.environ.get(FASHION_MNIST_ENV):
        folder, origin = Path(os.environ[FASHION_MNIST_ENV]), f"${FASHION_MNIST_ENV}"
    else:
        folder, origin = FASHION_MNIST_SYSTEM_DIR, "default location"
    for stem in _FASHION_FILES.values():
        if _fashion_file(folder, stem) is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {folder} ({origin}): missing {stem}[.gz]. "
                f"Install it with `apt-get install dataset-fashion-mnist` or set "
                f"{FASHION_MNIST_ENV} to a folder with the four IDX files."
            )
    return folder


def _fashion_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _check_fashion(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    resolve_fashion_mnist_root(root)


def _fashion_info() -> DatasetInfo:
    return FASHION_MNIST_INFO


def _build_fashion(root: str | os.PathLike[str] | None, seed: int) -> RawSplits:
    info = _fashion_info()
    folder = resolve_fashion_mnist_root(root)
    files = {k: _fashion_file(folder, stem) for k, stem in _FASHION_FILES.items()}
    sets = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], expected_ndim=3)  # type: ignore[arg-type]
        labels = read_idx(files[f"{split}_labels"], expected_ndim=1)  # type: ignore[arg-type]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{files[f'{split}_images']} holds {images.shape[0]} images but "
                f"{files[f'{split}_labels']} holds {labels.shape[0]} labels"
            )
        sets.append(TensorDataset(images.unsqueeze(1), labels.long()))
    return RawSplits(
        sets[0], sets[1], info.num_classes, info.in_channels, info.image_size,
        FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    )


# --------------------------------------------------------------------------- digits

DIGITS_INFO = DatasetInfo(10, 1, (8, 8))


def _check_digits(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc


def _digits_info(**_: Any) -> DatasetInfo:
    return DIGITS_INFO


def _build_digits(
    root: str | os.PathLike[str] | None, seed: int, test_fraction: float = 0.2
) -> RawSplits:
    info = _digits_info()
    _check_digits()
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = stratified_holdout(y, test_fraction, info.num_classes, seed)
    return RawSplits(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
        info.num_classes,
        info.in_channels,
        info.image_size,
        DIGITS_MEAN,
        DIGITS_STD,
        scale=16.0,
    )


# --------------------------------------------------------------------------- CIFAR

CIFAR10_INFO = DatasetInfo(10, CIFAR_IMAGE_SHAPE[0], (CIFAR_IMAGE_SHAPE[1], CIFAR_IMAGE_SHAPE[2]))
CIFAR100_LABEL_MODES: dict[str, tuple[bytes, int]] = {
    "fine": (b"fine_labels", 100),
    "coarse": (b"coarse_labels", 20),
}
"""``label_mode`` of cifar100 -> (label key in the pickle batches, number of classes)."""


def _root_or_env(root: str | os.PathLike[str] | None, env: str, name: str, what: str) -> Path:
    """The given data folder, else ``$env``; a clear error when neither is set."""
    if root is None:
        root = os.environ.get(env)
        if not root:
            raise FileNotFoundError(f"{name} needs a data folder: pass root={what} or set {env}")
    return Path(root)


def _cifar_folder(
    root: str | os.PathLike[str] | None, name: str, env: str, sub: str, probe: str
) -> Path:
    """``root/sub``, or ``root`` itself when it directly holds ``probe``."""
    folder = _root_or_env(root, env, name, f"<dir containing {sub}>")
    if not (folder / sub).is_dir() and (folder / probe).is_file():
        return folder
    return folder / sub


def _cifar_files(name: str, root: str | os.PathLike[str] | None) -> tuple[list[Path], list[Path]]:
    if name == "cifar10":
        folder = _cifar_folder(root, name, CIFAR10_ENV, "cifar-10-batches-py", "data_batch_1")
        train = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test = [folder / "test_batch"]
    else:
        folder = _cifar_folder(root, name, CIFAR100_ENV, "cifar-100-python", "train")
        train, test = [folder / "train"], [folder / "test"]
    for path in (*train, *test):
        if not path.is_file():
            raise FileNotFoundError(f"{name} file not found: {path}")
    return train, test


def _load_cifar_batches(paths: list[Path], label_key: bytes) -> TensorDataset:
    batches = [load_cifar_batch(path, label_key) for path in paths]
    return TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))


def _check_cifar10(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    _cifar_files("cifar10", root)


def _check_cifar100(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    _cifar_files("cifar100", root)


def _cifar10_info() -> DatasetInfo:
    return CIFAR10_INFO


def _build_cifar10(root: str | os.PathLike[str] | None, seed: int) -> RawSplits:
    info = _cifar10_info()
    train_files, test_files = _cifar_files("cifar10", root)
    train = _load_cifar_batches(train_files, b"labels")
    test = _load_cifar_batches(test_files, b"labels")
    return RawSplits(
        train, test, info.num_classes, info.in_channels, info.image_size, CIFAR10_MEAN, CIFAR10_STD
    )


def _cifar100_labels(label_mode: str) -> tuple[bytes, int]:
    if label_mode not in CIFAR100_LABEL_MODES:
        raise DatasetOptionError(
            "label_mode", f"cifar100 label_mode must be 'fine' or 'coarse', got {label_mode!r}"
        )
    return CIFAR100_LABEL_MODES[label_mode]


def _cifar100_info(label_mode: str = "fine") -> DatasetInfo:
    _, classes = _cifar100_labels(label_mode)
    return DatasetInfo(classes, CIFAR10_INFO.in_channels, CIFAR10_INFO.image_size)


def _build_cifar100(
    root: str | os.PathLike[str] | None, seed: int, label_mode: str = "fine"
) -> RawSplits:
    info = _cifar100_info(label_mode)
    key, _ = _cifar100_labels(label_mode)
    train_files, test_files = _cifar_files("cifar100", root)
    train = _load_cifar_batches(train_files, key)
    test = _load_cifar_batches(test_files, key)
    return RawSplits(
        train, test, info.num_classes, info.in_channels, info.image_size, CIFAR100_MEAN, CIFAR100_STD
    )


# --------------------------------------------------------------------------- imagenet


def _import_torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError(
            "the imagenet dataset needs torchvision: pip install torchvision"
        ) from exc
    return torchvision


def _imagenet_root(root: str | os.PathLike[str] | None) -> Path:
    folder = _root_or_env(root, IMAGENET_ENV, "imagenet", "<dir with train/ and val/>")
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            raise FileNotFoundError(
                f"imagenet folder not found: {folder / split} (expected root/train/<class>/*.JPEG)"
            )
    return folder


def _check_imagenet(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    _imagenet_root(root)
    _import_torchvision()


def _imagenet_info(num_classes: int = 1000, image_size: int = 224, **_: Any) -> DatasetInfo:
    return DatasetInfo(int(num_classes), 3, _pair(image_size))


def _build_imagenet(
    root: str | os.PathLike[str] | None,
    seed: int,
    augment: bool = False,
    image_size: int = 224,
    resize: int = 256,
    num_classes: int = 1000,
) -> RawSplits:
    """ImageFolder ``root/train`` and ``root/val``; ``num_classes`` must equal the number
    of class folders (1000 for ImageNet-1k; set it for a subset such as Imagenette)."""
    info = _imagenet_info(num_classes, image_size)
    folder = _imagenet_root(root)
    tv = _import_torchvision()
    t = tv.transforms
    norm = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = t.Compose([t.Resize(resize), t.CenterCrop(image_size), t.ToTensor(), norm])
    train_tf = (
        t.Compose([t.RandomResizedCrop(image_size), t.RandomHorizontalFlip(), t.ToTensor(), norm])
        if augment
        else eval_tf
    )
    train = tv.datasets.ImageFolder(str(folder / "train"), transform=train_tf)
    test = tv.datasets.ImageFolder(str(folder / "val"), transform=eval_tf)
    if train.classes != test.classes:
        raise ValueError(f"imagenet: {folder / 'train'} and {folder / 'val'} have different classes")
    if len(train.classes) != info.num_classes:
        raise DatasetOptionError(
            "num_classes",
            f"imagenet: {folder / 'train'} has {len(train.classes)} class folders but "
            f"num_classes is {info.num_classes}; set num_classes: {len(train.classes)}",
        )
    return RawSplits(
        train,
        test,
        info.num_classes,
        info.in_channels,
        info.image_size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        scale=None,
    )


# --------------------------------------------------------------------------- synthetic

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "in_channels": 1,
    "image_size": (16, 16),
    "n_train": 512,
    "n_test": 128,
    "noise": 0.5,
}
"""Default options of the ``synthetic`` dataset (override them via ``build_datasets`` kwargs)."""


def _synthetic_info(
    num_classes: int = SYNTHETIC_DEFAULTS["num_classes"],
    in_channels: int = SYNTHETIC_DEFAULTS["in_channels"],
    image_size: int | Sequence[int] = SYNTHETIC_DEFAULTS["image_size"],
    **_: Any,
) -> DatasetInfo:
    return DatasetInfo(int(num_classes), int(in_channels), _pair(image_size))


def _build_synthetic(
    root: str | os.PathLike[str] | None,
    seed: int,
    num_classes: int = SYNTHETIC_DEFAULTS["num_classes"],
    in_channels: int = SYNTHETIC_DEFAULTS["in_channels"],
    image_size: int | Sequence[int] = SYNTHETIC_DEFAULTS["image_size"],
    n_train: int = SYNTHETIC_DEFAULTS["n_train"],
    n_test: int = SYNTHETIC_DEFAULTS["n_test"],
    noise: float = SYNTHETIC_DEFAULTS["noise"],
) -> RawSplits:
    """Class-dependent Gaussian blobs: each class owns two bumps per channel.

    Every class template is the sum of two Gaussian bumps (sigma = size/6) at seeded
    random centres per channel, standardised; a sample is its class template plus
    ``noise`` times standard normal noise. Labels are balanced and shuffled.
    """
    info = _synthetic_info(num_classes, in_channels, image_size)
    num_classes, in_channels, (h, w) = info.num_classes, info.in_channels, info.image_size
    if num_classes < 2 or n_train < 1 or n_test < 1:
        raise ValueError("synthetic needs num_classes >= 2, n_train >= 1 and n_test >= 1")
    gen = torch.Generator().manual_seed(seed)
    ys_grid = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs_grid = torch.arange(w, dtype=torch.float32).view(1, w)
    sigma = max(h, w) / 6.0
    templates = torch.zeros(num_classes, in_channels, h, w)
    for c in range(num_classes):
        for ch in range(in_channels):
            for _ in range(2):
                cy = float(torch.rand(1, generator=gen)) * (h - 1)
                cx = float(torch.rand(1, generator=gen)) * (w - 1)
                d2 = (ys_grid - cy) ** 2 + (xs_grid - cx) ** 2
                templates[c, ch] += torch.exp(-d2 / (2 * sigma**2))
    templates = (templates - templates.mean()) / templates.std()

    def sample(n: int) -> TensorDataset:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = templates[y] + noise * torch.randn(n, in_channels, h, w, generator=gen)
        return TensorDataset(x, y.long())

    train, test = sample(n_train), sample(n_test)
    zeros, ones = (0.0,) * in_channels, (1.0,) * in_channels
    return RawSplits(train, test, num_classes, in_channels, (h, w), zeros, ones, scale=None)


# --------------------------------------------------------------------------- registrations

DATASETS.register(
    "fashion_mnist",
    DatasetSpec(_build_fashion, _check_fashion, crop_pad=2, hflip=False, info=_fashion_info,
                description="Fashion-MNIST IDX files, 28x28x1, 10 classes"),
)
DATASETS.register(
    "digits",
    DatasetSpec(_build_digits, _check_digits, crop_pad=1, hflip=False, info=_digits_info,
                description="sklearn digits, 8x8x1, 10 classes, seeded 80/20 split"),
)
DATASETS.register(
    "cifar10",
    DatasetSpec(_build_cifar10, _check_cifar10, crop_pad=4, hflip=True, info=_cifar10_info,
                description="cifar10 python pickle batches, 32x32x3, 10 classes"),
)
DATASETS.register(
    "cifar100",
    DatasetSpec(_build_cifar100, _check_cifar100, crop_pad=4, hflip=True, info=_cifar100_info,
                description="cifar100 python pickle batches, 32x32x3, 100 fine or 20 coarse classes"),
)
DATASETS.register(
    "imagenet",
    DatasetSpec(_build_imagenet, _check_imagenet, builder_augments=True, info=_imagenet_info,
                description="ImageFolder root/train and root/val via torchvision, 224x224x3"),
)
DATASETS.register(
    "synthetic",
    DatasetSpec(_build_synthetic, None, crop_pad=2, hflip=False, info=_synthetic_info,
                description="seeded class-dependent Gaussian blobs"),
)

