"""Export-and-check: what ``qtemperate run`` and ``qtemperate export`` report about a student.

:func:`export_and_check` writes ``student.onnx``, verifies it against the PyTorch model
on real inputs in two onnxruntime sessions (unoptimized: is the graph exact; optimized:
what a user runs, on this CPU), per output, and, when asked, times it beside the float
teacher and the float student. onnxruntime's integer convolution kernels are 8-bit only,
so a sub-8-bit student's graph runs its 4-bit convolutions in float; the same pruned
architecture is then also exported at W8A8 (``student_int8.onnx``), verified and timed as
``int8_onnx_latency_ms``: the latency of the student on an int8 CPU backend. Such a
student is also written as QONNX (``student.qonnx.onnx``, for FINN / FPGA flows) and
checked with QONNX's executor; the int8 file is verified and timed in OpenVINO too,
beside the float teacher's file. OpenVINO and QONNX are optional extras: without them
the summary says which extra to install. The keys are the ones ``summary.json`` carries,
among them the deployed student's speed-up over the teacher per runtime and batch
(:mod:`qtemperate.export.speed`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.export.onnx import export_onnx, model_device
from qtemperate.export.runtime import (
    DEPLOYED_AGREEMENT_FLOOR,
    OutputAgreement,
    VerifyReport,
    benchmark_onnx,
    optimized_op_types,
    verify_onnx,
)
from qtemperate.export.size import onnx_byte_breakdown
from qtemperate.export.speed import speed_summary
from qtemperate.export.targets import (
    TARGETS,
    check_int16_saturation,
    cpu_info,
    detect_target,
    target_mismatch,
)
from qtemperate.quantization import get_quant_config, is_quantized, set_bit_width

__all__ = ["DEPLOYED_AGREEMENT_FLOOR", "export_and_check", "target_facts"]

QONNX_SAMPLES = 64
"""Samples checked with QONNX's (node-by-node, Python) executor."""
INT8_POINTLESS_SPEEDUP = 1.1
"""Below this int8 / float speed-up at every batch size, int8 is called pointless for latency."""

_INT_LAYERS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")
_FLOAT_LAYERS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose")


def _latency(path: Path, batch_sizes: Sequence[int], iters: int) -> dict[str, float]:
    lat = benchmark_onnx(path, batch_sizes=tuple(batch_sizes), iters=iters)
    return {str(k): v for k, v in lat.items()}


def target_facts(student: nn.Module) -> dict[str, Any]:
    """The deployment-target entries of ``summary.json`` for ``student`` on this CPU.

    ``export_target`` (what the student was trained for), ``detected_target`` (this
    CPU), ``cpu`` (its int8-relevant flags) and ``target_warning`` (``None`` when they
    match; see :func:`qtemperate.export.targets.target_mismatch`).
    """
    trained = get_quant_config(student).target if is_quantized(student) else None
    host = detect_target()
    return {
        "export_target": trained,
        "export_target_max_weight_bits": TARGETS[trained].max_weight_bits if trained else None,
        "detected_target": host,
        "cpu": cpu_info().to_dict(),
        "target_warning": target_mismatch(trained, host) if is_quantized(student) else None,
    }


def _verify_keys(prefix: str, rep: VerifyReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        f"{prefix}_deployed_agreement": rep.top1_agreement,
        f"{prefix}_deployed_max_abs_diff": rep.max_abs_diff,
        f"{prefix}_graph_agreement": rep.graph_agreement,
        f"{prefix}_graph_max_abs_diff": rep.graph_max_abs_diff,
    }
    if len(rep.outputs) > 1:
        out[f"{prefix}_outputs"] = {
            name: {"deployed_agreement": o.deployed.agreement,
                   "deployed_max_abs_diff": o.deployed.max_abs_diff,
                   "graph_agreement": o.graph.agreement,
                   "graph_max_abs_diff": o.graph.max_abs_diff}
            for name, o in rep.outputs.items()
        }
    return out


def _worst(res: dict[str, OutputAgreement]) -> tuple[float | None, float]:
    agreements = [r.agreement for r in res.values() if r.agreement is not None]
    return (min(agreements) if agreements else None,
            max((r.max_abs_diff for r in res.values()), default=0.0))


def _integer_layers(path: Path) -> dict[str, int]:
    ops = optimized_op_types(path)
    return {"integer": sum(ops[o] for o in _INT_LAYERS), "float": sum(ops[o] for o in _FLOAT_LAYERS)}


