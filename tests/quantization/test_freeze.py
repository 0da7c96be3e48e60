"""Freezing learned activation ranges: same forward, same weight gradients, no range update."""

from __future__ import annotations

import copy
import warnings

import brevitas.nn as qnn
import pytest
import torch
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
from torch import nn

from qtemperate import build_model, quantize, set_bit_width
from qtemperate.quantization import activation_ranges_frozen, freeze_activation_ranges


def _qmodel(bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    fm = build_model("resnet20", num_classes=10, in_channels=1, width=8)
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    q = quantize(fm, 8, 8, calibration_loader=calib, calibration_batches=2)
    return set_bit_width(q, bits, bits).train()


def _thresholds(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ActQuantProxyFromInjector):
            for pname, p in m.named_parameters():
                out[f"{name}.{pname}"] = p
    return out


def _step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_freeze_keeps_the_forward_and_the_weight_gradients_and_drops_the_range_gradients() -> None:
    model = _qmodel()
    ranges = _thresholds(model)
    assert len(ranges) > 5 and activation_ranges_frozen(model) is False
    frozen = copy.deepcopy(model)
    assert freeze_activation_ranges(frozen) == len(ranges)
    assert activation_ranges_frozen(frozen) is True
    assert freeze_activation_ranges(frozen) == 0  # already frozen: nothing changes
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(model(x), frozen(x))
    a, b = _step_grads(model, x, y), _step_grads(frozen, x, y)
    range_names = {n for n, _ in frozen.named_parameters() if any(n == r for r in ranges)}
    assert range_names == set(ranges)
    for name in a:
        if name in range_names:
            assert a[name] is not None and b[name] is None, name
        else:  # dL/dW does not depend on whether the scales get a gradient: bit-identical
            assert a[name] is not None and torch.equal(a[name], b[name]), name


def test_an_optimizer_step_leaves_frozen_ranges_untouched_and_thawing_trains_them_again() -> None:
    model = _qmodel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(2):  # momentum buffers for the ranges exist before the freeze
        _step_grads(model, x, y)
        opt.step()
    before = {n: p.detach().clone() for n, p in _thresholds(model).items()}
    freeze_activation_ranges(model)
    for _ in range(2):
        _step_grads(model, x, y)
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in _thresholds(model).items())
    assert freeze_activation_ranges(model, frozen=False) == len(before)
    assert activation_ranges_frozen(model) is False
    _step_grads(model, x, y)
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in _thresholds(model).items())


def test_a_stock_brevitas_model_freezes_its_learned_ranges() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(qnn.QuantIdentity(return_quant_tensor=True), qnn.QuantConv2d(1, 4, 3),
                              qnn.QuantReLU(), nn.Flatten(), nn.LazyLinear(3))
        model(torch.randn(2, 1, 8, 8))
    n = len(_thresholds(model))
    assert n == 2 and freeze_activation_ranges(model) == n and activation_ranges_frozen(model)


def test_a_torch_ao_model_stops_observing_activations_but_not_weights() -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    fm = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_qat_fx(fm, get_default_qat_qconfig_mapping("x86"), (torch.randn(2, 1, 8, 8),))
    model(torch.randn(4, 1, 8, 8))
    fqs = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}
    acts = {n for n in fqs if not n.endswith("weight_fake_quant")}
    assert acts and len(acts) < len(fqs)
    assert freeze_activation_ranges(model) == len(acts) and activation_ranges_frozen(model)
    scales = {n: fqs[n].scale.clone() for n in acts}
    model(10 * torch.randn(4, 1, 8, 8))  # a wider range: observed only while not frozen
    assert all(torch.equal(scales[n], fqs[n].scale) for n in acts)
    assert all(bool(m.observer_enabled[0]) for n, m in fqs.items() if n not in acts)
    assert freeze_activation_ranges(model, frozen=False) == len(acts) and not activation_ranges_frozen(model)


def test_a_float_model_has_nothing_to_freeze() -> None:
    model = build_model("small_cnn", num_classes=10)
    assert activation_ranges_frozen(model) is None
    with pytest.raises(ValueError, match="SmallCNN has no learned activation ranges"):
        freeze_activation_ranges(model)
