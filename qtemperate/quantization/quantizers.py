"""Brevitas quantizer presets whose bit width is a buffer (travels with ``state_dict``).

Each preset computes its fake-quantization with :class:`~qtemperate.quantization.fast.FastRescalingIntQuant`
(one fused autograd function, Brevitas's numbers; activation presets fuse a preceding ReLU
through :func:`~qtemperate.quantization.fast.fast_act_quant_proxy`).
"""

from __future__ import annotations

from brevitas.inject.enum import BitWidthImplType
from brevitas.quant.scaled_int import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)

from qtemperate.quantization.fast import FastRescalingIntQuant, fast_act_quant_proxy

__all__ = [
    "Int8ActPerTensorFloatStatefulBitWidth",
    "Int8WeightPerChannelFloatStatefulBitWidth",
    "Int8WeightPerTensorFloatStatefulBitWidth",
    "Uint8ActPerTensorFloatStatefulBitWidth",
]


class Int8WeightPerChannelFloatStatefulBitWidth(Int8WeightPerChannelFloat):
    """Signed narrow-range per-output-channel weight quantizer whose bit width is a buffer.

    Defaults to 8 bits; pass ``weight_bit_width=b`` to the layer for ``b`` bits.
    """

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST
    tensor_quant = FastRescalingIntQuant


class Int8WeightPerTensorFloatStatefulBitWidth(Int8WeightPerTensorFloat):
    """Signed narrow-range per-tensor weight quantizer whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST
    tensor_quant = FastRescalingIntQuant


class Int8ActPerTensorFloatStatefulBitWidth(Int8ActPerTensorFloat):
    """Signed per-tensor activation quantizer (learned threshold) whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST
    tensor_quant = FastRescalingIntQuant
    proxy_class = fast_act_quant_proxy


class Uint8ActPerTensorFloatStatefulBitWidth(Uint8ActPerTensorFloat):
    """Unsigned per-tensor activation quantizer (learned threshold) whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST
    tensor_quant = FastRescalingIntQuant
    proxy_class = fast_act_quant_proxy

