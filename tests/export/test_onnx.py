"""Tests for qtemperate.export.onnx / qcdq / runtime: QCDQ/float ONNX export, onnxruntime agreement, int4 packing, timing."""

from __future__ import annotations

import copy

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
from tests.numerics import assert_runtime_exact
from tests.onnx_helpers import check_agreement_warning

torch.set_num_threads(1)




def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.numerics
def test_int8_export_agrees_with_pytorch_on_256_real_images(tmp_path, digits, trained) -> None:
    """CPU class: any (the detected one); the student is trained for it (``target="auto"``)."""
    _, _, xte, yte = digits
    _, q = trained
    path = export_onnx(q, tmp_path / "q8.onnx", xte[:1])
    assert path.exists()
    report = verify_onnx(path, q, xte[:256])
    assert isinstance(report, VerifyReport)
    print(f"int8 ONNX vs PyTorch: {report}")
    assert report.n == 256
    _quantized_agrees(path, q, xte[:256], report)
    assert set(report.outputs) == {"logits"}
    assert report.outputs["logits"].deployed.agreement == report.top1_agreement
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


@pytest.mark.parametrize("kind", ["hand-written float", "qtemperate int8"])
def test_verify_warns_below_99_percent_for_any_model(kind, tmp_path, digits, trained) -> None:
    """253/256 agreeing samples warn (98.83 % in the message and the report), 254/256 do not.

    (torch.ao eager/FX: tests/export/test_torch_ao.py; stock Brevitas: tests/quantization/test_foreign.py.)
    """
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
        if kind == "hand-written float"
        else trained[1]
    )
    path = export_onnx(model, tmp_path / "m.onnx", digits[2][:1])
    check_agreement_warning(path, model, digits[2], tmp_path)


@pytest.mark.numerics
def test_float_export_matches_pytorch(tmp_path, digits, trained) -> None:
    _, _, xte, _ = digits
    model, _ = trained
    path = export_onnx(model, tmp_path / "float.onnx", xte[:1])
    report = verify_onnx(path, model, xte[:256])
    assert_runtime_exact(path, model, xte[:256], report)  # float rounding only, near-ties set aside


@pytest.mark.numerics
def test_4bit_export_packs_int4_and_halves_the_weight_bytes(tmp_path, digits) -> None:
    xtr, _, xte, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=32).eval()
    q = quantize(model, calibration_loader=[xtr[:128]], calibration_batches=1, target="auto").eval()
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
    _quantized_agrees(p4, q, xte[:256], report)


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


def _quantized_agrees(path, model, x, report) -> None:  # type: ignore[no-untyped-def]
    """Both sessions' top-1 agrees with PyTorch, near-ties set aside, 1 % allowed as before.

    A value that lies on a level boundary may round apart in onnxruntime's requantization
    and PyTorch's (a whole level: 0.017-0.039 in a logit measured in the graph and the
    deployed sessions when the model was trained under ATEN_CPU_CAPABILITY=avx2/default),
    so no float bound on |Δ| is claimed here (tests.numerics).
    """
    assert_runtime_exact(path, model, x, report, bounded_diff=False, min_agreement=0.99)


@pytest.mark.numerics
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
        target="auto",  # exact on the CPU class running the test
    )
    steps(q, 15, 1e-3, 200)
    p8 = export_onnx(q, tmp_path / "w8a8.onnx", xte[:1])
    r8 = verify_onnx(p8, q, xte[:256])
    _quantized_agrees(p8, q, xte[:256], r8)
    set_bit_width(q, 4, 4)
    steps(q, 15, 1e-3, 300)
    p4 = export_onnx(q, tmp_path / "w4a4.onnx", xte[:1])
    r4 = verify_onnx(p4, q, xte[:256])
    print(f"pruned student ONNX vs PyTorch: W8A8 {r8}, W4A4 {r4}")
    assert r8.n == r4.n == 256
    _quantized_agrees(p4, q, xte[:256], r4)
    # the 4-bit graph as written: float rounding only, no level moved (the int32 bias grid)
    assert_runtime_exact(p4, q, xte[:256], r4, sessions=("graph",))
    assert optimized_op_types(p4)["QLinearConv"] >= 1  # the 4-bit graph still runs int kernels


