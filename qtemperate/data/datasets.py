"""Datasets by name: the registry, each dataset's facts next to its builder, the bundle.

Every dataset is built by name through :data:`DATASETS` and returned as a
:class:`DataBundle`. The small datasets (Fashion-MNIST, sklearn digits, CIFAR and
the synthetic blobs) are held in memory as :class:`~torch.utils.data.TensorDataset`
objects of normalised ``float32`` images ``(N, C, H, W)`` and ``int64`` labels;
ImageNet is read lazily from an ImageFolder tree through torchvision.

A :class:`DatasetSpec` states its facts (:class:`DatasetInfo`: classes, channels,
image size) as a function of the same options its builder takes, so preflight and
the planner ask :func:`dataset_info` without reading a file, and
:func:`build_datasets` checks that what the builder made agrees with them.

Registering a dataset (its options are the builder's keyword arguments after
``root`` and ``seed``; ``info`` receives the same options)::

    from qtemperate.data import DATASETS, DatasetInfo, DatasetSpec, RawSplits

    def build_blobs(root, seed, num_classes=3):
        ...  # two TensorDatasets of (N, 1, 8, 8) images and labels < num_classes
        return RawSplits(train, test, num_classes, 1, (8, 8), (0.0,), (1.0,), scale=None)

    DATASETS.register("blobs", DatasetSpec(
        build=build_blobs,
        info=lambda num_classes=3: DatasetInfo(num_classes, 1, (8, 8)),
    ))

after which a recipe can say ``data: {name: blobs, kwargs: {num_classes: 5}}``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from qtemperate.data.augment import AugmentedTensorDataset
from qtemperate.data.splits import (
    dataset_targets,
    normalize,
    stratified_first_n,
    stratified_holdout,
    subset,
)
from qtemperate.registry import Registry

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetInfo",
    "DatasetOptionError",
    "DatasetSpec",
    "RawSplits",
    "build_datasets",
    "check_data_available",
    "dataset_info",
]


# --------------------------------------------------------------------------- facts and specs


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts about a dataset that are known without reading it.

    Attributes:
        num_classes: Number of classes (the classifier's output width).
        in_channels: Image channels.
        image_size: ``(height, width)`` of the model input.
        targets: The names of the per-sample targets: ``("labels",)`` (class labels)
            for a classification dataset; more for e.g. detection (``("labels", "boxes")``).
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    targets: tuple[str, ...] = ("labels",)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input sample."""
        return (self.in_channels, *self.image_size)


class DatasetOptionError(ValueError):
    """A dataset option (a key of ``data.kwargs``) is unknown or has a bad value.

    Attributes:
        option: The option's name, so callers can name the field ``data.kwargs.<option>``.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _target_names(dataset: Dataset) -> tuple[str, ...]:
    """A dataset's target names: ``target_names`` (see
    :class:`~qtemperate.data.detection.NamedTargetsDataset`), else class labels only."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return tuple(getattr(dataset, "target_names", ("labels",)))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``s`` -> ``(s, s)``; ``(h, w)`` -> ``(h, w)`` as ints."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


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

    @property
    def info(self) -> DatasetInfo:
        """The facts of what was built."""
        return DatasetInfo(self.num_classes, self.in_channels, _pair(self.image_size),
                           _target_names(self.train))


