"""Reproducible loaders: data order and augmentation are pure functions of ``(seed, epoch)``.

:class:`EpochSeededSampler` orders the training set per epoch; together with
:class:`~qtemperate.data.augment.AugmentedTensorDataset` a run resumed at epoch
``e`` sees exactly the batches an uninterrupted run would have seen.
:func:`build_run_loaders` builds every loader a training run needs from a
:class:`~qtemperate.data.datasets.DataBundle` (:class:`RunLoaders`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from qtemperate.data.augment import epoch_seed
from qtemperate.data.datasets import DataBundle

__all__ = [
    "EpochSeededSampler",
    "IndexedDataset",
    "RunLoaders",
    "build_run_loaders",
    "epoch_loader",
    "make_loaders",
    "set_loader_epoch",
]


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


class IndexedDataset(Dataset):
    """Wraps a dataset so each item is ``(x, y, index)`` (the index keys cached teacher logits).

    :meth:`set_epoch` is forwarded to the wrapped dataset, so an augmented training set
    moves with :func:`set_loader_epoch` through the wrapper.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        """Move the wrapped dataset's augmentation to ``epoch`` (no-op when it has none)."""
        setter = getattr(self.base, "set_epoch", None)
        if callable(setter):
            setter(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.base[index]
        return x, y, index


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
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler[int],
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory,
    )


def _sequential(dataset: Dataset, batch_size: int, pin_memory: bool = False, num_workers: int = 0) -> DataLoader:
    return _loader(dataset, batch_size, SequentialSampler(dataset), num_workers, pin_memory=pin_memory)  # type: ignore[arg-type]


def _sharded(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, pin_memory: bool, num_workers: int
) -> DataLoader:
    from qtemperate.data.sharding import ShardSampler

    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return _loader(dataset, batch_size, sampler, num_workers, pin_memory=pin_memory)


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


@dataclass
class RunLoaders:
    """Every loader of one training run, built by :func:`build_run_loaders`.

    Attributes:
        train: :class:`IndexedDataset` over ``bundle.train`` (items ``(x, y, index)``),
            ordered by an :class:`EpochSeededSampler`; drops the last partial batch
            when the set holds more than one batch.
        test: ``bundle.test`` in order, ``eval_batch_size`` per batch.
        val: ``bundle.val`` in order (``None`` without a validation split).
        calib: ``bundle.train_plain`` (unaugmented) in order, ``batch_size`` per batch:
            quantizer calibration and BatchNorm re-estimation.
        plain: ``bundle.train_plain`` in index order, ``eval_batch_size`` per batch:
            the teacher-logit cache (row ``i`` belongs to training index ``i``; in a
            data-parallel run each rank holds a contiguous shard, gathered afterwards).
        example_input: ``bundle.test[0][0]`` with a batch dimension (CPU), for size
            reports and export.
    """

    train: DataLoader
    test: DataLoader
    val: DataLoader | None
    calib: DataLoader
    plain: DataLoader
    example_input: torch.Tensor

    @property
    def sampler(self) -> Sampler[int]:
        """The training sampler (an :class:`EpochSeededSampler`, or any sampler with
        ``set_epoch``, e.g. a distributed one)."""
        return self.train.sampler  # type: ignore[return-value]

    def set_epoch(self, epoch: int) -> None:
        """Select the data order and augmentation draw of ``epoch``: both are pure
        functions of ``(seed, epoch)``, so this is all an exact resume needs."""
        set_loader_epoch(self.train, epoch)

    @property
    def val_or_test(self) -> DataLoader:
        """The loader whose loss drives the temperature schedule: ``val`` when there is a
        validation split, else ``test`` (the same object)."""
        return self.val if self.val is not None else self.test


def build_run_loaders(
    bundle: DataBundle,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> RunLoaders:
    """The loaders a training run reads (see :class:`RunLoaders`), set to epoch 0.

    With ``world_size > 1`` (a data-parallel run, :mod:`qtemperate.data.sharding`)
    ``batch_size`` stays the global batch: ``train`` reads this rank's
    ``batch_size / world_size`` samples of each global batch
    (:class:`~qtemperate.data.sharding.DistributedEpochSampler`); ``test``, ``val`` and
    ``plain`` read this rank's contiguous shard (``eval_batch_size`` per process);
    ``calib`` is not sharded (every rank calibrates on the batches a single process
    would use).

    Args:
        bundle: The built datasets.
        batch_size: Training (and calibration) batch size, global over all processes.
        eval_batch_size: Batch size of test, validation and teacher-logit passes (per process).
        num_workers: Worker processes of each loader, per process (decoding, e.g.
            ImageNet JPEGs, runs in them; evaluation passes need them as much as training).
        seed: Seed of the training order and augmentation.
        rank: This process's rank in the data-parallel group.
        world_size: Processes in the group (1: a plain single-process run).
        pin_memory: Page-locked batches (for non-blocking copies to a GPU).

    Raises:
        ValueError: a batch size below 1; with ``world_size > 1``, a batch size the
            world size does not divide or a training set smaller than one global batch.
    """
    train_set = IndexedDataset(bundle.train)
    if world_size > 1:
        from qtemperate.data.sharding import DistributedEpochSampler

        dist_sampler = DistributedEpochSampler(len(train_set), batch_size, rank, world_size, seed)
        train = _loader(train_set, dist_sampler.local_batch, dist_sampler, num_workers, pin_memory=pin_memory)

        def evaluation(ds: Dataset) -> DataLoader:
            return _sharded(ds, eval_batch_size, rank, world_size, pin_memory, num_workers)
    else:
        sampler = EpochSeededSampler(len(train_set), seed)
        train = _loader(
            train_set, batch_size, sampler, num_workers, drop_last=len(train_set) > batch_size,
            pin_memory=pin_memory,
        )

        def evaluation(ds: Dataset) -> DataLoader:
            return _sequential(ds, eval_batch_size, pin_memory, num_workers)
    loaders = RunLoaders(
        train=train,
        test=evaluation(bundle.test),
        val=evaluation(bundle.val) if bundle.val is not None else None,
        calib=_sequential(bundle.train_plain, batch_size, pin_memory, num_workers),
        plain=evaluation(bundle.train_plain),
        example_input=bundle.test[0][0].unsqueeze(0),
    )
    loaders.set_epoch(0)
    return loaders
