"""QONNX export: the deployment path of sub-8-bit Brevitas models (FINN / FPGA flows).

onnxruntime has no int4 convolution kernels, so a W4A4 ``student.onnx`` (QCDQ) is a size
artifact on a CPU. Brevitas users who deploy 4 bits take QONNX instead: the graph keeps
each quantizer as a ``Quant`` node (scale, zero point, bit width), which FINN compiles
to integer hardware. :func:`export_qonnx` writes it with Brevitas' own exporter and
:func:`verify_qonnx` runs it with QONNX's executor (``qonnx.core.onnx_exec``) against
PyTorch.

The file is written with a static batch of 1 (what FINN expects); verification sets the
batch of a copy to the batch being compared. The QAT layers round their float bias to
the int32 grid ``s_x * s_w`` in PyTorch (:func:`qtemperate.quantization.quantize_bias`),
so the export writes those rounded biases, and the QONNX graph computes what PyTorch does.

Both need the ``qonnx`` extra (``pip install 'qtemperate[qonnx]'``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtemperate.export.onnx import INPUT_NAME, output_names
from qtemperate.export.runtime import OutputAgreement, _as_batches, compare_with_pytorch

__all__ = ["QONNX_EXTRA", "export_qonnx", "qonnx_available", "verify_qonnx"]

QONNX_EXTRA = "pip install 'qtemperate[qonnx]'"


def qonnx_available() -> bool:
    """Whether the ``qonnx`` package can be imported."""
    try:
        import qonnx  # noqa: F401
    except ImportError:
        return False
    return True


def _require_qonnx() -> None:
    if not qonnx_available():
        raise ImportError(f"QONNX export needs the qonnx package: {QONNX_EXTRA}")


@contextlib.contextmanager
def _int_grid_biases(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Temporarily replace each QAT layer's float bias by the int32-grid bias its forward uses."""
    from qtemperate.quantization.layers import (
        _LAST_SCALE_ATTR,
        _SCALE_SOURCE_ATTR,
        _IntBiasMixin,
        quantize_bias,
    )

    layers = [m for m in model.modules() if isinstance(m, _IntBiasMixin) and m.bias is not None]
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(id(mod), args[0]))
        for m in layers
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    with torch.no_grad():
        for m in layers:
            inp = getattr(m, "input_quant", None)
            if inp is not None and inp.is_quant_enabled and id(m) in seen:
                s_x = inp(seen[id(m)]).scale
            else:
                src = m.__dict__.get(_SCALE_SOURCE_ATTR)
                s_x = None if src is None else src.__dict__.get(_LAST_SCALE_ATTR)
            if s_x is None or s_x.numel() != 1:
                continue
            saved.append((m, m.bias.data.clone()))
            m.bias.data.copy_(quantize_bias(m.bias, s_x, m.quant_weight().scale))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, b in saved:
                m.bias.data.copy_(b)


def export_qonnx(qmodel: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``qmodel`` as QONNX (``Quant`` nodes; static batch 1) with Brevitas' exporter.

    Args:
        qmodel: A Brevitas-quantized model (from :func:`qtemperate.quantization.quantize`).
        path: Output file (``*.qonnx.onnx`` by convention).
        example_input: An example batch (only its first sample is used).

    Raises:
        ImportError: naming the ``qonnx`` extra when it is not installed.
    """
    _require_qonnx()
    from brevitas.export import export_qonnx as brevitas_export_qonnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(qmodel.parameters()).device
    x = example_input[:1].to(device)
    names = output_names(qmodel, x)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with _int_grid_biases(qmodel, x), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            brevitas_export_qonnx(qmodel, x, export_path=str(path), input_names=[INPUT_NAME],
                                  output_names=names, dynamo=False)
    finally:
        qmodel.train(was_training)
    return path


def _qonnx_runner(path: str | Path) -> Any:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    base = cleanup_model(ModelWrapper(str(path)))
    per_batch: dict[int, Any] = {}

    def run(x: np.ndarray) -> list[np.ndarray]:
        n = int(x.shape[0])
        if n not in per_batch:  # the file has batch 1: a copy at this batch
            w = ModelWrapper(base.model.__deepcopy__())
            for vi in (*w.graph.input, *w.graph.output):
                w.set_tensor_shape(vi.name, [n, *w.get_tensor_shape(vi.name)[1:]])
            del w.graph.value_info[:]
            per_batch[n] = w.transform(InferShapes())
        w = per_batch[n]
        out = execute_onnx(w, {w.graph.input[0].name: x})
        return [out[o.name] for o in w.graph.output]

    return run


def verify_qonnx(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor,
    classification_outputs: Sequence[str] | None = None,
) -> dict[str, OutputAgreement]:
    """Run the QONNX file with QONNX's executor and ``model`` in PyTorch; compare per output.

    Returns:
        ``{output name: OutputAgreement}``.

    Raises:
        ImportError: naming the ``qonnx`` extra when it is not installed.
    """
    _require_qonnx()
    _as_batches(inputs)  # same input checks as the other runtimes
    return compare_with_pytorch(model, inputs, {"qonnx": _qonnx_runner(path)},
                                classification_outputs)["qonnx"]