# --------------------------------------------------------------------------- several outputs
class ToyDetector(nn.Module):
    """A class head and a box head on one backbone; ``forward`` returns a dict (or a tuple)."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.cls = nn.Linear(16, 10)
        self.box = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor):
        f = self.backbone(x)
        if self.as_tuple:
            return self.cls(f), self.box(f)
        return {"class": self.cls(f), "box": self.box(f)}


def _boxes(x: torch.Tensor) -> torch.Tensor:
    """A box-like regression target: centre of mass and spread of the bright pixels."""
    w = (x[:, 0] > 0).float() + 1e-3
    rows = torch.arange(x.shape[-2], dtype=torch.float32)[None, :, None]
    cols = torch.arange(x.shape[-1], dtype=torch.float32)[None, None, :]
    m = w.sum((1, 2))
    r, c = (w * rows).sum((1, 2)) / m, (w * cols).sum((1, 2)) / m
    return torch.stack([r, c, ((w * (rows - r[:, None, None]) ** 2).sum((1, 2)) / m).sqrt(),
                        ((w * (cols - c[:, None, None]) ** 2).sum((1, 2)) / m).sqrt()], 1) / 8


@pytest.fixture(scope="module")
def detector(digits) -> tuple[nn.Module, nn.Module]:
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = ToyDetector()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(100):
        idx = torch.randint(0, len(ytr), (64,), generator=torch.Generator().manual_seed(step))
        out = model(xtr[idx])
        loss = F.cross_entropy(out["class"], ytr[idx]) + F.mse_loss(out["box"], _boxes(xtr[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    q = quantize(model, calibration_loader=[xtr[i : i + 64] for i in range(0, 256, 64)],
                 calibration_batches=4, target="auto")
    return model, q.eval()


@pytest.mark.numerics
def test_dict_outputs_keep_their_names_and_are_verified_per_output(tmp_path, digits, detector) -> None:
    """CPU class: any (the detected one; the student is trained for it)."""
    _, _, xte, _ = digits
    model, q = detector
    for name, m in (("float", model), ("int8", q)):
        path = export_onnx(m, tmp_path / f"det_{name}.onnx", xte[:1])
        g = onnx.load(str(path)).graph
        assert [o.name for o in g.output] == ["class", "box"]
        assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in g.output)
        rep = verify_onnx(path, m, xte[:128])
        print(f"detector {name}: {rep}")
        assert set(rep.outputs) == {"class", "box"}
        cls, box = rep.outputs["class"], rep.outputs["box"]
        assert box.deployed.agreement is None and box.graph.agreement is None  # a box is not a class
        assert rep.top1_agreement == cls.deployed.agreement
        assert rep.max_abs_diff == max(cls.deployed.max_abs_diff, box.deployed.max_abs_diff)
        # both heads, both sessions; float: rounding only (tests.numerics), near-ties set aside;
        # int8: a level on a rounding boundary may flip (test_int8_export_agrees_...)
        exact = name == "float"
        checks = assert_runtime_exact(path, m, xte[:128], rep, bounded_diff=exact,
                                      min_agreement=1.0 if exact else 0.99)
        if not exact:
            assert box.deployed.max_abs_diff < 0.1  # a flipped level at most, not a broken head
        assert checks["deployed"]["box"].agreement is None and checks["deployed"]["class"].agreement is not None
    assert optimized_op_types(tmp_path / "det_int8.onnx")["QGemm"] == 2  # both heads on int kernels


@pytest.mark.numerics
def test_tuple_outputs_are_numbered_and_classification_can_be_named(tmp_path, digits, detector) -> None:
    _, _, xte, _ = digits
    model, _ = detector
    tup = ToyDetector(as_tuple=True)
    tup.load_state_dict(model.state_dict())
    tup.eval()
    path = export_onnx(tup, tmp_path / "tuple.onnx", xte[:1])
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output_0", "output_1"]
    rep = verify_onnx(path, tup, xte[:64])
    assert rep.top1_agreement is None  # generic names: nothing is taken for classes
    rep = verify_onnx(path, tup, xte[:64], classification_outputs=["output_0"])
    assert rep.top1_agreement is not None and rep.outputs["output_1"].deployed.agreement is None
    assert_runtime_exact(path, tup, xte[:64], rep, classes=("output_0",))  # near-ties set aside


def test_unsupported_outputs_are_named(tmp_path, digits) -> None:
    _, _, xte, _ = digits

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return {"a": (y, y)}

    with pytest.raises(ValueError, match="must all be tensors"):
        export_onnx(Nested(), tmp_path / "n.onnx", xte[:1])


# --------------------------------------------------------------------------- graph and bytes
@pytest.fixture(scope="module")
def resnet20_q(digits) -> nn.Module:
    xtr, _, _, _ = digits
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # BatchNorm statistics of a trained model: non-zero folded biases
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return quantize(model, calibration_loader=[xtr[:64]], calibration_batches=1, target="auto").eval()


@pytest.mark.numerics
def test_resnet20_optimized_graph_keeps_only_boundary_quantizers(tmp_path, digits, resnet20_q) -> None:
    """After onnxruntime's optimizer: one QuantizeLinear (the input), no DequantizeLinear left.

    Residual adds quantize only the inputs that are not already quantized: the identity
    shortcut (a ReLU output) is added as it is, so no DQ -> Q requantization remains
    between the fused QLinearConv / QLinearAdd kernels.
    """
    _, _, xte, _ = digits
    path = export_onnx(resnet20_q, tmp_path / "r20.onnx", xte[:1])
    ops = optimized_op_types(path)
    print(f"ResNet-20 W8A8 after onnxruntime's optimizer: {dict(ops)}")
    assert ops["QLinearConv"] == 21 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0
    assert ops["Conv"] == ops["Gemm"] == ops["Add"] == 0
    rep = verify_onnx(path, resnet20_q, xte[:64])
    # Random weights and BatchNorm statistics put some requantized values on a rounding
    # boundary, where onnxruntime's requantization and PyTorch's go either way (a whole
    # level, max |Δ| ~ 0.05 measured): top-1 is claimed, near-ties set aside, not |Δ|.
    assert_runtime_exact(path, resnet20_q, xte[:64], rep, bounded_diff=False, min_agreement=0.99)


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet20_onnx_bytes_within_1_2x_params_times_bits(tmp_path, digits, resnet20_q, bits) -> None:
    from qtemperate.export import onnx_byte_breakdown
    from qtemperate.quantization import get_quant_config

    _, _, xte, _ = digits
    q = resnet20_q if bits == 8 else set_bit_width(copy.deepcopy(resnet20_q), 4, 4)
    path = export_onnx(q, tmp_path / f"r20_{bits}.onnx", xte[:1])
    params = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in q.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    bd = onnx_byte_breakdown(path, params, bits)
    print(f"ResNet-20 W{bits}: {bd}")
    assert sum(bd["parts"].values()) == bd["file_bytes"] == path.stat().st_size
    assert bd["limit_bytes"] == params * bits / 8
    assert bd["ratio_to_limit"] <= 1.2
    assert get_quant_config(q).weight_bits <= bits
