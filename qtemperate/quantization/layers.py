"""Quantized layers: int32-grid biases, shared-quantizer residual adds, requantizing pools.

Residual additions are recognised from the graph: a parameter-free module with no
children whose traced forward is exactly one addition of its two inputs
(``forward(a, b) = a + b``, as ``qtemperate.models.ResidualAdd``) is a residual add,
and so is any instance of :class:`ResidualAddMarker`.
"""

from __future__ import annotations

from typing import Any

import brevitas.nn as qnn
import torch
from brevitas.nn.mixin.base import QuantLayerMixin
from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer
from brevitas.quant_tensor import QuantTensor
from torch import nn

from qtemperate.fx_graph import forward_is_add
from qtemperate.quantization.config import _check_bits
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)

__all__ = [
    "QuantAvgPoolRequant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantResidualAdd",
    "ResidualAddMarker",
    "is_quantized",
    "quantize_bias",
]


class ResidualAddMarker:
    """Mixin marking a module whose ``forward(a, b)`` returns ``a + b`` as a residual add.

    Not needed for a parameter-free module whose forward is exactly ``a + b``: such a
    module is recognised from its traced graph (:func:`_is_residual_add`).
    """


_RESIDUAL_ADD_CACHE: dict[type, bool] = {}


def _is_residual_add(module: nn.Module) -> bool:
    """A :class:`ResidualAddMarker`, or a leaf module without parameters computing ``a + b``.

    The graph test runs once per class (cached).
    """
    if isinstance(module, ResidualAddMarker):
        return True
    if isinstance(module, (*_QUANT_WBIOL, *_ACT_MODULES)) or next(module.children(), None) is not None:
        return False
    if next(module.parameters(recurse=False), None) is not None:
        return False
    cls = type(module)
    if cls not in _RESIDUAL_ADD_CACHE:
        _RESIDUAL_ADD_CACHE[cls] = forward_is_add(module)
    return _RESIDUAL_ADD_CACHE[cls]


