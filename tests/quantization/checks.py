"""Independent computations the quantization tests compare qtemperate's figures with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from onnx import TensorProto, numpy_helper
from torch import nn

_QUANTIZER_PARTS = {"weight_quant", "bias_quant", "input_quant", "output_quant", "act_quant"}


def independent_bytes(model: nn.Module) -> tuple[float, int, int]:
    """``(bytes, params, quantized weight elements)`` from the quantized tensors themselves.

    Weights of Brevitas layers count at the bit width of the tensor their quantizer
    returns (``quant_weight().bit_width``) plus one float32 per element of its scale;
    a quantized bias at its quantizer's bit width; learned quantizer thresholds at 4
    bytes (not params); every other parameter at 4 bytes.
    """
    total, params, qweights = 0.0, 0, 0
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if _QUANTIZER_PARTS & set(name.split(".")):
            total += 4 * sum(p.numel() for p in own.values())
            continue
        params += sum(p.numel() for p in own.values())
        quantized = (
            isinstance(m, QuantWeightBiasInputOutputLayer) and m.weight_quant.is_quant_enabled
        )
        for pname, p in own.items():
            if pname == "weight" and quantized:
                with torch.no_grad():
                    qw = m.quant_weight()
                total += p.numel() * float(qw.bit_width) / 8 + 4 * qw.scale.numel()
                qweights += p.numel()
            elif pname == "bias" and quantized and m.bias_quant.is_quant_enabled:
                total += p.numel() * 32 / 8  # Int32Bias (the only bias quantizer used here)
            else:
                total += 4 * p.numel()
    return total, params, qweights


def onnx_integer_weights(path: str | Path) -> int:
    """Elements of the INT4/INT8 weight initializers a ``DequantizeLinear`` reads in the file."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        init = inits[node.input[0]]
        if init.data_type in (TensorProto.INT4, TensorProto.INT8, TensorProto.UINT8):
            total += int(np.prod(init.dims))
    return total


def onnx_int4_weights(path: str | Path) -> int:
    """Elements of packed INT4 weight initializers in the file."""
    model = onnx.load(str(path))
    return sum(
        int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == TensorProto.INT4
    )


def float_initializers(path: str | Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        i.name: numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == TensorProto.FLOAT
    }
