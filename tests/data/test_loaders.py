"""Tests of qtemperate.data.loaders: epoch-seeded order and the loaders of a run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from qtemperate import data as D


def test_epoch_seeded_sampler() -> None:
    s = D.EpochSeededSampler(50, seed=7)
    s.set_epoch(3)
    perm = list(s)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1000003 + 3)).tolist()
    assert perm == expected and sorted(perm) == list(range(50)) and len(s) == 50
    other = D.EpochSeededSampler(50, seed=7)
    other.set_epoch(3)
    assert list(other) == perm
    other.set_epoch(4)
    assert list(other) != perm


def test_loaders_reproducible_per_epoch() -> None:
    b = D.build_datasets("synthetic", n_train=64, n_test=16, augment=True)
    def batches(epoch: int) -> list[torch.Tensor]:
        tr, _ = D.make_loaders(b, batch_size=16, seed=1)
        D.set_loader_epoch(tr, epoch)
        return [x for x, _ in tr]
    def labels(epoch: int) -> list[int]:
        loader = D.epoch_loader(b.train, 16, epoch, seed=1)
        return torch.cat([y for _, y in loader]).tolist()

    first, again, later = batches(1), batches(1), batches(2)
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    assert not torch.equal(first[0], later[0])
    order = D.EpochSeededSampler(64, 1)
    order.set_epoch(1)
    assert labels(1) == b.train.base.tensors[1][order.permutation()].tolist()
    _, test_loader = D.make_loaders(b, batch_size=16, eval_batch_size=5)
    assert torch.equal(torch.cat([y for _, y in test_loader]), b.test.tensors[1])


# --------------------------------------------------------------------------- RunLoaders


def _bundle(augment: bool = False, val_fraction: float = 0.0, n_train: int = 40) -> D.DataBundle:
    return D.build_datasets(
        "synthetic", n_train=n_train, n_test=12, image_size=8, augment=augment, val_fraction=val_fraction, seed=3
    )


def _indices(loaders: D.RunLoaders) -> list[int]:
    return torch.cat([i for _, _, i in loaders.train]).tolist()


def test_indexed_dataset_items_and_epoch_forwarding() -> None:
    b = _bundle(augment=True)
    ds = D.IndexedDataset(b.train)
    assert len(ds) == len(b.train)
    x, y, i = ds[7]
    assert i == 7 and torch.equal(x, b.train[7][0]) and y == b.train[7][1]
    ds.set_epoch(5)
    assert b.train.epoch == 5
    D.IndexedDataset(b.test).set_epoch(2)  # a dataset without set_epoch: no-op


def test_run_loaders_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    b = _bundle()
    one = D.build_run_loaders(b, batch_size=8, eval_batch_size=16, seed=4)
    two = D.build_run_loaders(b, batch_size=8, eval_batch_size=16, seed=4)
    other_seed = D.build_run_loaders(b, batch_size=8, eval_batch_size=16, seed=5)
    assert isinstance(one.sampler, D.EpochSeededSampler)
    orders = []
    for epoch in (0, 1, 2):
        one.set_epoch(epoch)
        expected = torch.randperm(40, generator=torch.Generator().manual_seed(4 * 1000003 + epoch)).tolist()
        orders.append(_indices(one))
        assert orders[-1] == expected
    two.set_epoch(2)  # jumping straight to epoch 2 (a resume) gives the same order
    assert _indices(two) == orders[2]
    assert orders[0] != orders[1] != orders[2]
    other_seed.set_epoch(2)
    assert _indices(other_seed) != orders[2]


def test_run_loaders_set_epoch_moves_the_augmentation_too() -> None:
    b = _bundle(augment=True)
    loaders = D.build_run_loaders(b, batch_size=8, eval_batch_size=16, seed=4)

    def epoch_data(epoch: int) -> dict[int, torch.Tensor]:
        loaders.set_epoch(epoch)
        return {int(i): x for xs, _, idx in loaders.train for x, i in zip(xs, idx)}

    first, second, first_again = epoch_data(1), epoch_data(2), epoch_data(1)
    assert b.train.epoch == 1 and loaders.sampler.epoch == 1
    assert all(torch.equal(first[i], first_again[i]) for i in first)
    assert any(not torch.equal(first[i], second[i]) for i in first)
    # Each sample is the augmentation draw of (seed, epoch, index), whatever the order.
    b.train.set_epoch(2)
    assert all(torch.equal(second[i], b.train[i][0]) for i in second)


@pytest.mark.parametrize(("n_train", "batch_size", "drop_last", "batches"), [(40, 8, True, 5), (42, 8, True, 5), (8, 8, False, 1), (6, 8, False, 1)])
def test_run_loaders_drop_last_only_when_more_than_one_batch(n_train: int, batch_size: int, drop_last: bool, batches: int) -> None:
    loaders = D.build_run_loaders(_bundle(n_train=n_train), batch_size=batch_size, eval_batch_size=16)
    assert loaders.train.drop_last is drop_last and len(loaders.train) == batches
    assert loaders.train.batch_size == batch_size


def test_run_loaders_eval_calib_and_plain_are_sequential() -> None:
    b = _bundle(augment=True, val_fraction=0.25)
    loaders = D.build_run_loaders(b, batch_size=8, eval_batch_size=5, seed=1)
    assert loaders.val is not None and loaders.val_or_test is loaders.val
    for loader, dataset, size in (
        (loaders.test, b.test, 5),
        (loaders.val, b.val, 5),
        (loaders.calib, b.train_plain, 8),
        (loaders.plain, b.train_plain, 5),
    ):
        assert isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler)
        assert loader.dataset is dataset and loader.batch_size == size and not loader.drop_last
    # plain: the unaugmented training set in index order (row i = training index i).
    xs = torch.cat([x for x, _ in loaders.plain])
    assert torch.equal(xs, b.train.base.tensors[0])
    assert torch.equal(torch.cat([y for _, y in loaders.plain]), b.train.base.tensors[1])
    assert torch.equal(loaders.example_input, b.test[0][0].unsqueeze(0))
    assert loaders.example_input.shape == (1, *b.input_shape)


def test_run_loaders_without_validation_split_use_test() -> None:
    loaders = D.build_run_loaders(_bundle(), batch_size=8, eval_batch_size=16, num_workers=0)
    assert loaders.val is None and loaders.val_or_test is loaders.test


def test_run_loaders_reject_bad_batch_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        D.build_run_loaders(_bundle(), batch_size=0, eval_batch_size=16)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        D.build_run_loaders(_bundle(), batch_size=8, eval_batch_size=0)
