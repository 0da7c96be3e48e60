"""Tests for qtemperate.export.onnx / qcdq / runtime: QCDQ/float ONNX export, onnxruntime agreement, int4 packing, timing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from qtemperate.export import (
    INT4_OPSET,
    VerifyReport,
    benchmark_onnx,
    export_onnx,
    optimized_op_types,
    verify_onnx,
)
from qtemperate.models import build_model
from qtemperate.quantization import quantize, set_bit_width

torch.set_num_threads(1)




def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def test_int8_export_agrees_with_pytorch_on_256_real_images(tmp_path, digits, trained) -> None:
    _, _, xte, yte = digits
    _, q = trained
    path = export_onnx(q, tmp_path / "q8.onnx", xte[:1])
    assert path.exists()
    report = verify_onnx(path, q, xte[:256])
    assert isinstance(report, VerifyReport)
    print(f"int8 ONNX vs PyTorch: {report}")
    assert report.n == 256
    assert report.top1_agreement >= 0.99
    assert 0.0 <= report.max_abs_diff < 0.5
    # the same comparison batched through an iterable of (x, y) pairs
    batched = verify_onnx(path, q, [(xte[i : i + 64], yte[i : i + 64]) for i in range(0, 256, 64)])
    assert batched.n == 256 and batched.top1_agreement == report.top1_agreement


def test_int8_export_runs_integer_kernels_with_int32_bias(tmp_path, digits, trained) -> None:
    _, _, xte, _ = digits
    _, q = trained
    path = export_onnx(q, tmp_path / "q8.onnx", xte[:1])
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input]
    assert graph_inputs == ["input"]  # no initializers exposed as inputs
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    prod = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 5  # 4 convs + fc in small_cnn
    for node in convs:
        w_dq, b_dq, x_dq = prod[node.input[1]], prod[node.input[2]], prod[node.input[0]]
        assert w_dq.op_type == b_dq.op_type == x_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].data_type == TensorProto.INT8
        assert inits[b_dq.input[0]].data_type == TensorProto.INT32
        # bias scale = input scale * per-channel weight scale
        s_x = numpy_helper.to_array(inits[x_dq.input[1]])
        s_w = numpy_helper.to_array(inits[w_dq.input[1]])
        s_b = numpy_helper.to_array(inits[b_dq.input[1]])
        np.testing.assert_allclose(s_b, s_x * s_w, rtol=1e-6)
    ops = optimized_op_types(path)
    assert ops["QLinearConv"] == 4
    assert ops["QLinearAdd"] == 1
    assert ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0 and ops["Gemm"] == 0


def test_float_export_matches_pytorch(tmp_path, digits, trained) -> None:
    _, _, xte, _ = digits
    model, _ = trained
    path = export_onnx(model, tmp_path / "float.onnx", xte[:1])
    report = verify_onnx(path, model, xte[:256])
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff < 1e-4


def test_4bit_export_packs_int4_and_halves_the_weight_bytes(tmp_path, digits) -> None:
    xtr, _, xte, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=32).eval()
    q = quantize(model, calibration_loader=[xtr[:128]], calibration_batches=1).eval()
    p8 = export_onnx(q, tmp_path / "q8.onnx", xte[:1])
    set_bit_width(q, 4, 4)
    p4 = export_onnx(q, tmp_path / "q4.onnx", xte[:1])

    m4 = onnx.load(str(p4))
    assert max(o.version for o in m4.opset_import if o.domain in ("", "ai.onnx")) >= INT4_OPSET
    int4 = [i for i in m4.graph.initializer if i.data_type == TensorProto.INT4]
    int8 = [i for i in m4.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(int4) >= 3  # inner convs (weights + their zero points)
    inner_int4 = [i for i in int4 if np.prod(i.dims) > 64]
    for t in inner_int4:  # two values per byte, all in the narrow 4-bit range
        assert len(t.raw_data) == (int(np.prod(t.dims)) + 1) // 2
        vals = numpy_helper.to_array(t).astype(np.int32)
        assert vals.min() >= -7 and vals.max() <= 7
    # first/last layers stay 8-bit
    assert any(list(i.dims) == [10, 64] for i in int8)
    weight_bytes8 = sum(
        len(i.raw_data) for i in _initializers(p8).values() if i.data_type == TensorProto.INT8
    )
    weight_bytes4 = sum(len(i.raw_data) for i in int4) + sum(len(i.raw_data) for i in int8)
    ratio_weights = weight_bytes4 / weight_bytes8
    ratio_file = p4.stat().st_size / p8.stat().st_size
    print(f"4-bit / 8-bit: weight bytes {ratio_weights:.3f}, file {ratio_file:.3f}")
    assert 0.45 < ratio_weights < 0.6
    # Whole file, with short tensor names (8-bit first/last layers keep it above 0.5).
    assert ratio_file < 0.6

    report = verify_onnx(p4, q, xte[:256])
    print(f"int4 ONNX vs PyTorch: {report}")
    assert report.top1_agreement >= 0.99


def test_benchmark_returns_positive_medians(tmp_path, digits, trained) -> None:
    _, _, xte, _ = digits
    model, q = trained
    for name, m in (("float", model), ("q8", q)):
        path = export_onnx(m, tmp_path / f"{name}.onnx", xte[:1])
        times = benchmark_onnx(path, batch_sizes=(1, 8), warmup=1, iters=3, threads=1)
        assert set(times) == {1, 8}
        assert all(t > 0 for t in times.values())


def test_bad_arguments_raise(tmp_path, digits, trained) -> None:
    _, _, xte, _ = digits
    model, _ = trained
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", xte[:1], opset=9)
    with pytest.raises(ValueError, match="example_input"):
        export_onnx(model, tmp_path / "x.onnx", xte[:1].numpy())
    path = export_onnx(model, tmp_path / "f.onnx", xte[:1])
    with pytest.raises(ValueError, match="iters"):
        benchmark_onnx(path, iters=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        benchmark_onnx(path, batch_sizes=(0,))
    with pytest.raises(ValueError, match="threads"):
        benchmark_onnx(path, threads=0)


def test_pruned_w4a4_student_export_matches_pytorch(tmp_path, digits) -> None:
    """The pipeline path: prune -> W8A8 QAT -> set_bit_width(4, 4) -> QAT -> export.

    The QAT layers round their float bias to the int32 grid ``s_x * s_w`` that the export
    (and onnxruntime's QLinearConv) uses, so the 4-bit graph agrees with PyTorch to float
    rounding instead of flipping whole 4-bit levels near rounding boundaries.
    """
    from qtemperate.pruning import prune

    xtr, ytr, xte, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)

    def steps(m: nn.Module, n: int, lr: float, seed: int) -> None:
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        m.train()
        for step in range(n):
            g = torch.Generator().manual_seed(seed + step)
            idx = torch.randint(0, len(ytr), (64,), generator=g)
            loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()

    steps(model, 80, 1e-2, 0)
    pruned, _ = prune(model, xtr[:8], target_params_ratio=0.6, iterative_steps=4)
    steps(pruned, 20, 5e-3, 100)
    q = quantize(
        pruned.eval(),
        calibration_loader=[xtr[i : i + 64] for i in range(0, 256, 64)],
        calibration_batches=4,
    )
    steps(q, 15, 1e-3, 200)
    p8 = export_onnx(q, tmp_path / "w8a8.onnx", xte[:1])
    r8 = verify_onnx(p8, q, xte[:256])
    set_bit_width(q, 4, 4)
    steps(q, 15, 1e-3, 300)
    p4 = export_onnx(q, tmp_path / "w4a4.onnx", xte[:1])
    r4 = verify_onnx(p4, q, xte[:256])
    print(f"pruned student ONNX vs PyTorch: W8A8 {r8}, W4A4 {r4}")
    for report in (r8, r4):
        assert report.n == 256
        assert report.top1_agreement >= 0.99
        assert report.max_abs_diff < 1e-3  # float rounding only, no flipped levels
    assert optimized_op_types(p4)["QLinearConv"] >= 1  # the 4-bit graph still runs int kernels
