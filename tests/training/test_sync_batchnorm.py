"""Synchronised BatchNorm on CPU: 2 ranks x 4 samples equal BatchNorm over all 8."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from qtemperate.training.sync_batchnorm import (
    GroupBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from tests.dist_helpers import run_group


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=g) * 3 + 1, torch.randn(8, 3, 5, 5, generator=g)


def _bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _two_ranks(rank: int, world: int) -> dict[str, Any]:
    x, w = _inputs()
    part = slice(rank * 4, rank * 4 + 4)
    bn = convert_sync_batchnorm(_bn(), torch.device("cpu")).train()
    xs = x[part].clone().requires_grad_()
    out = bn(xs)
    (out * w[part]).sum().backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    torch.distributed.all_reduce(grads)  # what DDP does with parameter gradients (sum here)
    return {"out": out.tolist(), "x_grad": xs.grad.tolist(), "param_grad": grads.tolist(),
            "running": torch.cat([bn.running_mean, bn.running_var]).tolist()}


def test_two_ranks_equal_batchnorm_over_the_global_batch() -> None:
    x, w = _inputs()
    bn = _bn().train()
    xf = x.clone().requires_grad_()
    out = bn(xf)
    (out * w).sum().backward()
    ranks = run_group(_two_ranks, world=2)
    for r, got in enumerate(ranks):
        part = slice(r * 4, r * 4 + 4)
        torch.testing.assert_close(torch.tensor(got["out"]), out[part].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got["x_grad"]), xf.grad[part], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got["param_grad"]), torch.cat([bn.weight.grad, bn.bias.grad]),
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got["running"]), torch.cat([bn.running_mean, bn.running_var]),
                                   atol=1e-6, rtol=1e-5)


def test_without_a_group_it_is_batchnorm() -> None:
    x, _ = _inputs()
    ref, sync = _bn(), convert_sync_batchnorm(_bn(), torch.device("cpu"))
    assert isinstance(sync, GroupBatchNorm)
    for mode in (True, False):
        ref.train(mode)
        sync.train(mode)
        torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)


def test_convert_and_revert_share_parameters_and_restore_classes() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], GroupBatchNorm) and isinstance(model[2][1], GroupBatchNorm)
    assert {id(p) for p in model.parameters()} == params and set(model.state_dict()) == keys
    revert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][1]) is nn.BatchNorm1d
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA gets torch.nn.SyncBatchNorm")
def test_cuda_gets_torch_sync_batchnorm() -> None:
    bn = convert_sync_batchnorm(nn.BatchNorm2d(3), torch.device("cuda"))
    assert isinstance(bn, nn.SyncBatchNorm)
    assert type(revert_sync_batchnorm(bn)) is nn.BatchNorm2d
