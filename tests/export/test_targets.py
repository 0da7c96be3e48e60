"""Tests for qtemperate.export.targets: CPU detection, the int16 pair-sum rule, target checks.

The saturation rule is checked against an independent emulation of the AVX2 kernel
arithmetic (``vpmaddubsw``: adjacent u8 x s8 products summed into int16 with signed
saturation), so these tests hold on any CPU: they assume none.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qtemperate.export import export_onnx
from qtemperate.export.targets import (
    INT16_MAX,
    TARGET_CHOICES,
    TARGETS,
    CpuInfo,
    _parse_cpuinfo,
    check_int16_saturation,
    cpu_info,
    detect_target,
    max_exact_weight_level,
    resolve_target,
    target_mismatch,
)
from qtemperate.quantization import quantize


# --------------------------------------------------------------------------- the arithmetic
def _avx2_dot(a_u8: np.ndarray, w_s8: np.ndarray) -> int:
    """One output of the AVX2 u8 x s8 kernel: pairs summed into saturating int16, then int32."""
    a = a_u8.astype(np.int64)
    w = w_s8.astype(np.int64)
    if a.size % 2:
        a, w = np.append(a, 0), np.append(w, 0)
    pairs = a[0::2] * w[0::2] + a[1::2] * w[1::2]
    return int(np.clip(pairs, -(2**15), 2**15 - 1).sum())


def test_rule_closed_form() -> None:
    assert max_exact_weight_level() == 64  # 2 * 255 * 64 = 32640 <= 32767 < 2 * 255 * 65
    assert 2 * 255 * 64 <= INT16_MAX < 2 * 255 * 65
    # 7-bit narrow-range weights (+-63) are the widest symmetric Brevitas grid that fits
    assert {t.name: t.max_weight_bits for t in TARGETS.values()} == {
        "x86-avx2": 7, "x86-vnni": 8, "arm64": 8, "generic": 7}
    assert TARGET_CHOICES == ("auto", "x86-avx2", "x86-vnni", "arm64", "generic")


@pytest.mark.parametrize(("level", "saturates"), [(127, True), (65, True), (64, False), (63, False)])
def test_emulated_kernel_saturates_exactly_above_64(level: int, saturates: bool) -> None:
    worst = np.full(16, 255, np.uint8)
    for sign in (1, -1):
        w = np.full(16, sign * level, np.int8)
        exact = int(worst.astype(np.int64) @ w.astype(np.int64))
        assert (_avx2_dot(worst, w) != exact) == saturates


def _conv_model(w: np.ndarray, op: str = "Conv", trans_b: int = 1) -> onnx.ModelProto:
    """``DQ(x) -> op(DQ(w))`` with integer weights ``w`` (what the QCDQ export writes)."""
    inits = [
        numpy_helper.from_array(w.astype(np.int8), "w"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.array(0, np.int8), "zw"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
    ]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"))
        x_shape = [1, w.shape[1], 3, 3]
    else:
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], name="fc", transB=trans_b))
        x_shape = [1, w.shape[1] if trans_b else w.shape[0]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-127, 127), min_size=2, max_size=12), st.integers(1, 3))
def test_check_matches_brute_force_over_pairs(row: list[int], n_out: int) -> None:
    w = np.array([row] * n_out, np.int64)
    w[0] = np.roll(w[0], 1)  # rows differ in order only: the bound does not depend on it
    rep = check_int16_saturation(_conv_model(w.reshape(n_out, -1, 1, 1)), "x86-avx2")
    brute = max(255 * max(max(a, 0) + max(b, 0), max(-a, 0) + max(-b, 0))
                for a, b in itertools.combinations(row, 2))
    assert rep.worst_pair_sum == brute
    assert rep.ok == (brute <= INT16_MAX)
    # the bound is sound: no input, in any pair order the kernel packs, saturates when ok
    if rep.ok:
        a = np.full(len(row), 255, np.uint8)
        for perm in (row, row[::-1], sorted(row)):
            wp = np.array(perm, np.int8)
            for mask in (wp > 0, wp < 0):
                a_m = np.where(mask, a, 0).astype(np.uint8)
                assert _avx2_dot(a_m, wp) == int(a_m.astype(np.int64) @ wp.astype(np.int64))


def test_gemm_rows_follow_trans_b() -> None:
    w = np.array([[100, 100, 1], [1, 1, 1]], np.int64)  # 2 outputs x 3 inputs
    assert not check_int16_saturation(_conv_model(w, "Gemm", trans_b=1)).ok
    # without transB the weight is (K, N): columns are outputs, (100, 1) and (100, 1) pairs
    rep = check_int16_saturation(_conv_model(w, "Gemm", trans_b=0))
    assert rep.worst_pair_sum == 255 * 101 and rep.ok


def test_targets_without_pair_sums_always_pass() -> None:
    m = _conv_model(np.full((2, 4, 1, 1), 127))
    assert not check_int16_saturation(m, "x86-avx2").ok
    for t in ("x86-vnni", "arm64"):
        rep = check_int16_saturation(m, t)
        assert rep.ok and not rep.applies
    assert not check_int16_saturation(m, "generic").ok
    with pytest.raises(ValueError, match="allowed: auto, x86-avx2"):
        check_int16_saturation(m, "avx2")


def test_exported_avx2_student_cannot_saturate_an_avx2_cpu(tmp_path, digits, trained) -> None:
    """Assumes no CPU: the rule is checked on the exported integers, on any machine."""
    xtr, _, xte, _ = digits
    model, _ = trained
    calib = [xtr[i : i + 64] for i in range(0, 256, 64)]
    q7 = quantize(model, calibration_loader=calib, calibration_batches=4, target="x86-avx2").eval()
    q8 = quantize(model, calibration_loader=calib, calibration_batches=4, target="x86-vnni").eval()
    r7 = check_int16_saturation(export_onnx(q7, tmp_path / "avx2.onnx", xte[:1]), "x86-avx2")
    r8 = check_int16_saturation(export_onnx(q8, tmp_path / "vnni.onnx", xte[:1]), "x86-avx2")
    assert len(r7.layers) == 5  # 4 convs + fc: first and last included
    assert r7.ok and all(x["max_abs_weight"] <= 63 for x in r7.layers)
    assert r7.worst_pair_sum <= 2 * 255 * 63
    assert not r8.ok and max(x["max_abs_weight"] for x in r8.layers) == 127
    risk = r8.to_dict()["layers_at_risk"]  # one readable line per layer: op, tensor, weight shape, max |w|
    assert len(risk) == sum(not x["ok"] for x in r8.layers) > 0
    for line, x in zip(risk, [x for x in r8.layers if not x["ok"]]):
        assert line.startswith(f"{x['op']} -> ") and "x".join(map(str, x["weight_shape"])) in line
        assert line.endswith(f"(max |w| {x['max_abs_weight']})")


# --------------------------------------------------------------------------- the CPU
X86_VNNI = "model name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu sse4_1 avx2 avx512f avx512bw avx512_vnni\n"
X86_AVX2 = "model name\t: AMD EPYC 7601 32-Core Processor\nflags\t\t: fpu sse4_1 avx2 fma\n"
ALDER = "model name\t: 12th Gen Intel(R) Core(TM) i7\nflags\t\t: avx2 avx_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("machine", "text", "expected"),
    [("x86_64", X86_VNNI, "x86-vnni"), ("x86_64", X86_AVX2, "x86-avx2"), ("x86_64", ALDER, "x86-vnni"),
     ("AMD64".lower(), X86_AVX2, "x86-avx2"), ("aarch64", ARM, "arm64"), ("arm64", "", "arm64"),
     ("x86_64", "", "generic"), ("riscv64", "isa\t: rv64imafdc\n", "generic")],
)
def test_detect_target_from_flags(monkeypatch, machine: str, text: str, expected: str) -> None:
    monkeypatch.delenv("QTEMPERATE_TARGET", raising=False)
    model, flags = _parse_cpuinfo(text)
    info = CpuInfo(machine, model, flags, "/proc/cpuinfo")
    assert detect_target(info) == expected
    d = info.to_dict()
    assert d["vnni"] == (expected == "x86-vnni") and d["machine"] == machine


def test_env_override_and_bad_names(monkeypatch) -> None:
    monkeypatch.setenv("QTEMPERATE_TARGET", "x86-avx2")
    assert detect_target() == "x86-avx2" and resolve_target("auto") == "x86-avx2"
    monkeypatch.setenv("QTEMPERATE_TARGET", "pentium")
    with pytest.raises(ValueError, match=r"QTEMPERATE_TARGET.*allowed: auto, x86-avx2"):
        detect_target()
    monkeypatch.delenv("QTEMPERATE_TARGET")
    assert resolve_target(None) is None and resolve_target("arm64") == "arm64"
    with pytest.raises(ValueError, match=r"export\.target: unknown target 'avx512'"):
        resolve_target("avx512", "export.target")


def test_this_machine_is_read() -> None:
    info = cpu_info()
    assert info.machine
    assert detect_target() in TARGETS


def test_mismatch_messages() -> None:
    assert target_mismatch("x86-avx2", "x86-avx2") is None
    loud = target_mismatch("x86-vnni", "x86-avx2")
    assert loud.startswith("WARNING") and "saturate" in loud and "export.target: x86-avx2" in loud
    soft = target_mismatch("x86-avx2", "x86-vnni")
    assert soft and not soft.startswith("WARNING") and "exact here too" in soft
    assert "without a deployment target" in target_mismatch(None, "x86-avx2")
    assert target_mismatch(None, "x86-vnni") is None


def test_recipe_rejects_an_unknown_target(tmp_path) -> None:
    from qtemperate.cli import main
    from qtemperate.recipe import RecipeError, parse_recipe
    from tests.pipeline_helpers import tiny_recipe

    raw = tiny_recipe(tmp_path, export={"target": "x86-sse"})
    with pytest.raises(RecipeError, match=r"export\.target.*'x86-sse'.*auto, x86-avx2, x86-vnni, arm64, generic"):
        parse_recipe(raw)
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert parse_recipe(tiny_recipe(tmp_path, export={"target": "generic"})).export.target == "generic"
    assert parse_recipe(tiny_recipe(tmp_path)).export.target == "auto"


def test_targets_module_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, qtemperate.export.targets, qtemperate.recipe; "
            "print(any(m in sys.modules for m in ('onnx', 'onnxruntime', 'brevitas', 'openvino')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