def _file_entry(path: Path, bits: str, quantized: bool) -> dict[str, Any]:
    """Which runtime runs ``path`` with integer kernels (onnxruntime's optimized graph on this CPU)."""
    entry: dict[str, Any] = {"bits": bits}
    if not quantized:
        entry["runtimes"] = {"onnxruntime": "float"}
        return entry
    layers = _integer_layers(path)
    total = layers["integer"] + layers["float"]
    entry["onnxruntime_layers"] = layers
    if layers["float"] == 0:
        entry["runtimes"] = {"onnxruntime": f"integer kernels ({layers['integer']}/{total} conv/gemm)"}
    elif layers["integer"] == 0:
        entry["runtimes"] = {"onnxruntime": "float kernels only (no integer kernel for these widths)"}
    else:
        entry["runtimes"] = {"onnxruntime": f"mixed: {layers['integer']}/{total} conv/gemm on "
                                            "integer kernels, the rest (sub-8-bit) in float"}
    if layers["float"]:
        entry["note"] = ("onnxruntime has no sub-8-bit kernels: this file is the size artifact; "
                         "student_int8.onnx is the int8 CPU deployment and student.qonnx.onnx "
                         "the 4-bit one (FINN)")
    return entry


def _odd_widths(model: nn.Module) -> list[int]:
    """Conv channel counts that are not multiples of 8 (padded by the int8 kernels' packing)."""
    return sorted({m.out_channels for m in model.modules()
                   if isinstance(m, nn.Conv1d | nn.Conv2d) and m.out_channels % 8})


def _min_width(model: nn.Module) -> int | None:
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    return min(widths) if widths else None


