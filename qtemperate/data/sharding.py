"""Samplers that split a run's data over the processes of a data-parallel group.

``data.batch_size`` is the **global** batch: the samples one optimizer step sees,
summed over all processes. With ``W`` processes each loads ``batch_size / W``.

:class:`DistributedEpochSampler` gives rank ``r`` the elements ``r, r + W, r + 2W, ...``
of the single-process order (:class:`~qtemperate.data.loaders.EpochSeededSampler`,
a pure function of ``(seed, epoch)``) after cutting it to whole global batches. Step
``k`` of rank ``r`` then reads positions ``kB + r + W·j`` (``B = batch_size``,
``j < B/W``), so the union over ranks of step ``k`` is exactly positions
``[kB, (k+1)B)``: the batch a single process with the same ``batch_size`` reads at
step ``k``. Exact resume and the single-process equivalence both follow.

:class:`ShardSampler` splits an evaluation or caching pass into contiguous shards
(no sample twice, none dropped); :func:`shard_range` says which rows a rank holds, so
the shards can be gathered back into index order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Sampler

from qtemperate.data.loaders import EpochSeededSampler

__all__ = ["DistributedEpochSampler", "ShardSampler", "per_process_batch", "shard_range"]


def per_process_batch(global_batch: int, world_size: int) -> int:
    """``global_batch / world_size``.

    Raises:
        ValueError: ``world_size`` does not divide ``global_batch`` (message names
            ``data.batch_size``).
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        more = " (more processes than samples in a batch)" if world_size > global_batch else ""
        raise ValueError(
            f"data.batch_size: {global_batch} is the global batch and must be divisible by the "
            f"number of processes, {world_size}{more}; use a multiple of {world_size}"
        )
    return global_batch // world_size


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous indices of rank ``rank``: ``[r·s, min(n, (r+1)·s))``, ``s = ⌈n/W⌉``."""
    size = math.ceil(n / world_size) if n else 0
    return range(min(n, rank * size), min(n, (rank + 1) * size))


class DistributedEpochSampler(Sampler[int]):
    """Rank ``rank``'s share of the epoch order (see the module docstring).

    Args:
        n: Samples in the training set.
        global_batch: ``data.batch_size`` (all processes together).
        rank: This process's rank.
        world_size: Number of processes.
        seed: Seed of the order (as :class:`EpochSeededSampler`).

    Raises:
        ValueError: ``world_size`` does not divide ``global_batch``, or the set holds
            fewer samples than one global batch (some process would get no batch).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int = 0) -> None:
        self.local_batch = per_process_batch(global_batch, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if n < global_batch:
            raise ValueError(
                f"data.batch_size: the training set holds {n} samples, fewer than one global batch "
                f"of {global_batch}; {world_size} processes would have no full step to share "
                f"(lower data.batch_size or the number of processes)"
            )
        self.order = EpochSeededSampler(n, seed)
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        # Whole global batches only (the single-process loader drops the partial one too).
        self.usable = (n // global_batch) * global_batch

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (the same on every rank)."""
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        perm = self.order.permutation()[: self.usable]
        return iter(perm[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.usable // self.world_size


class ShardSampler(Sampler[int]):
    """Contiguous shard ``rank`` of ``range(n)`` in index order (:func:`shard_range`).

    Shards may differ in length by up to ``world_size - 1``; loaders over them are
    only used without collectives inside the loop (evaluation reduces sums at the end,
    the teacher-logit cache gathers padded shards).
    """

    sharded = True  # evaluation reads this to know its sums need a reduction

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n = n
        self.rank = rank
        self.world_size = world_size
        self.indices = shard_range(n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
