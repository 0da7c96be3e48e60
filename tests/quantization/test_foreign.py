"""A user's own Brevitas model (stock layers and presets): a first-class citizen.

The model of the issue: stock ``brevitas.nn`` layers with ``Int8WeightPerTensorFloat``,
a per-channel layer, ``Int8ActPerTensorFloat`` / ``Uint8ActPerTensorFloat`` and one
4-bit layer. ``get_bit_widths``, ``set_bit_width``, ``model_size``, the report and
export must all see and change its real quantizers.
"""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
import torch.nn.functional as F
from brevitas.inject.enum import BitWidthImplType
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
    SignedBinaryWeightPerTensorConst,
    Uint8ActPerTensorFloat,
)
from torch import nn

from qtemperate.export import export_onnx, verify_onnx
from qtemperate.quantization import (
    BitWidthError,
    get_bit_widths,
    get_quant_config,
    quantization_report,
    quantize,
    set_bit_width,
)
from qtemperate.size import model_size
from tests.numerics import assert_runtime_exact
from tests.onnx_helpers import check_agreement_warning
from tests.quantization.checks import independent_bytes

torch.set_num_threads(1)


class UserNet(nn.Module):
    """What a Brevitas user writes: stock layers, stock presets, one layer at 4 bits."""

    def __init__(self, requant_pool: bool = False, int_bias: bool = False) -> None:
        super().__init__()
        b = {"bias_quant": Int32Bias} if int_bias else {}
        self.quant_inp = qnn.QuantIdentity(
            act_quant=Int8ActPerTensorFloat, return_quant_tensor=True
        )
        self.conv1 = qnn.QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFloat, **b)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(
            8, 16, 3, padding=1, weight_quant=Int8WeightPerChannelFloat, **b
        )
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.conv3 = qnn.QuantConv2d(
            16, 16, 3, padding=1, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, **b
        )
        self.relu3 = qnn.QuantReLU(
            act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.requant = (
            qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
            if requant_pool
            else nn.Identity()
        )
        self.fc = qnn.QuantLinear(16, 10, bias=True, weight_quant=Int8WeightPerTensorFloat, **b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.quant_inp(x)))
        x = self.relu3(self.conv3(self.relu2(self.conv2(x))))
        return self.fc(torch.flatten(self.requant(self.pool(x)), 1))


def _trained(
    digits, requant_pool: bool = False, int_bias: bool = False, steps: int = 40
) -> UserNet:  # type: ignore[no-untyped-def]
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    m = UserNet(requant_pool, int_bias)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _threshold(layer: nn.Module) -> torch.Tensor:
    return layer.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value.detach().clone()


def test_bit_widths_are_read_from_stock_quantizers(digits) -> None:  # type: ignore[no-untyped-def]
    m = _trained(digits)
    bits = get_bit_widths(m)
    assert (
        bits["conv1"]["weight"] == 8
        and bits["conv2"]["weight"] == 8
        and bits["conv3"]["weight"] == 4
    )
    assert bits["quant_inp"]["act"] == 8 and bits["relu1"]["act"] == 8 and bits["relu3"]["act"] == 4
    assert get_quant_config(m).weight_bits == 4 and get_quant_config(m).per_channel is False


def test_set_bit_width_switches_stock_quantizers_keeping_learned_thresholds(digits) -> None:  # type: ignore[no-untyped-def]
    m = _trained(digits)
    x = digits[2][:64]
    keys = set(m.state_dict())
    t_relu2 = _threshold(m.relu2)
    s8 = m.relu2.act_quant.scale()
    with torch.no_grad():
        y8 = m(x)
    set_bit_width(m, 4, 4)
    bits = get_bit_widths(m)
    # inner weights and activations switch; first/last weights and the input quantizer keep theirs
    assert bits["conv2"]["weight"] == 4 and bits["conv3"]["weight"] == 4
    assert bits["conv1"]["weight"] == 8 and bits["fc"]["weight"] == 8
    assert bits["relu1"]["act"] == 4 and bits["relu2"]["act"] == 4 and bits["quant_inp"]["act"] == 8
    # the learned threshold is kept; the unsigned scale is re-derived: t/(2^4-1) vs t/(2^8-1)
    assert torch.equal(_threshold(m.relu2), t_relu2)
    assert m.relu2.act_quant.scale() == pytest.approx(float(s8) * 255 / 15, rel=1e-6)
    assert set(m.state_dict()) == keys  # no new state: the user's checkpoints still load
    with torch.no_grad():
        y4 = m(x)
        levels = m.relu1(m.conv1(m.quant_inp(x))).value / m.relu1.act_quant.scale()
    assert not torch.allclose(y8, y4)  # not a no-op
    assert torch.unique(torch.round(levels)).numel() <= 16
    # the model keeps training at the new widths
    m.train()
    loss = F.cross_entropy(m(x), digits[3][:64])
    loss.backward()
    assert m.conv2.weight.grad is not None and torch.isfinite(loss)