@dataclass
class DatasetSpec:
    """A registered dataset: how to build it and what it is.

    Attributes:
        build: ``build(root, seed, **options) -> RawSplits``. Its keyword arguments
            after ``root`` and ``seed`` are the dataset's options (a recipe's
            ``data.kwargs``); a builder taking ``**kwargs`` accepts any option.
        check: ``check(root, **kwargs)`` raising :class:`FileNotFoundError` or
            :class:`ImportError` when the data cannot be built; ``None`` = always available.
        crop_pad: Padding of the tensor random-crop augmentation; ``None`` when the
            dataset cannot be augmented on tensors.
        hflip: Whether the tensor augmentation also flips horizontally.
        builder_augments: The builder takes ``augment=`` itself (lazy datasets); it is
            then not a user option.
        description: One line for listings.
        info: ``info(**options) -> DatasetInfo``: classes, channels and image size
            computed from the same options ``build`` takes, without reading data
            (keyword-only). :func:`dataset_info` needs it; :func:`build_datasets`
            checks that the built data agrees with it.
    """

    build: Callable[..., RawSplits]
    check: Callable[..., None] | None = None
    crop_pad: int | None = None
    hflip: bool = False
    builder_augments: bool = False
    description: str = ""
    info: Callable[..., DatasetInfo] | None = field(default=None, kw_only=True)

    @property
    def options(self) -> tuple[str, ...] | None:
        """Names of the options ``build`` takes (sorted); ``None`` when it takes ``**kwargs``."""
        params = list(inspect.signature(self.build).parameters.values())[2:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        names = {
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        if self.builder_augments:
            names.discard("augment")
        return tuple(sorted(names))


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _check_options(name: str, spec: DatasetSpec, options: Mapping[str, Any]) -> None:
    """Raise :class:`DatasetOptionError` for the first option ``spec.build`` does not take."""
    accepted = spec.options
    if accepted is None:
        return
    for key in sorted(options):
        if key not in accepted:
            listed = ", ".join(accepted) or "(none)"
            raise DatasetOptionError(
                key, f"dataset {name!r} has no option {key!r}; accepted: {listed}"
            )


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

    @property
    def targets(self) -> tuple[str, ...]:
        """The names of the per-sample targets (``("labels",)`` for class labels only)."""
        return _target_names(self.train_plain)

    @property
    def info(self) -> DatasetInfo:
        """The facts of the built data (equal to :func:`dataset_info` of the same options)."""
        return DatasetInfo(self.num_classes, self.in_channels, _pair(self.image_size), self.targets)



# --------------------------------------------------------------------------- public API


def dataset_info(name: str, kwargs: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Classes, channels and image size of a dataset, from its name and options alone.

    Reads no data file: the registered :attr:`DatasetSpec.info` computes the facts
    from the options the builder would get (e.g. cifar100 ``label_mode: coarse``
    -> 20 classes; synthetic ``num_classes`` / ``in_channels`` / ``image_size``;
    imagenet ``image_size`` and ``num_classes``).

    Args:
        name: Registry key.
        kwargs: Dataset options (a recipe's ``data.kwargs``).

    Raises:
        KeyError: unknown dataset, listing the known ones.
        DatasetOptionError: (a :class:`ValueError`) an option the builder does not
            take, listing the accepted ones, or a bad option value; ``.option`` names it.
        ValueError: the dataset was registered without ``info``.
    """
    spec = DATASETS.get(name)
    options = dict(kwargs or {})
    _check_options(name, spec, options)
    if spec.info is None:
        raise ValueError(
            f"dataset {name!r} was registered without facts: "
            "register it as DatasetSpec(build=..., info=...)"
        )
    info = spec.info(**options)
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"dataset {name!r}: info() returned a {type(info).__name__}, not a DatasetInfo")
    return info


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


def _check_built(name: str, splits: RawSplits, facts: DatasetInfo | None) -> None:
    """The built data agrees with the stated facts (in-memory shapes and label range)."""
    if facts is not None and splits.info != facts:
        raise ValueError(f"dataset {name!r}: the builder made {splits.info} but info() states {facts}")
    shape = splits.info.input_shape
    for split, ds in (("train", splits.train), ("test", splits.test)):
        if not isinstance(ds, TensorDataset):
            continue
        x, y = ds.tensors[0], ds.tensors[1]
        if tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"dataset {name!r}: {split} images have shape {tuple(x.shape[1:])}, expected {shape}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= splits.num_classes):
            raise ValueError(
                f"dataset {name!r}: {split} labels span {int(y.min())}..{int(y.max())} "
                f"but it has {splits.num_classes} classes"
            )


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
    dataset's fixed mean/std, then wrap the training set for augmentation. The
    validation split is never augmented (for a builder that augments its own
    training split, it is taken from a plain build of the same split).

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
        DatasetOptionError: an option the builder does not take (listing the accepted
            ones) or a bad option value.
        ValueError: bad option values, ``augment`` on a dataset without augmentation,
            or built data that disagrees with the dataset's stated facts.
    """
    spec = DATASETS.get(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if augment and spec.crop_pad is None and not spec.builder_augments:
        raise ValueError(f"dataset {name!r} does not support augment=True")
    _check_options(name, spec, kwargs)
    facts = spec.info(**kwargs) if spec.info is not None else None
    if spec.builder_augments:
        kwargs["augment"] = augment
    splits = spec.build(root, seed, **kwargs)
    _check_built(name, splits, facts)

    train, test = splits.train, splits.test
    for label, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and limit <= 0:
            raise ValueError(f"{label} must be positive, got {limit}")
    if limit_train is not None:
        train = subset(train, stratified_first_n(dataset_targets(train), limit_train, splits.num_classes))
    if limit_test is not None:
        test = subset(test, stratified_first_n(dataset_targets(test), limit_test, splits.num_classes))
    val: Dataset | None = None
    if val_fraction > 0.0:
        keep, hold = stratified_holdout(dataset_targets(train), val_fraction, splits.num_classes, seed)
        source = train
        if spec.builder_augments and augment:
            # The builder augments its own train split: validate on a plain view of it.
            plain = spec.build(root, seed, **{**kwargs, "augment": False}).train
            if limit_train is not None:
                plain = subset(plain, stratified_first_n(dataset_targets(plain), limit_train, splits.num_classes))
            source = plain
        train, val = subset(train, keep), subset(source, hold)
        val = normalize(val, splits.mean, splits.std, splits.scale)
    train = normalize(train, splits.mean, splits.std, splits.scale)
    test = normalize(test, splits.mean, splits.std, splits.scale)
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
        image_size=_pair(splits.image_size),
        class_counts=[int(c) for c in counts],
        augmented=augmented,
        val=val,
        mean=tuple(splits.mean),
        std=tuple(splits.std),
    )
