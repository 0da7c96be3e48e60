"""Export-and-check: the keys ``summary.json`` carries, the int8 twin, QONNX, OpenVINO, the teacher file."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from qtemperate.export import export_and_check
from qtemperate.quantization import get_bit_widths, set_bit_width
from tests.numerics import assert_figures_explained as explained

torch.set_num_threads(1)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None

KEYS = {"onnx_path", "onnx_bytes", "onnx_top1_agreement", "onnx_max_abs_diff", "onnx_latency_ms", "int8_onnx_latency_ms",
        "onnx_deployed_agreement", "onnx_deployed_max_abs_diff", "onnx_graph_agreement", "onnx_graph_max_abs_diff",
        "export_target", "detected_target", "cpu", "target_warning", "onnx_files"}


def test_w4a4_student_gets_an_int8_twin_and_a_teacher_file(tmp_path: Path, digits, trained) -> None:
    model, q = trained
    q4 = set_bit_width(copy.deepcopy(q), 4, 4)
    before = get_bit_widths(q4)
    _, _, xte, _ = digits
    out = export_and_check(q4, tmp_path, xte[:64], teacher=model, batch_sizes=(1, 4), iters=2,
                           float_student=model)
    assert KEYS | {"teacher_onnx_latency_ms", "float_student_onnx_latency_ms", "int8_speedup"} <= set(out)
    # the deployed session is what onnxruntime users run; the twin is verified too.
    # Agreement >= 1 - near-ties / N - 1 % (tests.numerics: a near-tie of the logits may
    # flip on another CPU, and onnxruntime's integer requantization may round a value on a
    # level boundary apart from PyTorch's: one whole level, up to 0.28 in a logit measured)
    assert out["onnx_deployed_agreement"] == out["onnx_top1_agreement"]
    explained(out["onnx_top1_agreement"], None, q4, xte[:64], min_agreement=0.99, what="student")
    twin = set_bit_width(copy.deepcopy(q4), 8, 8)
    for session in ("deployed", "graph"):
        explained(out[f"int8_onnx_{session}_agreement"], None, twin, xte[:64], min_agreement=0.99,
                  what=f"int8 twin, {session}")
    assert out["int8_onnx_top1_agreement"] == out["int8_onnx_deployed_agreement"]  # main's key name
    assert out["int8_onnx_max_abs_diff"] == out["int8_onnx_deployed_max_abs_diff"]
    explained(out["teacher_onnx_top1_agreement"], out["teacher_onnx_max_abs_diff"], model, xte[:64],
              what="float teacher")
    assert out["onnx_deployed_warning"] is None
    assert out["export_target"] == out["detected_target"] and out["target_warning"] is None
    # per file: which runtime runs it with integer kernels
    files = out["onnx_files"]
    assert files["student.onnx"]["bits"] == "W4A4" and "size artifact" in files["student.onnx"]["note"]
    assert files["student_int8.onnx"]["runtimes"]["onnxruntime"].startswith("integer kernels")
    assert files["teacher.onnx"]["runtimes"] == {"onnxruntime": "float"}
    sat = out["onnx_int16_saturation"]  # the x86-avx2 rule on the int8 file
    assert sat["ok"] == (out["export_target"] in ("x86-avx2", "generic") or not sat["layers_at_risk"])
    bd = out["onnx_byte_breakdown"]
    assert sum(bd["parts"].values()) == bd["file_bytes"] == out["onnx_bytes"]
    assert out["onnx_bytes"] == (tmp_path / "student.onnx").stat().st_size
    assert (tmp_path / "student_int8.onnx").is_file() and (tmp_path / "teacher.onnx").is_file()
    assert set(out["int8_onnx_latency_ms"]) == {"1", "4"}
    assert out["int8_onnx_latency_ms"] != out["onnx_latency_ms"]
    assert 0.0 <= out["onnx_top1_agreement"] <= 1.0
    assert get_bit_widths(q4) == before  # the twin is a copy: the student keeps its 4 bits
    twin_inits = onnx.load(str(tmp_path / "student_int8.onnx")).graph.initializer
    assert all(i.data_type != onnx.TensorProto.INT4 for i in twin_inits)
    # The deployed student's speed: the int8 twin against the float teacher, per runtime and batch.
    assert out["deployed_onnx"] == "student_int8.onnx" and out["latency_max_batch"] == 4
    q8, t = out["int8_onnx_latency_ms"], out["teacher_onnx_latency_ms"]
    for b, batch in (("b1", "1"), ("bmax", "4")):
        assert (out[f"student_ort_ms_{b}"], out[f"teacher_ort_ms_{b}"]) == (q8[batch], t[batch])
        assert out[f"speedup_vs_teacher_ort_{b}"] == t[batch] / q8[batch] == out["int8_vs_teacher_speedup"][batch]
    if _has("openvino"):  # the teacher's file timed in OpenVINO too, beside the int8 twin
        ov, tov = out["openvino_latency_ms"], out["teacher_openvino_latency_ms"]
        assert set(tov) == {"1", "4"} and out["speed_missing"] is None
        for b, batch in (("b1", "1"), ("bmax", "4")):
            assert out[f"speedup_vs_teacher_openvino_{b}"] == tov[batch] / ov[batch]
        assert out["openvino_vs_teacher_speedup"] == {b: tov[b] / ov[b] for b in tov}
        assert "openvino_int8_speedup" in out  # the speed-up over the float student is kept
    else:
        assert out["speedup_vs_teacher_openvino_b1"] is None and "openvino" in out["speed_missing"]


def test_w8a8_student_reuses_its_own_latency(tmp_path: Path, digits, trained) -> None:
    _, q = trained
    _, _, xte, _ = digits
    out = export_and_check(q, tmp_path, xte[:32], batch_sizes=(1,), iters=2, openvino=False)
    assert out["int8_onnx_latency_ms"] == out["onnx_latency_ms"]
    assert not (tmp_path / "student_int8.onnx").exists() and "teacher_onnx_latency_ms" not in out
    assert "qonnx_path" not in out and "openvino_agreement" not in out  # 8-bit: no QONNX; OpenVINO off
    # W8A8: student.onnx is the deployed file; no teacher, no OpenVINO: no speed-up, and why.
    assert out["deployed_onnx"] == "student.onnx" and out["student_ort_ms_b1"] == out["onnx_latency_ms"]["1"]
    assert out["latency_max_batch"] == 1 and out["student_ort_ms_bmax"] == out["student_ort_ms_b1"]
    assert out["teacher_ort_ms_b1"] is None and out["speedup_vs_teacher_ort_b1"] is None
    assert out["speed_missing"] == {"ort": "no teacher was given to time",
                                    "openvino": "OpenVINO checks off (export.openvino: false)"}


def test_no_benchmark_only_verifies(tmp_path: Path, digits, trained) -> None:
    model, _ = trained
    _, _, xte, _ = digits
    out = export_and_check(model, tmp_path, xte[:32], benchmark=False)
    assert out["onnx_latency_ms"] is None and out["int8_onnx_latency_ms"] is None
    explained(out["onnx_top1_agreement"], out["onnx_max_abs_diff"], model, xte[:32], what="float model")
    assert out["deployed_onnx"] == "student.onnx" and out["latency_max_batch"] is None  # a float student
    assert out["student_ort_ms_b1"] is None and out["speed_missing"] == {
        "ort": "not timed (benchmark off)", "openvino": "not timed (benchmark off)"}


def test_model_returns_to_its_device_and_mode(tmp_path: Path, digits, trained) -> None:
    model, _ = trained
    m: nn.Module = copy.deepcopy(model).train()
    _, _, xte, _ = digits
    export_and_check(m, tmp_path, xte[:8], benchmark=False)
    assert next(m.parameters()).device.type == "cpu" and m.training


@pytest.mark.skipif(not (_has("openvino") and _has("qonnx")), reason="openvino/qonnx extras not installed")
def test_openvino_and_qonnx_check_the_deployment_files(tmp_path: Path, digits, trained) -> None:
    """CPU class: any x86 or ARM CPU OpenVINO supports; the figures are checked, not assumed."""
    _, q = trained
    q4 = set_bit_width(copy.deepcopy(q), 4, 4)
    _, _, xte, _ = digits
    out = export_and_check(q4, tmp_path, xte[:64], batch_sizes=(1, 4), iters=2)
    # QONNX: the 4-bit deployment path, QONNX's executor against PyTorch
    assert (tmp_path / "student.qonnx.onnx").is_file() and out["qonnx_samples"] == 64
    n = out["qonnx_samples"]
    explained(out["qonnx_agreement"], out["qonnx_max_abs_diff"], q4, xte[:n], what="QONNX executor")
    assert "finn" in out["onnx_files"]["student.qonnx.onnx"]["runtimes"]
    # OpenVINO reads the int8 file and runs every conv / fc in int8
    assert out["openvino_path"].endswith("student_int8.onnx")
    assert out["openvino_int8_layers"] == {"int8": 5, "float": 0}
    assert out["openvino_agreement"] >= 0.99
    assert set(out["openvino_latency_ms"]) == {"1", "4"}
    assert "openvino" in out["onnx_files"]["student_int8.onnx"]["runtimes"]


def test_missing_extras_are_named(tmp_path: Path, digits, trained, monkeypatch) -> None:
    from qtemperate.export import openvino as ovx
    from qtemperate.export import qonnx as qx

    monkeypatch.setattr(ovx, "openvino_available", lambda: False)
    monkeypatch.setattr(qx, "qonnx_available", lambda: False)
    _, q = trained
    _, _, xte, _ = digits
    out = export_and_check(set_bit_width(copy.deepcopy(q), 4, 4), tmp_path, xte[:16], benchmark=False)
    assert out["openvino_note"] == "OpenVINO not installed: pip install 'qtemperate[openvino]'"
    assert out["qonnx_note"] == "QONNX not installed: pip install 'qtemperate[qonnx]'"
    with pytest.raises(ImportError, match=r"qtemperate\[qonnx\]"):
        qx.export_qonnx(q, tmp_path / "x.qonnx.onnx", xte[:1])


def test_a_student_deployed_on_another_cpu_class_is_warned(tmp_path: Path, digits, trained, monkeypatch) -> None:
    from qtemperate.export.check import target_facts
    from qtemperate.export.report import deployment_lines, deployment_warnings
    from qtemperate.quantization import quantize

    model, _ = trained
    vnni = quantize(model, target="x86-vnni")
    monkeypatch.setenv("QTEMPERATE_TARGET", "x86-avx2")  # as if exporting on a CPU without VNNI
    facts = target_facts(vnni)
    assert facts["export_target"] == "x86-vnni" and facts["detected_target"] == "x86-avx2"
    assert facts["target_warning"].startswith("WARNING") and "saturate" in facts["target_warning"]
    lines = deployment_warnings(facts)
    assert lines and lines[0].startswith("!!! WARNING")
    low = {**facts, "onnx_deployed_agreement": 0.9, "onnx_graph_agreement": 1.0,
           "onnx_deployed_warning": "DEPLOYED AGREEMENT 90.00% < 99% (onnxruntime, optimized session): x"}
    assert deployment_lines(low)[0].startswith("!!! DEPLOYED AGREEMENT 90.00%")


def test_int8_pointless_note_names_the_narrow_layers() -> None:
    from qtemperate.export.check import _speedups
    from qtemperate.models import build_model

    narrow = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    out = {"float_student_onnx_latency_ms": {"1": 1.0, "64": 10.0},
           "int8_onnx_latency_ms": {"1": 1.0, "64": 9.5}, "openvino_latency_ms": {"1": 0.8, "64": 5.0}}
    res = _speedups(out, narrow)
    assert res["int8_speedup"] == {"1": 1.0, "64": pytest.approx(10 / 9.5)}
    assert res["openvino_int8_speedup"] == {"1": 1.25, "64": 2.0}
    assert "narrowest conv 8 channels" in res["int8_latency_note"] and "OpenVINO" in res["int8_latency_note"]
    assert "round_to" not in res["int8_latency_note"]  # widths 8, 16: already multiples of 8
    odd = build_model("small_cnn", num_classes=10, in_channels=1, width=6)
    widths = sorted({m.out_channels for m in odd.modules() if isinstance(m, nn.Conv2d)})
    note = _speedups(out, odd)["int8_latency_note"]
    assert f"channel counts {[w for w in widths if w % 8]}" in note and "student.round_to: 8" in note
    out["int8_onnx_latency_ms"] = {"1": 0.5, "64": 4.0}
    assert _speedups(out, narrow)["int8_latency_note"] is None


def test_a_student_slower_than_its_teacher_is_said_with_the_cause() -> None:
    from qtemperate.export.check import _versus_teacher
    from qtemperate.models import build_model

    odd = build_model("small_cnn", num_classes=10, in_channels=1, width=6)
    widths = sorted({m.out_channels for m in odd.modules() if isinstance(m, nn.Conv2d) and m.out_channels % 8})
    out = {"teacher_onnx_latency_ms": {"1": 0.15, "64": 7.0}, "int8_onnx_latency_ms": {"1": 0.3, "64": 10.0},
           "float_student_onnx_latency_ms": {"1": 0.4, "64": 14.0}}
    res = _versus_teacher(out, odd)
    assert res["int8_vs_teacher_speedup"] == {"1": pytest.approx(0.5), "64": pytest.approx(0.7)}
    note = res["student_slower_than_teacher_note"]
    assert note.startswith("the int8 student runs slower than the float teacher in onnxruntime (x0.50 at batch 1, "
                           "x0.70 at batch 64)")
    assert "float twin is slower than the teacher too" in note and f"channel counts {widths}" in note
    out["int8_onnx_latency_ms"] = {"1": 0.3, "64": 5.0}  # faster at batch 64: no note
    assert _versus_teacher(out, odd)["student_slower_than_teacher_note"] is None
    from qtemperate.export.report import deployment_lines

    lines = deployment_lines({"export_target": "x86-vnni", "student_slower_than_teacher_note": "x y"})
    assert "note: x y" in lines
