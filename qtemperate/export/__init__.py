"""Export: ONNX files of float and quantized models, checked and timed in onnxruntime.

* :mod:`qtemperate.export.onnx` — :func:`export_onnx` (QCDQ for quantized models).
* :mod:`qtemperate.export.qcdq` — the graph rewrites that make onnxruntime run integer
  kernels (folded weight clips, packed INT4, int32 biases, short names).
* :mod:`qtemperate.export.runtime` — :func:`verify_onnx`, :func:`benchmark_onnx`,
  :func:`optimized_op_types` in onnxruntime.
* :mod:`qtemperate.export.check` — :func:`export_and_check`, the export-verify-time step
  shared by ``qtemperate run`` and ``qtemperate export``.
"""

from __future__ import annotations

from qtemperate.export.check import export_and_check as export_and_check
from qtemperate.export.onnx import INPUT_NAME as INPUT_NAME
from qtemperate.export.onnx import OUTPUT_NAME as OUTPUT_NAME
from qtemperate.export.onnx import export_onnx as export_onnx
from qtemperate.export.qcdq import INT4_OPSET as INT4_OPSET
from qtemperate.export.runtime import VerifyReport as VerifyReport
from qtemperate.export.runtime import benchmark_onnx as benchmark_onnx
from qtemperate.export.runtime import optimized_op_types as optimized_op_types
from qtemperate.export.runtime import verify_onnx as verify_onnx

__all__ = [
    "INPUT_NAME",
    "INT4_OPSET",
    "OUTPUT_NAME",
    "VerifyReport",
    "benchmark_onnx",
    "export_and_check",
    "export_onnx",
    "optimized_op_types",
    "verify_onnx",
]