class QuantResidualAdd(nn.Module):
    """Residual addition ``q(a) + q(b)`` with ONE shared signed activation quantizer ``q``.

    An input that is already a quantizer output (the identity shortcut: the previous
    block's ReLU) is added as it is (``quantize_inputs`` False for it): it is on its own
    integer grid, and requantizing it to ``q``'s scale would lose precision and leave a
    ``DequantizeLinear -> QuantizeLinear`` pair that onnxruntime cannot fuse. Inputs that
    are quantized share ``q``'s scale. The sum exports as ``DQ(a) + DQ(b)``, which
    onnxruntime fuses to ``QLinearAdd`` (one scale per input).

    Args:
        act_bits: bit width of the shared quantizer.
        quantize_inputs: for ``(a, b)``, whether ``q`` quantizes it.
    """

    def __init__(self, act_bits: int = 8, quantize_inputs: tuple[bool, bool] = (True, True)) -> None:
        super().__init__()
        _check_bits("act_bits", act_bits)
        self.quantize_inputs = (bool(quantize_inputs[0]), bool(quantize_inputs[1]))
        self.input_quant = qnn.QuantIdentity(
            act_quant=Int8ActPerTensorFloatStatefulBitWidth,
            bit_width=act_bits,
            return_quant_tensor=False,
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa, qb = self.quantize_inputs
        return (self.input_quant(a) if qa else a) + (self.input_quant(b) if qb else b)

    def extra_repr(self) -> str:
        return f"quantize_inputs={self.quantize_inputs}"


class QuantAvgPoolRequant(nn.Module):
    """An average pool followed by a requantizing ``QuantIdentity``.

    The mean of ``k`` integers at scale ``s`` is not on the grid of ``s``; requantizing
    (``y = s_y * round(mean / s_y)``) puts the classifier input back on an integer grid so
    the following linear layer exports as an integer kernel.

    Args:
        pool: the float pooling module (kept as is).
        act_bits: bit width of the requantizer.
        signed: signed requantizer; use False when the pool input is a ReLU output.
    """

    def __init__(self, pool: nn.Module, act_bits: int = 8, signed: bool = True) -> None:
        super().__init__()
        _check_bits("act_bits", act_bits)
        self.pool = pool
        quant = (
            Int8ActPerTensorFloatStatefulBitWidth
            if signed
            else Uint8ActPerTensorFloatStatefulBitWidth
        )
        self.requant = qnn.QuantIdentity(
            act_quant=quant, bit_width=act_bits, return_quant_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.requant(self.pool(x))


_SCALE_SOURCE_ATTR = "_qtemperate_input_scale_source"
_LAST_SCALE_ATTR = "_qtemperate_last_scale"


def _record_output_scale(module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook on an activation quantizer proxy: remember the scale it just used."""
    scale = output.scale if isinstance(output, QuantTensor) else None
    module.__dict__[_LAST_SCALE_ATTR] = None if scale is None else scale.detach()


def _is_exporting(layer: nn.Module) -> bool:
    proxy = getattr(layer, "weight_quant", None)
    return bool(getattr(proxy, "export_mode", False)) or torch.onnx.is_in_onnx_export()


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor):
    """Round ``bias`` to the int32 grid ``s_b = s_x * s_w`` with a straight-through estimator.

    Bit-identical to the export's integer bias: ``s_b`` is the float32 product of the two
    scales and ``round(b / s_b)`` is computed in float64 (round half to even), as in
    :func:`qtemperate.export.qcdq`. Scales are treated as constants (detached);
    the gradient with respect to ``bias`` is the identity.
    """
    s_b = input_scale.detach().reshape(()).to(bias.dtype) * weight_scale.detach().reshape(-1).to(
        bias.dtype
    )
    s_b = s_b.expand(bias.shape) if s_b.numel() == 1 else s_b.reshape(bias.shape)
    q = torch.round(bias.detach().double() / s_b.double()).clamp_(-(2**31), 2**31 - 1)
    b_q = q.to(bias.dtype) * s_b
    return bias + (b_q - bias).detach()


def _exports_int_bias(layer: nn.Module, x: Any) -> bool:
    """Whether the export gives this call an int32 bias (Conv, or Gemm for a 2-D linear input).

    A linear layer on a 3-D or larger input (tokens) exports as ``MatMul`` + ``Add``,
    whose bias the export keeps in float: PyTorch keeps it in float there too.
    """
    if not isinstance(layer, nn.Linear):
        return True
    value = x.value if isinstance(x, QuantTensor) else x
    return value.dim() == 2


class _IntBiasMixin:
    """Quantized conv/linear whose forward rounds the float bias to ``s_x * s_w`` (see module doc).

    Linear layers on inputs of more than two dimensions keep the float bias (their export
    is ``MatMul`` + ``Add``, see :func:`_exports_int_bias`).
    """

    def inner_forward_impl(self, x, quant_weight, quant_bias):  # type: ignore[no-untyped-def]
        if quant_bias is not None and not _is_exporting(self) and _exports_int_bias(self, x):  # type: ignore[arg-type]
            if isinstance(x, QuantTensor):
                s_x = x.scale
            else:
                src = self.__dict__.get(_SCALE_SOURCE_ATTR)
                s_x = None if src is None else src.__dict__.get(_LAST_SCALE_ATTR)
            s_w = quant_weight.scale if isinstance(quant_weight, QuantTensor) else None
            if s_x is not None and s_w is not None and s_x.numel() == 1:
                quant_bias = quantize_bias(quant_bias, s_x, s_w)
        return super().inner_forward_impl(x, quant_weight, quant_bias)  # type: ignore[misc]


class QuantConv1d(_IntBiasMixin, qnn.QuantConv1d):
    """``brevitas.nn.QuantConv1d`` whose bias is rounded to the int32 grid of the export."""


class QuantConv2d(_IntBiasMixin, qnn.QuantConv2d):
    """``brevitas.nn.QuantConv2d`` whose bias is rounded to the int32 grid of the export."""


class QuantLinear(_IntBiasMixin, qnn.QuantLinear):
    """``brevitas.nn.QuantLinear`` whose bias is rounded to the int32 grid of the export."""


# Every Brevitas weight layer (conv 1-3d, transposed conv, linear) and every Brevitas
# activation layer (ReLU, Identity, Sigmoid, Tanh, HardTanh, HardSwish), stock or ours.
_QUANT_WBIOL = (QuantWeightBiasInputOutputLayer,)
_ACT_MODULES = (QuantNonLinearActLayer,)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` contains at least one Brevitas quantized layer."""
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())

