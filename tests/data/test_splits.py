"""Tests of qtemperate.data.splits: class-balanced limits, hold-outs, normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from qtemperate import data as D
from qtemperate.data.splits import normalize, stratified_holdout, subset
from tests.data.fakes import fake_fashion


def test_stratified_first_n_matches_brute_force() -> None:
    labels = torch.tensor([0, 0, 1, 2, 0, 1, 1, 2, 2, 2, 0, 1])
    got = D.stratified_first_n(labels, 7, 3).tolist()
    # Round-robin by rank within class: ranks 0 of classes 0,1,2, ranks 1 of 0,1,2, rank 2 of class 0.
    by_class = {c: [i for i, lab in enumerate(labels.tolist()) if lab == c] for c in range(3)}
    picked = [by_class[c][r] for r in range(3) for c in range(3) if r < len(by_class[c])][:7]
    assert got == sorted(picked)
    assert D.stratified_first_n(labels, 100, 3).tolist() == list(range(12))


def test_limits_and_val_split(tmp_path: Path) -> None:
    fake_fashion(tmp_path, n_train=40, n_test=20)
    b = D.build_datasets("fashion_mnist", root=tmp_path, limit_train=20, limit_test=10, val_fraction=0.5, seed=3)
    full = D.build_datasets("fashion_mnist", root=tmp_path)
    keep = D.stratified_first_n(full.train.tensors[1], 20, 10)
    limited_x = full.train.tensors[0][keep]
    assert len(b.train) + len(b.val) == 20 and len(b.val) == 10  # 2 per class, 1 held out each
    assert b.class_counts == [1] * 10 and len(b.test) == 10
    union = torch.cat([b.train.tensors[0], b.val.tensors[0]])
    # Every kept sample appears exactly once across train+val.
    matches = (union.flatten(1)[:, None] == limited_x.flatten(1)[None]).all(-1)
    assert matches.sum(0).tolist() == [1] * 20
    again = D.build_datasets("fashion_mnist", root=tmp_path, limit_train=20, limit_test=10, val_fraction=0.5, seed=3)
    assert torch.equal(again.val.tensors[0], b.val.tensors[0])


def test_stratified_holdout_per_class_fraction_and_seed() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 4)
    keep, hold = stratified_holdout(labels, 0.4, 3, seed=1)
    assert torch.equal(torch.sort(torch.cat([keep, hold])).values, torch.arange(19))
    # round(0.4 * n_c) per class: round(4.0), round(2.0), round(1.6).
    assert torch.bincount(labels[hold], minlength=3).tolist() == [4, 2, 2]
    assert keep.tolist() == sorted(keep.tolist()) and hold.tolist() == sorted(hold.tolist())
    assert torch.equal(stratified_holdout(labels, 0.4, 3, seed=1)[1], hold)
    assert not torch.equal(stratified_holdout(labels, 0.4, 3, seed=2)[1], hold)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 1.0"):
        stratified_holdout(labels, 1.0, 3, seed=0)


def test_dataset_targets_and_subset() -> None:
    x, y = torch.zeros(6, 1, 2, 2), torch.tensor([3, 1, 4, 1, 5, 9])
    ds = TensorDataset(x, y)
    idx = torch.tensor([5, 0, 2])
    sub = subset(ds, idx)
    assert isinstance(sub, TensorDataset) and D.dataset_targets(sub).tolist() == [9, 3, 4]
    lazy = Subset(ds, [1, 2])
    assert D.dataset_targets(lazy).tolist() == [1, 4]
    assert isinstance(subset(lazy, torch.tensor([1])), Subset)
    aug = D.AugmentedTensorDataset(ds, pad=1, hflip=False)
    assert D.dataset_targets(aug).tolist() == y.tolist()
    with pytest.raises(TypeError, match="cannot read the labels of a list"):
        D.dataset_targets([(x[0], y[0])])  # type: ignore[arg-type]


def test_normalize_closed_form_and_passthrough() -> None:
    raw = TensorDataset(torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8), torch.tensor([0, 1]))
    out = normalize(raw, (0.5,), (0.25,), 255.0)
    expected = (torch.tensor([[0.0, 255.0], [51.0, 102.0]]) / 255 - 0.5) / 0.25
    assert out.tensors[0].dtype == torch.float32
    assert torch.allclose(out.tensors[0][:, 0, 0], expected)
    assert normalize(raw, (0.5,), (0.25,), None) is raw
