"""Export-and-check: what ``qtemperate run`` and ``qtemperate export`` report about a student.

:func:`export_and_check` writes ``student.onnx``, verifies it against the PyTorch
model on real inputs and, when asked, times it in onnxruntime beside the float
teacher. onnxruntime's integer convolution kernels are 8-bit only, so a sub-8-bit
student's graph runs its convolutions in float; the same pruned architecture is then
also exported at W8A8 (``student_int8.onnx``) and timed as ``int8_onnx_latency_ms``:
the latency of the student on an int8 CPU backend. The keys are the ones
``summary.json`` carries.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.export.onnx import export_onnx, model_device
from qtemperate.export.runtime import benchmark_onnx, verify_onnx
from qtemperate.quantization import get_quant_config, is_quantized, set_bit_width

__all__ = ["export_and_check"]


def _latency(path: Path, batch_sizes: Sequence[int], iters: int) -> dict[str, float]:
    lat = benchmark_onnx(path, batch_sizes=tuple(batch_sizes), iters=iters)
    return {str(k): v for k, v in lat.items()}


def export_and_check(
    student: nn.Module,
    out_dir: str | Path,
    inputs: torch.Tensor,
    teacher: nn.Module | None = None,
    benchmark: bool = True,
    batch_sizes: Sequence[int] = (1, 64),
    iters: int = 20,
) -> dict[str, Any]:
    """Export ``student`` to ``out_dir/student.onnx``, verify it and (optionally) time it.

    Args:
        student: The trained student (quantized or float); moved to the CPU for export
            and put back on its device and in its train/eval mode afterwards.
        out_dir: Folder for ``student.onnx``, ``student_int8.onnx`` and ``teacher.onnx``.
        inputs: Verification inputs, a batch ``(N, C, H, W)`` (real data when possible).
        teacher: The float teacher, exported and timed beside the student when given.
        benchmark: Time the files in onnxruntime.
        batch_sizes: Batch sizes to time.
        iters: Timed runs per batch size.

    Returns:
        ``onnx_path``, ``onnx_bytes``, ``onnx_top1_agreement``, ``onnx_max_abs_diff``,
        ``onnx_latency_ms`` and ``int8_onnx_latency_ms`` (``{batch: ms}`` or ``None``),
        and ``teacher_onnx_latency_ms`` when a teacher was given and timed; each
        extra file's own agreement with its PyTorch model (``int8_onnx_top1_agreement``,
        ``int8_onnx_max_abs_diff``, ``teacher_onnx_top1_agreement``,
        ``teacher_onnx_max_abs_diff``) when it was exported.
    """
    out_dir = Path(out_dir)
    device, was_training = model_device(student), student.training
    student_cpu = student.to("cpu").eval()
    example = inputs[:1].cpu()
    try:
        path = export_onnx(student_cpu, out_dir / "student.onnx", example)
        rep = verify_onnx(path, student_cpu, inputs.cpu())
        out: dict[str, Any] = {
            "onnx_path": str(path),
            "onnx_bytes": path.stat().st_size,
            "onnx_top1_agreement": rep.top1_agreement,
            "onnx_max_abs_diff": rep.max_abs_diff,
            "onnx_latency_ms": None,
            "int8_onnx_latency_ms": None,
        }
        if not benchmark:
            return out
        out["onnx_latency_ms"] = _latency(path, batch_sizes, iters)
        if is_quantized(student_cpu):
            cfg = get_quant_config(student_cpu)
            if min(cfg.weight_bits, cfg.act_bits) < 8:
                twin = copy.deepcopy(student_cpu)
                set_bit_width(twin, 8, 8)
                twin_path = export_onnx(twin, out_dir / "student_int8.onnx", example)
                twin_rep = verify_onnx(twin_path, twin, inputs.cpu())  # its own agreement, not the student's
                out["int8_onnx_top1_agreement"] = twin_rep.top1_agreement
                out["int8_onnx_max_abs_diff"] = twin_rep.max_abs_diff
                out["int8_onnx_latency_ms"] = _latency(twin_path, batch_sizes, iters)
            else:
                out["int8_onnx_latency_ms"] = out["onnx_latency_ms"]
        if teacher is not None:
            t_device = model_device(teacher)
            try:
                tpath = export_onnx(teacher.to("cpu").eval(), out_dir / "teacher.onnx", example)
                teacher_rep = verify_onnx(tpath, teacher, inputs.cpu())
                out["teacher_onnx_top1_agreement"] = teacher_rep.top1_agreement
                out["teacher_onnx_max_abs_diff"] = teacher_rep.max_abs_diff
                out["teacher_onnx_latency_ms"] = _latency(tpath, batch_sizes, iters)
            finally:
                teacher.to(t_device)
        return out
    finally:
        student.to(device).train(was_training)
