"""Tests for qtemperate.size: byte counts against an independent walk, MACs against closed forms."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from qtemperate.quantization import quantize, set_bit_width
from qtemperate.size import SizeReport, count_macs, model_size

torch.set_num_threads(1)


class ResidualAdd(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Net(nn.Module):
    """conv(1->6, 3x3, pad 1) -> bn -> relu -> conv(6->6, 3x3, stride 2, pad 1) -> bn -> add(.., pool) -> relu -> gap -> fc(6->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 6, 1, stride=2, groups=3)  # grouped 1x1 projection with bias
        self.add = ResidualAdd()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.add(self.bn2(self.conv2(x)), self.down(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _macs_closed_form(h: int) -> int:
    h2 = (h + 2 - 3) // 2 + 1
    return (
        6 * h * h * 1 * 9  # conv1
        + 6 * h2 * h2 * 6 * 9  # conv2
        + 6 * h2 * h2 * 2 * 1  # grouped 1x1: 6/3 input channels per group
        + 10 * 6  # fc
    )


def test_float_model_size_is_params_times_four_and_ratio_one() -> None:
    model = Net()
    params = sum(p.numel() for p in model.parameters())
    rep = model_size(model, example_input=torch.randn(3, 1, 8, 8))
    assert isinstance(rep, SizeReport)
    assert rep.params == params
    assert rep.float_bytes == 4 * params
    assert rep.quantized_bytes == 4 * params
    assert rep.compression_ratio == 1.0
    assert rep.macs == _macs_closed_form(8)
    assert rep.bits == {n: 32 for n in ("conv1", "bn1", "conv2", "bn2", "down", "fc")}
    assert model_size(model).macs is None
    d = rep.to_dict()
    assert set(d) == {
        "float_bytes",
        "quantized_bytes",
        "compression_ratio",
        "params",
        "macs",
        "bits",
    }


def _expected_quantized_bytes(q: nn.Module, bits: dict[str, int], per_channel: bool) -> float:
    """Independent walk: weights at their bits, one fp32 scale per out channel, fp32 bias."""
    total = 0.0
    for name, m in q.named_modules():
        if isinstance(m, qnn.QuantConv2d | qnn.QuantLinear):
            out_ch = m.weight.shape[0]
            total += m.weight.numel() * bits[name] / 8
            total += 4 * (out_ch if per_channel else 1)
            total += 4 * m.bias.numel()
        n_act_quant = int(isinstance(m, qnn.QuantReLU | qnn.QuantIdentity)) + int(
            isinstance(m, qnn.QuantConv2d) and m.input_quant.is_quant_enabled
        )
        total += 4 * n_act_quant  # one learned fp32 threshold per activation quantizer
    return total


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_size_matches_independent_walk(per_channel: bool) -> None:
    model = Net().eval()
    q = quantize(model, weight_bits=8, act_bits=8, first_last_bits=8, per_channel=per_channel)
    # after BN folding every conv has a bias; BN parameters are gone
    folded_params = (
        sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bn")) + 6 + 6
    )
    rep = model_size(q, example_input=torch.randn(2, 1, 8, 8))
    assert rep.params == folded_params
    assert rep.float_bytes == 4 * folded_params
    bits8 = {"conv1": 8, "conv2": 8, "down": 8, "fc": 8}
    assert rep.bits == bits8
    assert rep.quantized_bytes == pytest.approx(_expected_quantized_bytes(q, bits8, per_channel))
    assert rep.compression_ratio == pytest.approx(rep.quantized_bytes / rep.float_bytes)
    assert rep.macs == _macs_closed_form(8) == count_macs(model, torch.randn(2, 1, 8, 8))

    set_bit_width(q, weight_bits=3, act_bits=4)
    rep4 = model_size(q)
    bits3 = {"conv1": 8, "conv2": 3, "down": 3, "fc": 8}  # first/last keep first_last_bits
    assert rep4.bits == bits3
    assert rep4.quantized_bytes == pytest.approx(_expected_quantized_bytes(q, bits3, per_channel))
    assert rep4.quantized_bytes < rep.quantized_bytes


def test_compression_ratio_of_a_wide_model_approaches_bits_over_32() -> None:
    model = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    q = quantize(model, weight_bits=4, act_bits=4, first_last_bits=8)
    rep = model_size(q)
    # 256*256 weights at 4 bits in the middle, the rest at 8 bits: close to 8/32..4/32
    weights = {"0": (256 * 256, 8), "2": (256 * 256, 4), "4": (256 * 10, 8)}
    expected = sum(n * b / 8 for n, b in weights.values()) + 4 * (256 + 256 + 10) * 2 + 4 * 3
    assert rep.quantized_bytes == pytest.approx(expected)
    assert 4 / 32 < rep.compression_ratio < 8 / 32 + 0.02
