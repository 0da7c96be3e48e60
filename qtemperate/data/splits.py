"""Deterministic splits: labels, class-balanced limits, stratified hold-outs, normalisation.

Everything here is a pure function of the labels (and a seed where stated), so a
recipe's ``limit_train``, ``limit_test`` and ``val_fraction`` select the same
samples on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from qtemperate.data.augment import AugmentedTensorDataset

__all__ = ["dataset_targets", "normalize", "stratified_first_n", "stratified_holdout", "subset"]


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


def subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The samples ``indices`` of ``dataset``: a new :class:`TensorDataset` for in-memory
    data (indexed tensors), else a :class:`Subset` (lazy data stays lazy)."""
    if isinstance(dataset, TensorDataset):
        return _like(dataset, *(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _like(dataset: TensorDataset, *tensors: torch.Tensor) -> TensorDataset:
    """A dataset of the same kind over ``tensors`` (a dataset with named targets keeps them)."""
    rebuild = getattr(dataset, "with_tensors", None)
    return rebuild(*tensors) if callable(rebuild) else TensorDataset(*tensors)


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


def stratified_holdout(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into ``(keep, holdout)`` with ``fraction`` of every class held out.

    Class ``c`` with ``n_c`` samples is shuffled by a generator seeded with ``seed``
    (shared across classes, in class order) and its first ``round(fraction * n_c)``
    indices are held out. Both index sets are returned sorted.

    Raises:
        ValueError: if ``fraction`` is not in ``(0, 1)``.
    """
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


def normalize(
    dataset: Dataset, mean: Sequence[float], std: Sequence[float], scale: float | None
) -> Dataset:
    """Standardise raw in-memory images: ``x' = (x / scale - mean[c]) / std[c]``.

    Images become ``float32`` and labels ``int64``. Lazy datasets and data with
    ``scale=None`` (already normalised) are returned unchanged.
    """
    if scale is None or not isinstance(dataset, TensorDataset):
        return dataset
    x, y, *more = dataset.tensors
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
    x = (x.to(torch.float32) / scale - m) / s
    return _like(dataset, x.contiguous(), y.long(), *more)
