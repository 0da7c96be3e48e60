"""Tests of qtemperate.data.augment: seeded crops and flips, a pure function of (seed, epoch, i)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from qtemperate import data as D
from tests.data.fakes import fake_cifar10, fake_fashion


def _crops(x: torch.Tensor, pad: int, fill: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    _, h, w = x.shape
    padded = F.pad(x - fill.view(-1, 1, 1), (pad, pad, pad, pad)) + fill.view(-1, 1, 1)
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flips:
                out.append(crop.flip(-1))
    return out


def test_epoch_seed_closed_form() -> None:
    assert D.epoch_seed(7, 3) == 7 * 1000003 + 3 and D.epoch_seed(0, 0) == 0


def test_augmentation_is_a_seeded_crop(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    b = D.build_datasets("cifar10", root=tmp_path, augment=True, seed=2)
    assert b.augmented and isinstance(b.train, D.AugmentedTensorDataset)
    assert b.train_plain is b.train.base and (b.train.pad, b.train.hflip) == (4, True)
    fill = torch.tensor([(0 - m) / s for m, s in zip(D.CIFAR10_MEAN, D.CIFAR10_STD)])
    seen = []
    for epoch in range(3):
        b.train.set_epoch(epoch)
        x0, y0 = b.train[0]
        candidates = _crops(b.train.base.tensors[0][0], 4, fill, flips=True)
        assert any(torch.allclose(x0, c, atol=1e-5) for c in candidates)
        assert y0 == b.train.base.tensors[1][0]
        assert torch.equal(b.train[0][0], x0)  # same (seed, epoch, index) -> same draw
        seen.append(x0)
    assert not all(torch.equal(seen[0], s) for s in seen[1:])
    again = D.build_datasets("cifar10", root=tmp_path, augment=True, seed=2)
    again.train.set_epoch(2)
    assert torch.equal(again.train[0][0], seen[2])


def test_fashion_augment_crop_only_and_unsupported(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    b = D.build_datasets("fashion_mnist", root=tmp_path, augment=True)
    assert (b.train.pad, b.train.hflip) == (2, False)
    fill = torch.tensor([(0 - 0.2860) / 0.3530])
    for i in range(5):
        assert any(torch.allclose(b.train[i][0], c, atol=1e-5) for c in _crops(b.train.base.tensors[0][i], 2, fill, False))

    D.DATASETS.register("test_no_aug", D.DatasetSpec(lambda root, seed: None))
    try:
        with pytest.raises(ValueError, match="test_no_aug"):
            D.build_datasets("test_no_aug", augment=True)
    finally:
        del D.DATASETS._entries["test_no_aug"]


def test_augmentation_argument_errors() -> None:
    base = TensorDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pad must be >= 0, got -1"):
        D.AugmentedTensorDataset(base, pad=-1, hflip=False)
    with pytest.raises(ValueError, match="pad_value has 1 entries for 3 channels"):
        D.AugmentedTensorDataset(base, pad=1, hflip=False, pad_value=[0.0])
