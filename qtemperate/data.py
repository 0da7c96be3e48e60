"""Datasets, deterministic splits and reproducible loaders.

Every dataset is built by name through :data:`DATASETS` and returned as a
:class:`DataBundle`. The small datasets (Fashion-MNIST, sklearn digits, CIFAR and
the synthetic blobs) are held in memory as :class:`~torch.utils.data.TensorDataset`
objects of normalised ``float32`` images ``(N, C, H, W)`` and ``int64`` labels;
ImageNet is read lazily from an ImageFolder tree through torchvision.

Data order is a pure function of ``(seed, epoch)`` (:class:`EpochSeededSampler`)
and so is augmentation (:class:`AugmentedTensorDataset`), so a run resumed at
epoch ``e`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, Subset, TensorDataset

from qtemperate.registry import Registry

__all__ = [
    "DATASETS",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "SYNTHETIC_DEFAULTS",
    "AugmentedTensorDataset",
    "DataBundle",
    "DatasetSpec",
    "EpochSeededSampler",
    "RawSplits",
    "build_datasets",
    "check_data_available",
    "dataset_targets",
    "epoch_loader",
    "epoch_seed",
    "make_loaders",
    "read_idx",
    "resolve_fashion_mnist_root",
    "set_loader_epoch",
    "stratified_first_n",
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


# --------------------------------------------------------------------------- bundles


@dataclass
class DataBundle:
    """The datasets of one recipe plus what a model and a trainer need to know about them.

    Attributes:
        name: Registry key of the dataset.
        train: Training set (wrapped in :class:`AugmentedTensorDataset` when augmented).
        test: Test set, never augmented.
        num_classes: Number of classes.
        in_channels: Image channels.
        image_size: ``(height, width)`` of the model input.
        class_counts: Per-class sample counts of ``train``.
        augmented: Whether ``train`` draws a random augmentation per sample; the
            trainer caches teacher logits only when this is ``False``.
        val: Optional validation split carved out of the training set
            (``val_fraction > 0``), never augmented.
        mean: Per-channel normalisation mean that was subtracted.
        std: Per-channel normalisation std that was divided by.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_counts: list[int]
    augmented: bool = False
    val: Dataset | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def train_plain(self) -> Dataset:
        """The training set without augmentation (for calibration, BN re-estimation and
        teacher-logit caching); ``train`` itself when not augmented."""
        if isinstance(self.train, AugmentedTensorDataset):
            return self.train.base
        return self.train

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input sample."""
        return (self.in_channels, *self.image_size)


@dataclass
class RawSplits:
    """What a dataset builder returns, before limiting, splitting and augmentation.

    Attributes:
        train: Training set. A :class:`TensorDataset` of raw images (scaled by
            ``scale``) and labels, or a lazy dataset that already normalises.
        test: Test set in the same form.
        num_classes: Number of classes.
        in_channels: Image channels.
        image_size: ``(height, width)``.
        mean: Per-channel mean of images scaled to ``[0, 1]``.
        std: Per-channel std of images scaled to ``[0, 1]``.
        scale: Raw pixel maximum (255 for bytes); ``None`` when the images are already
            normalised (lazy datasets and synthetic data).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float | None = 255.0


