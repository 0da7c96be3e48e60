"""ONNX export of float and Brevitas-quantized models with a dynamic batch axis.

A quantized model is exported in the standard QCDQ form
(``QuantizeLinear -> [Clip] -> DequantizeLinear``; Brevitas legacy TorchScript exporter)
and then rewritten by :mod:`qtemperate.export.qcdq` so onnxruntime runs integer kernels
and the file holds integers; a float model goes through plain ``torch.onnx.export``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qtemperate.export.qcdq import INT4_OPSET, postprocess_qcdq
from qtemperate.quantization import is_quantized
from qtemperate.quantization.torch_ao import check_ao_exportable

__all__ = ["INPUT_NAME", "INT4_OPSET", "OUTPUT_NAME", "export_onnx", "model_device"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives; CPU for a model without parameters (a converted torch.ao model)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int | None = None,
) -> Path:
    """Export a quantized (QCDQ) or float model to ONNX with a dynamic batch axis.

    Args:
        qmodel: model from :func:`qtemperate.quantization.quantize`, or any float model.
        path: output ``.onnx`` file (parent directories are created).
        example_input: example batch (its batch size is irrelevant: the axis is dynamic).
        opset: ONNX opset for the TorchScript exporter (<= 20). Defaults to 17 for float and
            >4-bit models; models with <=4-bit weights are exported at 20 and converted to
            opset 21 for packed ``INT4`` weights.

    Returns:
        The path written.

    Raises:
        ValueError: if ``opset`` is outside 13..21 or ``example_input`` is not a tensor.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(
            f"example_input must be a torch.Tensor, got {type(example_input).__name__}"
        )
    if opset is not None and not 13 <= opset <= INT4_OPSET:
        raise ValueError(f"opset must be in 13..{INT4_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_opset = 17 if opset is None else min(opset, 20)
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        "opset_version": export_opset,
        "dynamo": False,
    }
    check_ao_exportable(qmodel)  # a torch.ao QAT-prepared model: says to convert it first
    x = example_input.to(model_device(qmodel))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_quantized(qmodel):
                from brevitas.export import export_onnx_qcdq

                export_onnx_qcdq(qmodel, x, export_path=str(path), **kwargs)
            else:
                with torch.no_grad():
                    torch.onnx.export(qmodel, (x,), str(path), **kwargs)
    finally:
        qmodel.train(was_training)
    if is_quantized(qmodel):
        model = onnx.load(str(path))
        model = postprocess_qcdq(model, allow_int4=opset is None or opset >= INT4_OPSET)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return path

