"""The bit width of one Brevitas quantizer: read, rebuilt at a new width, learned state kept."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from brevitas.inject.enum import BitWidthImplType
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

from qtemperate.quantization.proxies import BitWidthError, proxy_bits, set_proxy_bits
from qtemperate.quantization.quantizers import Uint8ActPerTensorFloatStatefulBitWidth


def _scaling(act: qnn.QuantNonLinearActLayer):  # type: ignore[no-untyped-def]
    return act.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl


def test_stock_activation_is_rebuilt_mid_statistics_without_losing_them() -> None:
    relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat)
    relu.train()
    for _ in range(5):  # 5 of the 300 statistics steps
        relu(torch.randn(64, 8) * 2)
    scaling = _scaling(relu)
    counter, buffer = scaling.counter, scaling.buffer.clone()
    relu.eval()
    s8 = relu.act_quant.scale()
    set_proxy_bits(relu.act_quant, 3, "relu.act_quant")
    assert proxy_bits(relu.act_quant) == 3
    assert _scaling(relu) is scaling and scaling.counter == counter  # the same statistics object
    assert torch.equal(scaling.buffer, buffer)
    assert relu.act_quant.scale() == pytest.approx(float(s8) * 255 / 7, rel=1e-6)  # t/(2^b - 1)
    relu.train()
    relu(torch.randn(64, 8))
    assert scaling.counter == counter + 1  # statistics collection goes on


def test_stock_per_channel_weight_scale_is_re_derived() -> None:
    conv = qnn.QuantConv2d(2, 4, 3, weight_quant=Int8WeightPerChannelFloat)
    s8 = conv.quant_weight().scale.detach().clone()
    set_proxy_bits(conv.weight_quant, 5, "conv.weight_quant")
    q = conv.quant_weight()
    assert int(q.bit_width) == 5 and q.scale.shape == s8.shape
    assert torch.allclose(q.scale, s8 * 127 / 15)  # narrow signed: max|W| / (2^(b-1) - 1)
    assert torch.unique(q.int()).numel() <= 31


def test_stateful_presets_write_their_buffer() -> None:
    relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloatStatefulBitWidth, bit_width=8)
    quant = relu.act_quant.fused_activation_quant_proxy.tensor_quant
    set_proxy_bits(relu.act_quant, 4, "relu.act_quant")
    assert relu.act_quant.fused_activation_quant_proxy.tensor_quant is quant
    assert (
        proxy_bits(relu.act_quant) == 4
        and "act_quant.fused_activation_quant_proxy.tensor_quant.msb_clamp_bit_width_impl.bit_width"
        in relu.state_dict()
    )


def test_a_learned_bit_width_is_refused_by_name() -> None:
    ident = qnn.QuantIdentity(
        act_quant=Int8ActPerTensorFloat, bit_width_impl_type=BitWidthImplType.PARAMETER
    )
    assert proxy_bits(ident.act_quant) == 8
    with pytest.raises(BitWidthError, match=r"ident\.act_quant: the bit width is learned"):
        set_proxy_bits(ident.act_quant, 4, "ident.act_quant")
    assert proxy_bits(ident.act_quant) == 8


def test_a_disabled_quantizer_has_no_bit_width() -> None:
    assert proxy_bits(qnn.QuantConv2d(1, 1, 1).input_quant) is None
