"""Export: ONNX files of float and quantized models, checked and timed where they will run.

* :mod:`qtemperate.export.targets` — deployment targets (CPU classes), CPU detection and
  the int16 pair-sum saturation rule of x86 CPUs without VNNI (standard library only).
* :mod:`qtemperate.export.onnx` — :func:`export_onnx` (QCDQ for quantized models; dict /
  tuple outputs keep their names).
* :mod:`qtemperate.export.qcdq` — the graph rewrites that make onnxruntime run integer
  kernels (folded weight clips, packed INT4, int32 biases, short names).
* :mod:`qtemperate.export.runtime` — :func:`verify_onnx` (unoptimized and deployed
  sessions, per output; a :class:`DeployedAgreementWarning` below 99 % top-1 agreement),
  :func:`benchmark_onnx`, :func:`optimized_op_types`.
* :mod:`qtemperate.export.torch_ao` — QAT-prepared torch.ao models as the exact QDQ graph
  of their fake-quants (any bit width down to 2).
* :mod:`qtemperate.export.openvino` — the same checks in OpenVINO (``openvino`` extra).
* :mod:`qtemperate.export.qonnx` — QONNX export for FINN / FPGA flows, checked with
  QONNX's executor (``qonnx`` extra).
* :mod:`qtemperate.export.size` — where the bytes of an ONNX file go.
* :mod:`qtemperate.export.speed` — the deployed student's latency and speed-up over the
  float teacher per runtime and batch: the flat keys comparisons read (standard library only).
* :mod:`qtemperate.export.check` — :func:`export_and_check`, the export-verify-time step
  shared by ``qtemperate run`` and ``qtemperate export``.

Submodules are imported on first use, so ``qtemperate.export.targets`` (needed by
recipe validation) loads without torch, onnx or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtemperate.export.check import export_and_check as export_and_check
    from qtemperate.export.onnx import INPUT_NAME as INPUT_NAME
    from qtemperate.export.onnx import OUTPUT_NAME as OUTPUT_NAME
    from qtemperate.export.onnx import export_onnx as export_onnx
    from qtemperate.export.onnx import output_names as output_names
    from qtemperate.export.qcdq import INT4_OPSET as INT4_OPSET
    from qtemperate.export.runtime import DEPLOYED_AGREEMENT_FLOOR as DEPLOYED_AGREEMENT_FLOOR
    from qtemperate.export.runtime import DeployedAgreementWarning as DeployedAgreementWarning
    from qtemperate.export.runtime import OutputReport as OutputReport
    from qtemperate.export.runtime import VerifyReport as VerifyReport
    from qtemperate.export.runtime import benchmark_onnx as benchmark_onnx
    from qtemperate.export.runtime import optimized_op_types as optimized_op_types
    from qtemperate.export.runtime import verify_onnx as verify_onnx
    from qtemperate.export.size import onnx_byte_breakdown as onnx_byte_breakdown
    from qtemperate.export.targets import TARGET_CHOICES as TARGET_CHOICES
    from qtemperate.export.targets import TARGETS as TARGETS
    from qtemperate.export.targets import check_int16_saturation as check_int16_saturation
    from qtemperate.export.targets import cpu_info as cpu_info
    from qtemperate.export.targets import detect_target as detect_target

_LAZY = {
    "export_and_check": "check",
    "INPUT_NAME": "onnx",
    "OUTPUT_NAME": "onnx",
    "export_onnx": "onnx",
    "output_names": "onnx",
    "INT4_OPSET": "qcdq",
    "DEPLOYED_AGREEMENT_FLOOR": "runtime",
    "DeployedAgreementWarning": "runtime",
    "OutputReport": "runtime",
    "VerifyReport": "runtime",
    "benchmark_onnx": "runtime",
    "optimized_op_types": "runtime",
    "verify_onnx": "runtime",
    "onnx_byte_breakdown": "size",
    "TARGET_CHOICES": "targets",
    "TARGETS": "targets",
    "check_int16_saturation": "targets",
    "cpu_info": "targets",
    "detect_target": "targets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'qtemperate.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qtemperate.export.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
