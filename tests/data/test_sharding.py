"""Sharding samplers: W ranks x B/W read exactly the global batches one process reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtemperate.data.loaders import EpochSeededSampler
from qtemperate.data.sharding import (
    DistributedEpochSampler,
    ShardSampler,
    per_process_batch,
    shard_range,
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300), world=st.sampled_from([1, 2, 3, 4, 8]), per=st.integers(1, 16),
    seed=st.integers(0, 5), epoch=st.integers(0, 3),
)
def test_union_of_rank_batches_is_the_single_process_batch(n: int, world: int, per: int, seed: int, epoch: int) -> None:
    batch = world * per
    if n < batch:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            DistributedEpochSampler(n, batch, 0, world, seed)
        return
    samplers = [DistributedEpochSampler(n, batch, r, world, seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    shards = [list(s) for s in samplers]
    single = EpochSeededSampler(n, seed)
    single.set_epoch(epoch)
    order = list(single)
    steps = n // batch  # the single-process loader drops the last partial batch
    assert all(len(sh) == steps * per == len(s) for sh, s in zip(shards, samplers))
    for k in range(steps):
        union = sorted(i for sh in shards for i in sh[k * per : (k + 1) * per])
        assert union == sorted(order[k * batch : (k + 1) * batch])


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a, b = DistributedEpochSampler(100, 8, 1, 2, seed=3), DistributedEpochSampler(100, 8, 1, 2, seed=3)
    a.set_epoch(5)
    b.set_epoch(2)
    b.set_epoch(5)  # a resumed run jumps straight to its epoch
    assert list(a) == list(b)
    a.set_epoch(6)
    assert list(a) != list(b)


def test_per_process_batch_needs_a_divisor() -> None:
    assert per_process_batch(128, 8) == 16
    with pytest.raises(ValueError, match=r"data\.batch_size: 128 .* divisible .* 3"):
        per_process_batch(128, 3)
    with pytest.raises(ValueError, match="more processes than samples"):
        per_process_batch(4, 8)


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 4), (0, 2), (359, 2)])
def test_shards_cover_every_index_once_in_order(n: int, world: int) -> None:
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert [i for sh in shards for i in sh] == list(range(n))
    assert [list(shard_range(n, r, world)) for r in range(world)] == shards
    assert ShardSampler(n, 0, world).sharded
