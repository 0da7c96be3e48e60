"""ONNX export of float and Brevitas-quantized models with a dynamic batch axis.

A quantized model is exported in the standard QCDQ form
(``QuantizeLinear -> [Clip] -> DequantizeLinear``; Brevitas legacy TorchScript exporter)
and then rewritten by :mod:`qtemperate.export.qcdq` so onnxruntime runs integer kernels
and the file holds integers; a QAT-prepared torch.ao model is written as the exact QDQ
graph of its fake-quants (:mod:`qtemperate.export.torch_ao`; its 4-bit ranges included,
which torch.ao's ``convert`` drops); a float or converted torch.ao model goes through
plain ``torch.onnx.export``.

The graph is built in memory and written atomically (:mod:`qtemperate.atomic`): a
full disk or a killed export never leaves a truncated ``.onnx`` file behind.
A model may return one tensor (output ``logits``), a dict of tensors (one output per
key, named after it: a detector's ``{"class": ..., "box": ...}``) or a tuple / list of
tensors (``output_0``, ``output_1``, ...; a named tuple's field names).
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qtemperate.atomic import TEMP_SUFFIX, write_bytes_atomic
from qtemperate.errors import DiskFull
from qtemperate.export.qcdq import INT4_OPSET, postprocess_qcdq
from qtemperate.quantization import is_quantized
from qtemperate.quantization.torch_ao import ao_kind, check_ao_exportable, frozen_observers

__all__ = ["INPUT_NAME", "INT4_OPSET", "OUTPUT_NAME", "export_onnx", "flatten_outputs", "model_device", "output_names"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives; CPU for a model without parameters (a converted torch.ao model)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
def flatten_outputs(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a model output: a tensor, a dict of tensors or a tuple/list of tensors.

    The order is the one ``torch.onnx.export`` flattens them in (dict insertion order).

    Raises:
        ValueError: for nested structures, non-tensor values, non-string keys or a name
            equal to the input's.
    """
    if isinstance(out, torch.Tensor):
        return [OUTPUT_NAME], [out]
    if isinstance(out, dict):
        names, values = list(out), list(out.values())
        if not all(isinstance(k, str) and k for k in names):
            raise ValueError(f"model output dict keys must be non-empty strings, got {names!r}")
    elif isinstance(out, tuple | list):
        fields = getattr(out, "_fields", None)
        names = list(fields) if fields else [f"output_{i}" for i in range(len(out))]
        values = list(out)
    else:
        raise ValueError(
            f"model output must be a tensor, a dict or a tuple of tensors, got {type(out).__name__}"
        )
    bad = [n for n, v in zip(names, values) if not isinstance(v, torch.Tensor)]
    if not values or bad:
        raise ValueError(
            f"model outputs must all be tensors (no nesting); not tensors: {bad or 'empty output'}"
        )
    if INPUT_NAME in names:
        raise ValueError(f"a model output may not be named {INPUT_NAME!r} (the input's name)")
    return names, values


def output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The ONNX output names :func:`export_onnx` gives ``model`` (runs it once in eval mode)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), frozen_observers(model):  # a torch.ao fake-quant would observe
            return flatten_outputs(model(example_input.to(device)))[0]
    finally:
        model.train(was_training)


def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int | None = None,
) -> Path:
    """Export a quantized (QCDQ) or float model to ONNX with a dynamic batch axis.

    Args:
        qmodel: model from :func:`qtemperate.quantization.quantize`, a stock Brevitas model,
            a QAT-prepared or converted torch.ao model, or any float model.
        path: output ``.onnx`` file (parent directories are created).
        example_input: example batch (its batch size is irrelevant: the axis is dynamic).
        opset: ONNX opset for the TorchScript exporter (<= 20). Defaults to 17 for float and
            >4-bit models; models with <=4-bit weights are exported at 20 and converted to
            opset 21 for packed ``INT4`` weights.

    Returns:
        The path written; its outputs are named by :func:`output_names`.

    Raises:
        ValueError: if ``opset`` is outside 13..21, ``example_input`` is not a tensor, the
            model's output is not a tensor / dict / tuple of tensors, or for a torch.ao model
            prepared for post-training quantization (observers only: convert it first) or
            holding a fake-quant other than ``FakeQuantize`` and its subclasses.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(
            f"example_input must be a torch.Tensor, got {type(example_input).__name__}"
        )
    if opset is not None and not 13 <= opset <= INT4_OPSET:
        raise ValueError(f"opset must be in 13..{INT4_OPSET}, got {opset}")
    path = Path(path)
    export_opset = 17 if opset is None else min(opset, 20)
    names = output_names(qmodel, example_input)
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": names,
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
        "opset_version": export_opset,
        "dynamo": False,
    }
    check_ao_exportable(qmodel)  # a torch.ao PTQ-prepared model: says to convert it first
    x = example_input.to(model_device(qmodel))
    allow_int4 = opset is None or opset >= INT4_OPSET
    if ao_kind(qmodel) == "prepared":  # torch.ao QAT: the exact QDQ graph of its fake-quants
        from qtemperate.export.torch_ao import export_ao_qdq

        model = export_ao_qdq(qmodel, x, kwargs, allow_int4)
        write_bytes_atomic(path, model.SerializeToString())
        return path
    was_training = qmodel.training
    qmodel.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_quantized(qmodel):
                model = _brevitas_qcdq(qmodel, x, path, kwargs)
            else:
                buf = io.BytesIO()
                with torch.no_grad():
                    torch.onnx.export(qmodel, (x,), buf, **kwargs)
                model = onnx.load_model_from_string(buf.getvalue())
    finally:
        qmodel.train(was_training)
    if is_quantized(qmodel):
        model = postprocess_qcdq(model, allow_int4=allow_int4)
        onnx.checker.check_model(model)
    write_bytes_atomic(path, model.SerializeToString())
    return path



def _brevitas_qcdq(qmodel: nn.Module, x: torch.Tensor, path: Path, kwargs: dict[str, Any]) -> onnx.ModelProto:
    """Brevitas' QCDQ export, read back into memory.

    Brevitas' exporter returns nothing for the standard QCDQ manager, so it writes a
    temporary file beside ``path`` (named like every temporary file, so a killed export
    leaves nothing a later run does not clean up); the caller writes the final file.
    """
    from brevitas.export import export_onnx_qcdq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        export_onnx_qcdq(qmodel, x, export_path=tmp, **kwargs)
        return onnx.load(tmp)
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left on device" in str(exc):
            raise DiskFull(path) from None
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
