"""Tests for qtemperate.export.emulate: the saturation of x86 CPUs without VNNI, observed.

CPU class assumed: an **emulated** Haswell (AVX2, no VNNI, no AVX-512) under
``qemu-x86_64 -cpu Haswell``, on any x86-64 host with Debian's ``qemu-user``; skipped
cleanly without it. PyTorch runs natively; only onnxruntime runs emulated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qtemperate.export import export_onnx
from qtemperate.export.emulate import emulator_available, run_emulated
from qtemperate.quantization import quantize
from tests.numerics import output_tolerance, top1_agreement


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not emulator_available(), reason="qemu-x86_64 not installed (apt-get install qemu-user)"),
]


def _qlinearconv(tmp_path, w_level: int):
    """One QLinearConv: 16 uint8 inputs times 16 int8 weights equal to ``w_level``, output in float."""
    inits = [
        numpy_helper.from_array(np.full((1, 16, 1, 1), w_level, np.int8), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.array(0, np.int8), "zw"),
        numpy_helper.from_array(np.array(4096.0, np.float32), "sy"),
        numpy_helper.from_array(np.array(128, np.uint8), "zy"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zx"], ["xq"]),
        helper.make_node("QLinearConv", ["xq", "one", "zx", "w", "one", "zw", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / f"conv_{w_level}.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def test_haswell_kernel_sums_pairs_into_saturating_int16(tmp_path) -> None:
    """255 * 127 * 2 = 64770 > 32767 saturates per pair; 255 * 63 * 2 = 32130 does not."""
    paths = [_qlinearconv(tmp_path, lv) for lv in (127, 64, 63)]
    x = np.full((1, 16, 1, 1), 255, np.float32)
    outs = [o[0].item() for o in run_emulated(paths, x)]
    exact = [255 * lv * 16 for lv in (127, 64, 63)]
    print(f"emulated Haswell QLinearConv: {outs} vs exact {exact}")
    assert abs(outs[0] - 8 * 32767) <= 2048  # 8 saturated pairs (output step 4096)
    assert abs(outs[1] - exact[1]) <= 2048 and abs(outs[2] - exact[2]) <= 2048


def test_avx2_student_is_exact_on_an_emulated_avx2_cpu(tmp_path, digits, trained) -> None:
    xtr, _, xte, _ = digits
    model, _ = trained
    calib = [xtr[i : i + 64] for i in range(0, 256, 64)]
    x = xte[:64]
    res = {}
    paths, refs, tols = [], [], []
    for target in ("x86-avx2", "x86-vnni"):
        q = quantize(model, calibration_loader=calib, calibration_batches=4, target=target).eval()
        paths.append(export_onnx(q, tmp_path / f"{target}.onnx", x[:1]))
        with torch.no_grad():
            refs.append(q(x).numpy())
        tols.append(output_tolerance(q, x, refs[-1]))  # 2 γ_L max|logit| (tests.numerics)
    for target, out, ref, tol in zip(("x86-avx2", "x86-vnni"), run_emulated(paths, x.numpy()), refs, tols):
        res[target] = (top1_agreement(out[0], ref, tol), float(np.abs(out[0] - ref).max()), tol)
    print(f"emulated Haswell, deployed onnxruntime session (agreement, max|d|, tol): {res}")
    agree7, diff7, tol7 = res["x86-avx2"]
    # trained for the CPU class: exact up to float rounding, near-ties of the logits set aside
    assert agree7.rate == 1.0 and diff7 <= tol7, res["x86-avx2"]
    _, diff8, _ = res["x86-vnni"]
    assert diff8 > 100 * max(diff7, 1e-5)  # 8-bit weights on this CPU class: saturated sums


@pytest.mark.skipif(not _has_openvino(), reason="openvino extra not installed")
def test_openvino_on_an_emulated_avx2_cpu_matches_its_vnni_result_for_avx2_students(
    tmp_path, digits, trained
) -> None:
    """OpenVINO (oneDNN) without VNNI also loses exactness on 8-bit weights; 7-bit weights
    give the very numbers it computes on this (native) CPU."""
    import openvino as ov

    xtr, _, xte, _ = digits
    model, _ = trained
    calib = [xtr[i : i + 64] for i in range(0, 256, 64)]
    x = xte[:64].numpy()
    qs = [quantize(model, calibration_loader=calib, calibration_batches=4, target=t).eval()
          for t in ("x86-avx2", "x86-vnni")]
    paths = [export_onnx(q, tmp_path / f"{t}.onnx", xte[:1]) for q, t in zip(qs, ("x86-avx2", "x86-vnni"))]
    core = ov.Core()
    native = []
    for p in paths:
        m = core.read_model(str(p))
        m.reshape({m.inputs[0].get_any_name(): list(x.shape)})
        c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
        native.append(np.asarray(next(iter(c.create_infer_request().infer({0: x}).values()))))
    emulated = [o[0] for o in run_emulated(paths, x, runtime="openvino")]
    d7, d8 = (float(np.abs(e - n).max()) for e, n in zip(emulated, native))
    with torch.no_grad():  # two float32 roundings of one network: 2 γ_L max|logit| (tests.numerics)
        tol7 = output_tolerance(qs[0], xte[:64], qs[0](xte[:64]))
    print(f"OpenVINO emulated Haswell vs native, max|d|: x86-avx2 {d7:.3g} (<= {tol7:.3g}), x86-vnni {d8:.3g}")
    assert d7 <= tol7
    assert d8 > 100 * max(d7, 1e-6)
