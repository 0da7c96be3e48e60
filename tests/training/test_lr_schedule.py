"""The learning-rate schedule against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from qtemperate.training.lr_schedule import lr_at, set_lr


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 15])
def test_cosine_matches_formula(step: int) -> None:
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * min(step, 10) / 10))
    assert lr_at(step, 10, 0.1, "cosine") == pytest.approx(expected)


def test_cosine_boundaries() -> None:
    assert lr_at(0, 10, 0.2) == pytest.approx(0.2)
    assert lr_at(5, 10, 0.2) == pytest.approx(0.1)
    assert lr_at(10, 10, 0.2) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_single_step_keep_peak() -> None:
    assert lr_at(7, 10, 0.3, "constant") == 0.3
    assert lr_at(0, 1, 0.3, "cosine") == 0.3


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="lr schedule"):
        lr_at(0, 10, 0.1, "linear")


def test_set_lr_sets_every_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]