@dataclass
class DatasetSpec:
    """A registered dataset.

    Attributes:
        build: ``build(root, seed, **kwargs) -> RawSplits``.
        check: ``check(root, **kwargs)`` raising :class:`FileNotFoundError` or
            :class:`ImportError` when the data cannot be built; ``None`` = always available.
        crop_pad: Padding of the tensor random-crop augmentation; ``None`` when the
            dataset cannot be augmented on tensors.
        hflip: Whether the tensor augmentation also flips horizontally.
        builder_augments: The builder takes ``augment=`` itself (lazy datasets).
    """

    build: Callable[..., RawSplits]
    check: Callable[..., None] | None = None
    crop_pad: int | None = None
    hflip: bool = False
    builder_augments: bool = False
    description: str = field(default="")


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    The header is two zero bytes, a dtype code, the number of dimensions and one
    big-endian ``uint32`` per dimension (images: magic 2051, labels: magic 2049).

    Args:
        path: File to read; gzip is detected from the content, not the name.
        expected_ndim: If given, the number of dimensions the file must have.

    Returns:
        A tensor of the file's shape (``uint8`` for byte data).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file on a bad magic number, an unexpected number of
            dimensions or a truncated/oversized payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"not an IDX file: {path} is only {len(data)} bytes long")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"not an IDX file: {path} has magic number {magic} (0x{magic:08x}); "
            "expected 2051 for images or 2049 for labels"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(
            f"IDX file {path} has {ndim} dimensions (magic {magic}), expected {expected_ndim}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        raise ValueError(
            f"IDX file {path} declares shape {tuple(shape)} ({expected} bytes) "
            f"but holds {payload} bytes of data"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


# --------------------------------------------------------------------------- helpers


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset as an ``int64`` tensor, without loading lazy images.

    Supports :class:`TensorDataset` (second tensor), :class:`Subset`,
    :class:`AugmentedTensorDataset` and anything with a ``targets`` attribute
    (e.g. torchvision's ImageFolder).

    Raises:
        TypeError: if the labels cannot be found without iterating the dataset.
    """
    if isinstance(dataset, AugmentedTensorDataset):
        return dataset_targets(dataset.base)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    raise TypeError(f"cannot read the labels of a {type(dataset).__name__}")


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def stratified_first_n(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Indices of a deterministic, class-balanced slice of ``n`` samples.

    Takes the first samples of every class in file order, round-robin over the
    classes (so each class gets ``n // num_classes`` or one more when available),
    and returns them sorted in file order.

    Args:
        labels: ``int64`` labels of the whole set.
        n: How many samples to keep; ``n >= len(labels)`` keeps everything.
        num_classes: Number of classes.
    """
    labels = labels.long()
    total = labels.numel()
    if n >= total:
        return torch.arange(total)
    if n <= 0:
        raise ValueError(f"limit must be positive, got {n}")
    rank = torch.empty(total, dtype=torch.long)
    for c in range(num_classes):
        where = (labels == c).nonzero(as_tuple=True)[0]
        rank[where] = torch.arange(where.numel())
    key = rank * num_classes + labels
    order = torch.argsort(key, stable=True)[:n]
    return torch.sort(order).values


def _stratified_holdout(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, holdout) with ``fraction`` of every class held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in range(num_classes):
        where = (labels == c).nonzero(as_tuple=True)[0]
        where = where[torch.randperm(where.numel(), generator=gen)]
        k = round(fraction * where.numel())
        hold.append(where[:k])
        keep.append(where[k:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(hold)).values


def _normalize(dataset: Dataset, splits: RawSplits) -> Dataset:
    if splits.scale is None or not isinstance(dataset, TensorDataset):
        return dataset
    x, y = dataset.tensors[0], dataset.tensors[1]
    mean = torch.tensor(splits.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x.to(torch.float32) / splits.scale - mean) / std
    return TensorDataset(x.contiguous(), y.long())


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for ``(seed, epoch)``: ``seed * 1000003 + epoch``."""
    return seed * 1000003 + epoch


# --------------------------------------------------------------------------- augmentation


class AugmentedTensorDataset(Dataset):
    """Random crop (with padding) and optional horizontal flip on in-memory tensors.

    The randomness of sample ``i`` is a pure function of ``(seed, epoch, i)``, so
    results do not depend on worker count, batch order or resumption. Padding uses
    the normalised value of a black pixel, like torchvision's zero padding before
    normalisation.

    Args:
        base: A :class:`TensorDataset` of normalised images ``(N, C, H, W)`` and labels.
        pad: Pixels of padding on each side before the random crop.
        hflip: Whether to flip horizontally with probability 1/2.
        seed: Base seed.
        pad_value: Per-channel fill value of the padding.
    """

    def __init__(
        self,
        base: TensorDataset,
        pad: int,
        hflip: bool,
        seed: int = 0,
        pad_value: Sequence[float] | None = None,
    ) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.base = base
        self.pad = pad
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        channels = base.tensors[0].shape[1]
        values = [0.0] * channels if pad_value is None else list(pad_value)
        if len(values) != channels:
            raise ValueError(f"pad_value has {len(values)} entries for {channels} channels")
        self._fill = torch.tensor(values, dtype=base.tensors[0].dtype).view(-1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        seed = (epoch_seed(self.seed, self.epoch) * 2654435761 + int(index)) % (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, 2 * self.pad + 1, (2,), generator=gen)
        flip = bool(torch.randint(0, 2, (1,), generator=gen).item()) and self.hflip
        if self.pad:
            c, h, w = x.shape
            canvas = self._fill.expand(c, h + 2 * self.pad, w + 2 * self.pad).clone()
            canvas[:, self.pad : self.pad + h, self.pad : self.pad + w] = x
            dy, dx = int(draws[0]), int(draws[1])
            x = canvas[:, dy : dy + h, dx : dx + w]
        if flip:
            x = x.flip(-1)
        return x.contiguous(), y


# --------------------------------------------------------------------------- builders


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


def _build_fashion(root: str | os.PathLike[str] | None, seed: int, **kwargs: Any) -> RawSplits:
    if kwargs:
        raise TypeError(f"fashion_mnist takes no options, got {sorted(kwargs)}")
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
    return RawSplits(sets[0], sets[1], 10, 1, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _check_digits(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc


def _build_digits(
    root: str | os.PathLike[str] | None, seed: int, test_fraction: float = 0.2
) -> RawSplits:
    _check_digits()
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = _stratified_holdout(y, test_fraction, 10, seed)
    return RawSplits(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
        10,
        1,
        (8, 8),
        DIGITS_MEAN,
        DIGITS_STD,
        scale=16.0,
    )


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
    xs, ys = [], []
    for path in paths:
        # Pickle can execute code: only load CIFAR archives from a trusted source.
        with open(path, "rb") as fh:
            try:
                batch = pickle.load(fh, encoding="bytes")
            except Exception as exc:
                raise ValueError(f"cannot unpickle CIFAR batch {path}: {exc}") from exc
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise ValueError(
                f"CIFAR batch {path} lacks the keys b'data' and {label_key!r}"
            )
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFAR batch {path}: b'data' has shape {data.shape}, expected (N, 3072)")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64)))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _make_cifar(name: str) -> tuple[Callable[..., RawSplits], Callable[..., None]]:
    def check(root: str | os.PathLike[str] | None = None, **_: Any) -> None:
        _cifar_files(name, root)

    def build(
        root: str | os.PathLike[str] | None, seed: int, label_mode: str = "fine"
    ) -> RawSplits:
        train_files, test_files = _cifar_files(name, root)
        if name == "cifar10":
            key, classes, mean, std = b"labels", 10, CIFAR10_MEAN, CIFAR10_STD
        elif label_mode in ("fine", "coarse"):
            key = b"fine_labels" if label_mode == "fine" else b"coarse_labels"
            classes = 100 if label_mode == "fine" else 20
            mean, std = CIFAR100_MEAN, CIFAR100_STD
        else:
            raise ValueError(f"cifar100 label_mode must be 'fine' or 'coarse', got {label_mode!r}")
        train = _load_cifar_batches(train_files, key)
        test = _load_cifar_batches(test_files, key)
        return RawSplits(train, test, classes, 3, (32, 32), mean, std)

    return build, check


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


def _build_imagenet(
    root: str | os.PathLike[str] | None,
    seed: int,
    augment: bool = False,
    image_size: int = 224,
    resize: int = 256,
) -> RawSplits:
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
    return RawSplits(
        train,
        test,
        len(train.classes),
        3,
        (image_size, image_size),
        IMAGENET_MEAN,
        IMAGENET_STD,
        scale=None,
    )


SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "in_channels": 1,
    "image_size": (16, 16),
    "n_train": 512,
    "n_test": 128,
    "noise": 0.5,
}
"""Default options of the ``synthetic`` dataset (override them via ``build_datasets`` kwargs)."""


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
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
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


DATASETS.register(
    "fashion_mnist",
    DatasetSpec(_build_fashion, _check_fashion, crop_pad=2, hflip=False,
                description="Fashion-MNIST IDX files, 28x28x1, 10 classes"),
)
DATASETS.register(
    "digits",
    DatasetSpec(_build_digits, _check_digits, crop_pad=1, hflip=False,
                description="sklearn digits, 8x8x1, 10 classes, seeded 80/20 split"),
)
for _name in ("cifar10", "cifar100"):
    _build, _check = _make_cifar(_name)
    DATASETS.register(
        _name,
        DatasetSpec(_build, _check, crop_pad=4, hflip=True,
                    description=f"{_name} python pickle batches, 32x32x3"),
    )
DATASETS.register(
    "imagenet",
    DatasetSpec(_build_imagenet, _check_imagenet, builder_augments=True,
                description="ImageFolder root/train and root/val via torchvision, 224x224x3"),
)
DATASETS.register(
    "synthetic",
    DatasetSpec(_build_synthetic, None, crop_pad=2, hflip=False,
                description="seeded class-dependent Gaussian blobs"),
)


# --------------------------------------------------------------------------- public API


def check_data_available(
    name: str, root: str | os.PathLike[str] | None = None, **kwargs: Any
) -> None:
    """Fail fast, before any training, when a dataset cannot be built.

    Args:
        name: Registry key.
        root: Data folder as a recipe would pass it.
        **kwargs: Ignored except by custom checks.

    Raises:
        KeyError: unknown dataset, listing the known ones.
        FileNotFoundError: a folder or file is missing (named in the message).
        ImportError: an optional dependency (torchvision, scikit-learn) is missing.
    """
    spec = DATASETS.get(name)
    if spec.check is not None:
        spec.check(root, **kwargs)


def build_datasets(
    name: str,
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    augment: bool = False,
    **kwargs: Any,
) -> DataBundle:
    """Build the train/test (and optional validation) sets of a registered dataset.

    Order of operations: load, take ``limit_train``/``limit_test`` as a deterministic
    class-balanced first-N slice (:func:`stratified_first_n`), hold out a seeded
    stratified ``val_fraction`` of the (limited) training set, normalise with the
    dataset's fixed mean/std, then wrap the training set for augmentation.

    Args:
        name: Registry key (``fashion_mnist``, ``digits``, ``cifar10``, ``cifar100``,
            ``imagenet``, ``synthetic`` or a user registration).
        root: Data folder (dataset-specific resolution when ``None``).
        val_fraction: Fraction of the training set held out as ``bundle.val``.
        limit_train: Keep at most this many training samples.
        limit_test: Keep at most this many test samples.
        seed: Seed of seeded splits, synthetic data and augmentation.
        augment: Random crop (+ horizontal flip on CIFAR) of training samples.
        **kwargs: Dataset-specific options (e.g. ``n_train`` for ``synthetic``).

    Raises:
        KeyError: unknown dataset.
        FileNotFoundError: missing data, naming the folder or file.
        ValueError: bad option values, or ``augment`` on a dataset without augmentation.
    """
    spec = DATASETS.get(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if augment and spec.crop_pad is None and not spec.builder_augments:
        raise ValueError(f"dataset {name!r} does not support augment=True")
    if spec.builder_augments:
        kwargs["augment"] = augment
    splits = spec.build(root, seed, **kwargs)

    train, test = splits.train, splits.test
    for label, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and limit <= 0:
            raise ValueError(f"{label} must be positive, got {limit}")
    if limit_train is not None:
        train = _subset(train, stratified_first_n(dataset_targets(train), limit_train, splits.num_classes))
    if limit_test is not None:
        test = _subset(test, stratified_first_n(dataset_targets(test), limit_test, splits.num_classes))
    val: Dataset | None = None
    if val_fraction > 0.0:
        keep, hold = _stratified_holdout(dataset_targets(train), val_fraction, splits.num_classes, seed)
        train, val = _subset(train, keep), _subset(train, hold)
        val = _normalize(val, splits)
    train, test = _normalize(train, splits), _normalize(test, splits)
    counts = torch.bincount(dataset_targets(train), minlength=splits.num_classes).tolist()

    augmented = bool(augment)
    if augment and not spec.builder_augments:
        if not isinstance(train, TensorDataset):
            raise ValueError(f"dataset {name!r}: tensor augmentation needs an in-memory dataset")
        fill = [(0.0 - m) / s for m, s in zip(splits.mean, splits.std)]
        if splits.scale is None:
            fill = [0.0] * splits.in_channels
        train = AugmentedTensorDataset(train, spec.crop_pad or 0, spec.hflip, seed, fill)
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=tuple(splits.image_size),  # type: ignore[arg-type]
        class_counts=[int(c) for c in counts],
        augmented=augmented,
        val=val,
        mean=tuple(splits.mean),
        std=tuple(splits.std),
    )


class EpochSeededSampler(Sampler[int]):
    """Random permutation whose order is a pure function of ``(seed, epoch)``.

    The permutation of epoch ``e`` is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + e))``,
    so a resumed run only needs :meth:`set_epoch` to reproduce the data order.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor:
        """The order of the current epoch."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.n


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Move a loader's sampler and (augmented) dataset to ``epoch``.

    Call before iterating the loader for that epoch; safe on loaders whose
    sampler/dataset have no ``set_epoch``.
    """
    for obj in (loader.sampler, loader.dataset):
        setter = getattr(obj, "set_epoch", None)
        if callable(setter):
            setter(epoch)


def _loader(
    dataset: Dataset, batch_size: int, sampler: Sampler[int], num_workers: int
) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def epoch_loader(
    dataset: Dataset,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A loader already set to ``epoch`` (order and augmentation from ``(seed, epoch)``)."""
    sampler: Sampler[int] = (
        EpochSeededSampler(len(dataset), seed) if shuffle else SequentialSampler(dataset)  # type: ignore[arg-type]
    )
    loader = _loader(dataset, batch_size, sampler, num_workers)
    set_loader_epoch(loader, epoch)
    return loader


def make_loaders(
    bundle: DataBundle,
    batch_size: int,
    eval_batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders; the train order is reproducible per epoch.

    The train loader uses :class:`EpochSeededSampler` (when ``shuffle``) set to
    epoch 0; call :func:`set_loader_epoch` at the start of each epoch.

    Returns:
        ``(train_loader, test_loader)``; the test loader is sequential.
    """
    train = epoch_loader(bundle.train, batch_size, 0, seed, shuffle, num_workers)
    test = _loader(
        bundle.test, eval_batch_size or batch_size, SequentialSampler(bundle.test), num_workers  # type: ignore[arg-type]
    )
    return train, test
