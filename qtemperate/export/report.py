"""Console lines about the deployment, from ``summary.json``'s export keys.

Used by ``qtemperate run`` (after the summary) and ``qtemperate export``. Warnings (a
deployed agreement below 0.99, a student deployed on a CPU class it was not trained
for) come first and in capitals, so they are not buried in the figures. Standard
library only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["deployment_lines", "deployment_warnings"]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def deployment_warnings(summary: dict[str, Any]) -> list[str]:
    """The loud lines: low deployed agreement, target mismatch (empty when all is well)."""
    out = []
    if summary.get("onnx_deployed_warning"):
        out.append(f"!!! {summary['onnx_deployed_warning']}")
    ag = summary.get("onnx_deployed_agreement")
    if ag is not None and ag < 0.99 and not summary.get("onnx_deployed_warning"):
        out.append(f"!!! DEPLOYED AGREEMENT {_pct(ag)} < 99%")
    int8 = summary.get("int8_onnx_deployed_agreement")
    if int8 is not None and int8 < 0.99:
        out.append(f"!!! student_int8.onnx DEPLOYED AGREEMENT {_pct(int8)} < 99% (onnxruntime)")
    warn = summary.get("target_warning")
    if warn:
        out.append(f"!!! {warn}" if warn.startswith("WARNING") else f"note: {warn}")
    return out


def _lat(d: dict[str, float] | None, bs: str) -> str:
    v = (d or {}).get(bs)
    return "-" if v is None else f"{v:.3f} ms"


def deployment_lines(summary: dict[str, Any]) -> list[str]:
    """What was deployed where: target, agreement per session, OpenVINO, QONNX, files, notes."""
    if "export_target" not in summary and "onnx_deployed_agreement" not in summary:
        return []
    lines = deployment_warnings(summary)
    cpu = summary.get("cpu") or {}
    lines.append(
        f"deployment target: {summary.get('export_target')} (trained for; this CPU: "
        f"{summary.get('detected_target')}, {'VNNI' if cpu.get('vnni') else 'no VNNI'})"
    )
    if summary.get("onnx_deployed_agreement") is not None or summary.get("onnx_graph_agreement") is not None:
        lines.append(
            f"onnx vs PyTorch:   deployed (optimized) {_pct(summary.get('onnx_deployed_agreement'))} "
            f"max|d| {summary.get('onnx_deployed_max_abs_diff', 0):.3g}; graph (unoptimized) "
            f"{_pct(summary.get('onnx_graph_agreement'))} max|d| {summary.get('onnx_graph_max_abs_diff', 0):.3g}"
        )
    for name, o in (summary.get("onnx_outputs") or {}).items():
        lines.append(
            f"  output {name}: deployed {_pct(o['deployed_agreement'])} max|d| "
            f"{o['deployed_max_abs_diff']:.3g}; graph {_pct(o['graph_agreement'])} max|d| "
            f"{o['graph_max_abs_diff']:.3g}"
        )
    if summary.get("int8_onnx_deployed_agreement") is not None:
        lines.append(
            f"student_int8.onnx: deployed {_pct(summary['int8_onnx_deployed_agreement'])} max|d| "
            f"{summary['int8_onnx_deployed_max_abs_diff']:.3g} vs its PyTorch twin"
        )
    sat = summary.get("onnx_int16_saturation")
    if sat:
        lines.append(
            f"x86-avx2 rule:     worst u8 x s8 pair sum {sat['worst_pair_sum']} "
            f"{'<=' if sat['worst_pair_sum'] <= sat['limit'] else '>'} {sat['limit']}: "
            + ("exact on CPUs without VNNI" if sat["worst_pair_sum"] <= sat["limit"]
               else f"can saturate on CPUs without VNNI ({len(sat.get('layers_at_risk', []))} layers)")
        )
    if summary.get("openvino_agreement") is not None:
        ov = summary.get("openvino_latency_ms") or {}
        lat = "  ".join(f"b{b} {_lat(ov, b)}" for b in ov)
        lines.append(
            f"openvino:          agreement {_pct(summary['openvino_agreement'])} max|d| "
            f"{summary['openvino_max_abs_diff']:.3g}" + (f"  {lat}" if lat else "")
        )
    elif summary.get("openvino_note"):
        lines.append(f"openvino:          {summary['openvino_note']}")
    if summary.get("qonnx_agreement") is not None:
        lines.append(
            f"qonnx:             {summary['qonnx_path']} agreement {_pct(summary['qonnx_agreement'])} "
            f"max|d| {summary['qonnx_max_abs_diff']:.3g} (QONNX executor, "
            f"{summary.get('qonnx_samples')} samples)"
        )
    elif summary.get("qonnx_note"):
        lines.append(f"qonnx:             {summary['qonnx_note']}")
    fl = summary.get("float_student_onnx_latency_ms") or {}
    for bs in fl:
        parts = [f"float {_lat(fl, bs)}", f"onnxruntime int8 {_lat(summary.get('int8_onnx_latency_ms'), bs)}"]
        if summary.get("openvino_latency_ms"):
            parts.append(f"openvino int8 {_lat(summary['openvino_latency_ms'], bs)}")
        sp = (summary.get("int8_speedup") or {}).get(bs)
        ovs = (summary.get("openvino_int8_speedup") or {}).get(bs)
        speed = ", ".join(x for x in (f"ort x{sp:.2f}" if sp else "", f"openvino x{ovs:.2f}" if ovs else "") if x)
        lines.append(f"student b{bs}:".ljust(19) + "  ".join(parts) + (f"  ({speed} vs float)" if speed else ""))
    for key in ("int8_latency_note", "student_slower_than_teacher_note"):
        if summary.get(key):
            lines.append(f"note: {summary[key]}")
    for fname, f in (summary.get("onnx_files") or {}).items():
        rt = "; ".join(f"{k}: {v}" for k, v in (f.get("runtimes") or {}).items())
        lines.append(f"  {fname} ({f.get('bits')}): {rt}")
    bd = summary.get("onnx_byte_breakdown")
    if bd and bd.get("ratio_to_limit"):
        parts = ", ".join(f"{k} {v / 1024:.1f}" for k, v in bd["parts"].items() if v)
        lines.append(f"onnx bytes:        {bd['ratio_to_limit']:.2f}x params x bits (KiB: {parts})")
    return lines