def export_and_check(
    student: nn.Module,
    out_dir: str | Path,
    inputs: torch.Tensor,
    teacher: nn.Module | None = None,
    benchmark: bool = True,
    batch_sizes: Sequence[int] = (1, 64),
    iters: int = 20,
    float_student: nn.Module | None = None,
    openvino: bool = True,
    qonnx: bool = True,
    classification_outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export ``student`` to ``out_dir/student.onnx``, verify it and (optionally) time it.

    Args:
        student: The trained student (quantized or float); moved to the CPU for export
            and put back on its device and in its train/eval mode afterwards.
        out_dir: Folder for ``student.onnx``, ``student_int8.onnx``, ``student.qonnx.onnx``
            and ``teacher.onnx``.
        inputs: Verification inputs, a batch ``(N, C, H, W)`` (real data when possible).
        teacher: The float teacher, exported and timed beside the student when given.
        benchmark: Time the files in onnxruntime (and OpenVINO).
        batch_sizes: Batch sizes to time.
        iters: Timed runs per batch size.
        float_student: The student's float architecture (before quantization), timed as
            ``float_student_onnx_latency_ms`` so the int8 speed-up is measured on the
            same widths (and a note says when pruning made int8 pointless for latency).
        openvino: Verify and time the int8 file in OpenVINO when it is installed.
        qonnx: Export a sub-8-bit student as QONNX and check it when qonnx is installed.
        classification_outputs: Output names that get an agreement figure (default: the
            only output, or those named like classes; see
            :func:`~qtemperate.export.runtime.is_classification_output`).

    Returns:
        ``summary.json``'s export keys: ``onnx_path``, ``onnx_bytes``,
        ``onnx_top1_agreement`` / ``onnx_max_abs_diff`` (the deployed session, as
        ``onnx_deployed_agreement`` / ``onnx_deployed_max_abs_diff``),
        ``onnx_graph_agreement`` / ``onnx_graph_max_abs_diff`` (unoptimized session),
        ``onnx_outputs`` (per output, when there are several), ``onnx_deployed_warning``,
        ``onnx_latency_ms`` and ``int8_onnx_latency_ms`` (``{batch: ms}`` or ``None``),
        ``teacher_onnx_latency_ms`` / ``float_student_onnx_latency_ms`` when timed,
        ``int8_onnx_top1_agreement`` / ``int8_onnx_max_abs_diff`` (the int8 twin against
        its own PyTorch model), ``teacher_onnx_top1_agreement`` / ``teacher_onnx_max_abs_diff``
        (when the teacher was timed), ``int8_speedup``, ``int8_latency_note``,
        ``int8_vs_teacher_speedup`` / ``student_slower_than_teacher_note`` (when the teacher
        was timed), ``teacher_openvino_latency_ms`` / ``openvino_vs_teacher_speedup`` (the
        teacher in OpenVINO, when the int8 file was timed there), ``deployed_onnx`` and the
        flat speed keys of :func:`~qtemperate.export.speed.speed_summary`
        (``student_ort_ms_b1``, ``speedup_vs_teacher_openvino_bmax``, ``speed_missing``, ...),
        ``onnx_byte_breakdown``,
        ``onnx_int16_saturation`` (the ``x86-avx2`` rule on the int8 file), ``onnx_files``
        (per file: bits and the runtimes that run it with integer kernels), the
        ``openvino_*`` and ``qonnx_*`` keys, and the target facts of :func:`target_facts`.
    """
    out_dir = Path(out_dir)
    device, was_training = model_device(student), student.training
    student_cpu = student.to("cpu").eval()
    example = inputs[:1].cpu()
    x = inputs.cpu()
    quantized = is_quantized(student_cpu)
    try:
        out: dict[str, Any] = {**target_facts(student_cpu)}
        path = export_onnx(student_cpu, out_dir / "student.onnx", example)
        rep = verify_onnx(path, student_cpu, x, classification_outputs)
        out.update({
            "onnx_path": str(path),
            "onnx_bytes": path.stat().st_size,
            "onnx_top1_agreement": rep.top1_agreement,
            "onnx_max_abs_diff": rep.max_abs_diff,
            **_verify_keys("onnx", rep),
            "onnx_latency_ms": None,
            "int8_onnx_latency_ms": None,
        })
        out["onnx_deployed_warning"] = _deployed_warning(rep, out)
        files: dict[str, Any] = {}
        int8_model, int8_path = None, None
        if quantized:
            cfg = get_quant_config(student_cpu)
            storage = 4 if cfg.weight_bits <= 4 else 8
            params = sum(p.numel() for p in student_cpu.parameters())
            out["onnx_byte_breakdown"] = onnx_byte_breakdown(path, params, storage)
            files[path.name] = _file_entry(path, f"W{cfg.weight_bits}A{cfg.act_bits}", True)
            if min(cfg.weight_bits, cfg.act_bits) < 8:
                int8_model = copy.deepcopy(student_cpu)
                set_bit_width(int8_model, 8, 8)  # capped by the model's target
                int8_path = export_onnx(int8_model, out_dir / "student_int8.onnx", example)
                rep8 = verify_onnx(int8_path, int8_model, x, classification_outputs)
                out.update(_verify_keys("int8_onnx", rep8))
                # main's names for the twin's own agreement (issue 10): the deployed session
                out["int8_onnx_top1_agreement"] = rep8.top1_agreement
                out["int8_onnx_max_abs_diff"] = rep8.max_abs_diff
                c8 = get_quant_config(int8_model)
                files[int8_path.name] = _file_entry(int8_path, f"W{c8.weight_bits}A{c8.act_bits}", True)
                if qonnx:
                    out.update(_qonnx(student_cpu, out_dir, x, example, classification_outputs, files))
            else:
                int8_model, int8_path = student_cpu, path
            out["onnx_int16_saturation"] = check_int16_saturation(int8_path, "x86-avx2").to_dict()
        else:
            files[path.name] = _file_entry(path, "float", False)
        if int8_model is not None and openvino:
            out.update(_openvino(int8_model, int8_path, x, benchmark, batch_sizes, iters,
                                 classification_outputs, files))
        out["onnx_files"] = files
        out["deployed_onnx"] = Path(int8_path if int8_path is not None else path).name
        why: dict[str, str] = {}
        if benchmark:
            _time_files(out, path, int8_path, out_dir, example, x, teacher, float_student,
                        batch_sizes, iters, classification_outputs, files)
        else:
            why = {"ort": "not timed (benchmark off)", "openvino": "not timed (benchmark off)"}
        if int8_model is None:
            why.setdefault("openvino", "OpenVINO times the int8 file only; this student is float")
        elif not openvino:
            why.setdefault("openvino", "OpenVINO checks off (export.openvino: false)")
        if teacher is None:
            why["teacher"] = "no teacher was given to time"
        out.update(speed_summary(out, quantized=quantized, why=why))
        return out
    finally:
        student.to(device).train(was_training)


def _time_files(
    out: dict[str, Any], path: Path, int8_path: Path | None, out_dir: Path, example: torch.Tensor,
    x: torch.Tensor, teacher: nn.Module | None, float_student: nn.Module | None,
    batch_sizes: Sequence[int], iters: int, classification_outputs: Sequence[str] | None,
    files: dict[str, Any],
) -> None:
    """Time the student's files, its float twin and the teacher (exported, verified) into ``out``.

    The teacher is timed in every runtime the deployed student was timed in (onnxruntime,
    and OpenVINO when ``openvino_latency_ms`` is there), so each speed-up over the teacher
    compares two files in one runtime at one batch size.
    """
    quantized = int8_path is not None
    out["onnx_latency_ms"] = _latency(path, batch_sizes, iters)
    if quantized:
        out["int8_onnx_latency_ms"] = (
            out["onnx_latency_ms"] if int8_path == path else _latency(int8_path, batch_sizes, iters)
        )
    if float_student is not None:
        fpath = export_onnx(copy.deepcopy(float_student).cpu().eval(),
                            out_dir / "student_float.onnx", example)
        files[fpath.name] = _file_entry(fpath, "float", False)
        out["float_student_onnx_latency_ms"] = _latency(fpath, batch_sizes, iters)
        if quantized:
            out.update(_speedups(out, float_student))
    if teacher is None:
        return
    t_device = model_device(teacher)
    try:
        tpath = export_onnx(teacher.to("cpu").eval(), out_dir / "teacher.onnx", example)
        files[tpath.name] = _file_entry(tpath, "float", False)
        trep = verify_onnx(tpath, teacher, x, classification_outputs)
        out["teacher_onnx_top1_agreement"] = trep.top1_agreement
        out["teacher_onnx_max_abs_diff"] = trep.max_abs_diff
        out["teacher_onnx_latency_ms"] = _latency(tpath, batch_sizes, iters)
    finally:
        teacher.to(t_device)
    if out.get("openvino_latency_ms"):
        out.update(_teacher_openvino(tpath, batch_sizes, iters))
    if quantized:
        out.update(_versus_teacher(out, float_student))


def _teacher_openvino(tpath: Path, batch_sizes: Sequence[int], iters: int) -> dict[str, Any]:
    """``teacher_openvino_latency_ms``: the float teacher's file in OpenVINO, the same settings
    as the student's (:func:`~qtemperate.export.openvino.benchmark_openvino`)."""
    from qtemperate.export import openvino as ovx

    try:
        lat = ovx.benchmark_openvino(tpath, batch_sizes=tuple(batch_sizes), iters=iters)
    except RuntimeError as exc:  # OpenVINO's conversion/compile errors; the student's figures stand
        return {"teacher_openvino_note": f"OpenVINO could not run {tpath.name}: {' '.join(str(exc).split())[:200]}"}
    return {"teacher_openvino_latency_ms": {str(k): v for k, v in lat.items()}}


def _deployed_warning(rep: VerifyReport, facts: dict[str, Any]) -> str | None:
    """:func:`verify_onnx`'s warning, with the deployment target to train for when only the
    optimized kernels disagree (a deployed agreement below :data:`DEPLOYED_AGREEMENT_FLOOR`)."""
    if rep.warning is None:
        return None
    graph = rep.graph_agreement
    if graph is not None and graph >= DEPLOYED_AGREEMENT_FLOOR and facts.get("export_target"):
        return f"{rep.warning} ({facts['detected_target']}); train with export.target: {facts['detected_target']}"
    return rep.warning


def _speedups(out: dict[str, Any], float_student: nn.Module) -> dict[str, Any]:
    """int8 / float speed-ups on the student's own widths, and a note when int8 does not pay."""
    fl, q = out["float_student_onnx_latency_ms"], out["int8_onnx_latency_ms"]
    speed = {b: fl[b] / q[b] for b in fl if q.get(b)}
    res: dict[str, Any] = {"int8_speedup": speed, "int8_latency_note": None}
    ov = out.get("openvino_latency_ms")
    if ov:
        res["openvino_int8_speedup"] = {b: fl[b] / ov[b] for b in fl if ov.get(b)}
    if speed and all(v < INT8_POINTLESS_SPEEDUP for v in speed.values()):
        best = max(speed, key=lambda b: speed[b])
        note = (
            f"int8 is not faster than float for latency here (onnxruntime x{speed[best]:.2f} at "
            f"batch {best}): the student's layers are narrow (narrowest conv "
            f"{_min_width(float_student)} channels), so its int8 kernels are overhead-bound "
            "(quantize, requantize, packing); prune less or keep wider layers where latency matters"
        )
        odd = _odd_widths(float_student)
        if odd:
            note += (f"; channel counts {odd} are not multiples of 8: student.round_to: 8 makes the "
                     "planner keep widths the int8 kernels pack without padding")
        if res.get("openvino_int8_speedup"):
            note += f"; OpenVINO runs the same file at x{max(res['openvino_int8_speedup'].values()):.2f}"
        res["int8_latency_note"] = note
    return res


def _versus_teacher(out: dict[str, Any], float_student: nn.Module | None) -> dict[str, Any]:
    """The int8 student's latency against the float teacher's, and a note when it is slower.

    ``int8_vs_teacher_speedup[b] = teacher_ms[b] / int8_ms[b]``; below 1 at every batch
    size the compressed student is slower to run than the model it replaces, which the
    size figures alone would hide (``student_slower_than_teacher_note``).
    """
    t, q = out["teacher_onnx_latency_ms"], out.get("int8_onnx_latency_ms") or {}
    speed = {b: t[b] / q[b] for b in t if q.get(b)}
    res: dict[str, Any] = {"int8_vs_teacher_speedup": speed, "student_slower_than_teacher_note": None}
    t_ov, ov = out.get("teacher_openvino_latency_ms") or {}, out.get("openvino_latency_ms") or {}
    if t_ov and ov:
        res["openvino_vs_teacher_speedup"] = {b: t_ov[b] / ov[b] for b in t_ov if ov.get(b)}
    if speed and all(v < 1.0 for v in speed.values()):
        note = ("the int8 student runs slower than the float teacher in onnxruntime ("
                + ", ".join(f"x{v:.2f} at batch {b}" for b, v in speed.items()) + ")")
        fl = out.get("float_student_onnx_latency_ms") or {}
        if fl and all(fl[b] > t[b] for b in t if b in fl):
            note += "; its float twin is slower than the teacher too, so the cause is the pruned shape"
        odd = _odd_widths(float_student) if float_student is not None else []
        if odd:
            note += (f"; channel counts {odd} are not multiples of 8, which onnxruntime's kernels pad "
                     "or run on slower paths: student.round_to: 8 keeps widths they pack")
        res["student_slower_than_teacher_note"] = note
    return res


def _openvino(model: nn.Module, path: Path, x: torch.Tensor, benchmark: bool,
              batch_sizes: Sequence[int], iters: int, classification_outputs: Sequence[str] | None,
              files: dict[str, Any]) -> dict[str, Any]:
    from qtemperate.export import openvino as ovx

    if not ovx.openvino_available():
        return {"openvino_note": f"OpenVINO not installed: {ovx.OPENVINO_EXTRA}"}
    agree, diff = _worst(ovx.verify_openvino(path, model, x, classification_outputs))
    layers = ovx.openvino_int8_layers(path)
    total = layers["int8"] + layers["float"]
    files[path.name].setdefault("runtimes", {})["openvino"] = (
        f"integer kernels ({layers['int8']}/{total} conv/fc)" if layers["int8"] else "float kernels only"
    )
    res: dict[str, Any] = {"openvino_path": Path(path).name, "openvino_agreement": agree,
                           "openvino_max_abs_diff": diff, "openvino_int8_layers": layers}
    if benchmark:
        lat = ovx.benchmark_openvino(path, batch_sizes=tuple(batch_sizes), iters=iters)
        res["openvino_latency_ms"] = {str(k): v for k, v in lat.items()}
    return res


def _qonnx(model: nn.Module, out_dir: Path, x: torch.Tensor, example: torch.Tensor,
           classification_outputs: Sequence[str] | None, files: dict[str, Any]) -> dict[str, Any]:
    from qtemperate.export import qonnx as qx

    if not qx.qonnx_available():
        return {"qonnx_note": f"QONNX not installed: {qx.QONNX_EXTRA}"}
    qpath = qx.export_qonnx(model, out_dir / "student.qonnx.onnx", example)
    agree, diff = _worst(qx.verify_qonnx(qpath, model, x[:QONNX_SAMPLES], classification_outputs))
    cfg = get_quant_config(model)
    files[qpath.name] = {
        "bits": f"W{cfg.weight_bits}A{cfg.act_bits}",
        "runtimes": {"finn": "integer hardware (FPGA dataflow) from QONNX Quant nodes",
                     "qonnx": "reference executor (float arithmetic on the quantized grid)"},
    }
    return {"qonnx_path": qpath.name, "qonnx_bytes": qpath.stat().st_size,
            "qonnx_agreement": agree, "qonnx_max_abs_diff": diff,
            "qonnx_samples": min(QONNX_SAMPLES, int(x.shape[0]))}