def test_model_size_counts_the_real_bit_widths(digits) -> None:  # type: ignore[no-untyped-def]
    m = _trained(digits)
    size = model_size(m)
    assert size.bits == {"conv1": 8, "conv2": 8, "conv3": 4, "fc": 8}
    expected, params, _ = independent_bytes(m)
    assert size.quantized_bytes == pytest.approx(expected, rel=1e-9) and size.params == params
    assert size.compression_ratio < 0.3  # was 1.0008: every layer counted at 32 bits
    set_bit_width(m, 4, 4)
    assert model_size(m).quantized_bytes == pytest.approx(independent_bytes(m)[0], rel=1e-9)


def test_report_tells_which_operations_are_quantized(digits) -> None:  # type: ignore[no-untyped-def]
    report = quantization_report(_trained(digits))
    rows = {r.name: r for r in report.rows}
    assert rows["conv3"].weight_bits == 4 and rows["conv3"].status == "quantized"
    # the average pool's output is never requantized: the classifier reads float activations
    assert {r.name for r in report.float_ops} == {"pool", "fc"}
    assert "input activations not quantized" in rows["fc"].reason
    # float biases are rounded by the integer kernels of the export, not by PyTorch: said so
    assert "float bias" in rows["conv2"].reason
    fixed = quantization_report(_trained(digits, requant_pool=True, int_bias=True))
    assert fixed.fully_quantized and not any(r.reason.startswith("float bias") for r in fixed.rows)


@pytest.mark.numerics
def test_exported_onnx_agrees_at_4_bits(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = _trained(digits, requant_pool=True, int_bias=True)
    set_bit_width(m, 4, 4)
    x = digits[2][:256]
    path = export_onnx(m, tmp_path / "user.onnx", x[:1])
    rep = verify_onnx(path, m, x)
    # onnxruntime rounds differently from PyTorch: within tol = 2 γ_L max|logit|
    # (tests.numerics), where a near-tie of the logits may flip (set aside and counted)
    assert_runtime_exact(path, m, x, rep)  # float rounding only: no quantization level flipped
    assert rep.warning is None
    check_agreement_warning(path, m, digits[2], tmp_path)  # 98.83 % warns, 99.22 % does not


def test_quantize_points_at_a_working_set_bit_width() -> None:
    with pytest.raises(ValueError, match=r"set_bit_width.*rebuilds any Brevitas quantizer"):
        quantize(UserNet())


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = qnn.QuantConv2d(1, 4, 3, weight_quant=Int8WeightPerTensorFloat)
        self.learned = qnn.QuantConv2d(
            4,
            4,
            3,
            weight_quant=Int8WeightPerTensorFloat,
            weight_bit_width_impl_type=BitWidthImplType.PARAMETER,
        )
        self.binary = qnn.QuantConv2d(4, 4, 1, weight_quant=SignedBinaryWeightPerTensorConst)
        self.mid = qnn.QuantConv2d(4, 4, 1, weight_quant=Int8WeightPerTensorFloat)
        self.b = qnn.QuantConv2d(4, 2, 1, weight_quant=Int8WeightPerTensorFloat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mid(self.binary(self.learned(self.a(x)))))


def test_quantizers_that_cannot_switch_are_named_and_nothing_changes() -> None:
    m = _Odd()
    with pytest.raises(BitWidthError) as err:
        set_bit_width(m, 4, 4)
    assert "learned.weight_quant" in str(err.value) and "learned" in str(err.value)
    assert "binary.weight_quant" in str(err.value) and "BinaryQuant" in str(err.value)
    assert get_bit_widths(m)["mid"]["weight"] == 8  # all or nothing: mid was not switched
