"""Export-and-check: the keys ``summary.json`` carries, the int8 twin, the teacher file."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from qtemperate.export import export_and_check
from qtemperate.quantization import get_bit_widths, set_bit_width

torch.set_num_threads(1)

KEYS = {"onnx_path", "onnx_bytes", "onnx_top1_agreement", "onnx_max_abs_diff", "onnx_latency_ms", "int8_onnx_latency_ms"}


def test_w4a4_student_gets_an_int8_twin_and_a_teacher_file(tmp_path: Path, digits, trained) -> None:
    model, q = trained
    q4 = set_bit_width(copy.deepcopy(q), 4, 4)
    before = get_bit_widths(q4)
    _, _, xte, _ = digits
    out = export_and_check(q4, tmp_path, xte[:64], teacher=model, batch_sizes=(1, 4), iters=2)
    assert KEYS | {"teacher_onnx_latency_ms"} <= set(out)
    assert out["onnx_bytes"] == (tmp_path / "student.onnx").stat().st_size
    assert (tmp_path / "student_int8.onnx").is_file() and (tmp_path / "teacher.onnx").is_file()
    assert set(out["int8_onnx_latency_ms"]) == {"1", "4"}
    assert out["int8_onnx_latency_ms"] != out["onnx_latency_ms"]
    assert 0.0 <= out["onnx_top1_agreement"] <= 1.0
    assert get_bit_widths(q4) == before  # the twin is a copy: the student keeps its 4 bits
    twin_inits = onnx.load(str(tmp_path / "student_int8.onnx")).graph.initializer
    assert all(i.data_type != onnx.TensorProto.INT4 for i in twin_inits)


def test_w8a8_student_reuses_its_own_latency(tmp_path: Path, digits, trained) -> None:
    _, q = trained
    _, _, xte, _ = digits
    out = export_and_check(q, tmp_path, xte[:32], batch_sizes=(1,), iters=2)
    assert out["int8_onnx_latency_ms"] == out["onnx_latency_ms"]
    assert not (tmp_path / "student_int8.onnx").exists() and "teacher_onnx_latency_ms" not in out


def test_no_benchmark_only_verifies(tmp_path: Path, digits, trained) -> None:
    model, _ = trained
    _, _, xte, _ = digits
    out = export_and_check(model, tmp_path, xte[:32], benchmark=False)
    assert out["onnx_latency_ms"] is None and out["int8_onnx_latency_ms"] is None
    assert out["onnx_top1_agreement"] == pytest.approx(1.0)
    assert out["onnx_max_abs_diff"] < 1e-3


def test_model_returns_to_its_device_and_mode(tmp_path: Path, digits, trained) -> None:
    model, _ = trained
    m: nn.Module = copy.deepcopy(model).train()
    _, _, xte, _ = digits
    export_and_check(m, tmp_path, xte[:8], benchmark=False)
    assert next(m.parameters()).device.type == "cpu" and m.training
