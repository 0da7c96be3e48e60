"""qtemperate.export.torch_ao: a QAT-prepared torch.ao model below 8 bits exports as the model trained.

torch.ao's ``convert`` drops the 4-bit ranges (issue 20: 87.5 % / 89.1 % top-1 agreement
with the trained model); ``export_onnx`` writes the prepared model's fake-quants as
``QuantizeLinear -> Clip -> DequantizeLinear`` instead. The export is checked against
the fake-quant model sample by sample, setting aside the samples where the two float
computations may legitimately round a quantizer the other way (see :func:`_near_ties`).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.ao.quantization as tq
from onnx import TensorProto, numpy_helper
from torch import nn
from torch.ao.quantization import quantize_fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from qtemperate.errors import QtemperateWarning
from qtemperate.export import export_onnx, verify_onnx
from qtemperate.quantization import set_bit_width
from tests.ao_helpers import AoNet, prepared_ao, train_ao
from tests.onnx_helpers import check_agreement_warning

torch.set_num_threads(1)
# torch.ao's own deprecation notices (reduce_range, quantized tensor creation)
pytestmark = pytest.mark.filterwarnings("ignore:.*reduce_range.*:UserWarning")

EPS = float(np.finfo(np.float32).eps)
REDUCTION = 8 * 3 * 3 + 8
"""Longest float reduction of AoNet (conv2: 8 channels x 3 x 3 terms; the pool's 64 and the
classifier's 16 are shorter), plus the few element-wise roundings after it (the QAT
conv-bn's division, bias addition and batch norm)."""


@pytest.fixture(scope="module", params=["eager", "fx"])
def w4a4(request, digits) -> tuple[str, nn.Module]:  # type: ignore[no-untyped-def]
    """A prepared model switched to W4A4 (first/last layers and input keep 8 bits), trained on."""
    model = prepared_ao(request.param, digits)
    with pytest.warns(QtemperateWarning, match="convert"):
        set_bit_width(model, 4, 4)
    return request.param, train_ao(model, digits, steps=10, seed=1000).eval()


def _near_ties(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference logits and which samples are near-ties of the computation.

    PyTorch and onnxruntime compute the float parts (convolutions, pools, batch norm) in
    different orders. With unit roundoff ``u = eps / 2``, each result is within
    ``REDUCTION * u * M`` of the exact value (``M``: the sample's largest magnitude entering
    that quantizer, standing for the sum of the terms' magnitudes), so the two are within
    ``delta = REDUCTION * eps * M`` of each other. An activation fake-quant input within
    ``delta`` of one of its rounding boundaries ``(k + 1/2 - z) s``, ``q_min <= k < q_max``
    (exact ties included: FX quantizes the pool's average of grid values with the scale of
    its input, so sums of ``32 mod 64`` levels land on them) may round to the neighbouring
    level in the other runtime: the sample is a quantizer near-tie. Otherwise both runtimes
    hold the same integers everywhere and the logits differ by float rounding only: a
    sample is a logit near-tie when its top-1 margin is below ``delta`` of the logits
    (equal top logits included). The quantizer of the model input reads the same numbers
    in both runtimes: only ONNX's ``x / s`` against torch's ``x * (1 / s)`` differs, by at
    most ``1.5 eps |x / s|``, so its ``delta`` is ``2 eps M``. Weights are not checked:
    their integers are computed once, at export, with torch's own formula.

    Returns:
        ``(logits, quantizer_tie, logit_tie, logit_delta)``, the last three per sample.
    """
    ref = copy.deepcopy(model).eval()
    ref.apply(tq.disable_observer)
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach())))
        for name, m in ref.named_modules()
        if isinstance(m, FakeQuantizeBase) and not name.endswith("weight_fake_quant")
    ]
    with torch.no_grad():
        logits = ref(x).numpy().astype(np.float64)
    for h in hooks:
        h.remove()
    qtie = np.zeros(len(x), bool)
    for fq, inp in seen:
        s, z = float(fq.scale), int(fq.zero_point)
        lo, hi = fq.activation_post_process.quant_min, fq.activation_post_process.quant_max
        v = inp.double().reshape(len(x), -1).numpy()
        u = v / s + z  # in steps; boundaries at k + 1/2
        boundary = np.clip(np.floor(u) + 0.5, lo + 0.5, hi - 0.5)
        terms = 2 if inp.data_ptr() == x.data_ptr() else REDUCTION  # 2: the model input itself
        delta = terms * EPS * np.abs(v).max(1, keepdims=True)
        qtie |= (np.abs(u - boundary) * s <= delta).any(1)
    top2 = np.sort(logits, 1)[:, -2:]
    out_delta = REDUCTION * EPS * np.abs(logits).max(1)
    return logits, qtie, (top2[:, 1] - top2[:, 0]) <= out_delta, out_delta


def _ort(path, x: torch.Tensor, optimized: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)


def test_w4a4_export_is_the_fake_quant_model(w4a4, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    flow, model = w4a4
    x = digits[2]  # all 597 held-out digits
    before = copy.deepcopy(model.state_dict())
    path = export_onnx(model, tmp_path / f"{flow}_w4a4.onnx", x[:1])
    rep = verify_onnx(path, model, x)
    # neither the export nor the check moved the model (its fake-quants observe on every call)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    logits, qtie, ltie, out_delta = _near_ties(model, x)
    keep = ~(qtie | ltie)
    converted = (tq.convert if flow == "eager" else quantize_fx.convert_fx)(copy.deepcopy(model))
    with torch.no_grad():
        conv_agree = float(np.mean(converted(x).numpy().argmax(1) == logits.argmax(1)))
    for optimized in (False, True):
        got = _ort(path, x, optimized)
        hit = got.argmax(1) == logits.argmax(1)
        kept = float(hit[keep].mean())
        session = "deployed" if optimized else "graph"
        print(f"{flow} W4A4 {session}: agreement {hit.mean():.4f} on all {len(x)}, {kept:.4f} on "
              f"{keep.sum()} kept ({qtie.sum()} quantizer near-ties, {(ltie & ~qtie).sum()} more logit "
              f"near-ties set aside); torch.ao convert: {conv_agree:.4f}")
        # the worst-case bound over ~1,000 activations a sample sets many aside (FX also
        # quantizes pool averages that sit exactly on boundaries); a third must remain
        assert keep.sum() >= len(x) // 3
        assert kept >= 0.99
        exact = (np.abs(got - logits).max(1) <= out_delta)[keep]
        print(f"  logits within float rounding on {exact.sum()}/{keep.sum()} kept samples")
        if not optimized:
            # the graph holds the same integers everywhere: its logits differ by float rounding only
            assert exact.all()
        # (the optimized session may fuse DQ-Gemm-Q into QGemm, which rounds the float bias to
        # the int32 grid s_x * s_w itself: a level of difference, no top-1 flip allowed above)
        agreement = rep.top1_agreement if optimized else rep.graph_agreement
        assert agreement == pytest.approx(float(hit.mean()), abs=0)  # verify_onnx says the same


def test_weights_are_stored_as_the_integers_of_torch_fake_quant(w4a4, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """conv2 (inner: 4 bits) is packed INT4, conv1/fc (first/last: 8 bits) INT8; every weight
    ``DequantizeLinear`` gives back exactly what the weight fake-quant fed its layer."""
    flow, model = w4a4
    path = export_onnx(model, tmp_path / f"{flow}.onnx", digits[2][:1])
    g = onnx.load(str(path))
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == 21
    inits = {i.name: i for i in g.graph.initializer}
    dequantized = {}
    for n in g.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type != TensorProto.INT32:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 else 0.0
            shape = (-1,) + (1,) * (q.ndim - 1)
            w = ((q - np.reshape(zp, shape) if np.ndim(zp) else q - zp).astype(np.float32) * s.reshape(shape))
            dequantized[q.shape] = (inits[n.input[0]].data_type, w)
    fed = {}
    ref = copy.deepcopy(model)
    ref.apply(tq.disable_observer)
    for name in ("conv1", "conv2", "fc"):
        ref.get_submodule(name).weight_fake_quant.register_forward_hook(
            lambda mod, args, out, name=name: fed.__setitem__(name, out.detach().numpy()))
    with torch.no_grad():
        ref(digits[2][:2])
    kinds = {name: dequantized[w.shape][0] for name, w in fed.items()}
    assert kinds == {"conv1": TensorProto.INT8, "conv2": TensorProto.INT4, "fc": TensorProto.INT8}
    for name, w in fed.items():
        assert np.array_equal(dequantized[w.shape][1], w), name
    # the 4-bit activation ranges are in the graph: Clip(0, 15) on uint8
    clips = {
        (int(numpy_helper.to_array(inits[n.input[1]])), int(numpy_helper.to_array(inits[n.input[2]])))
        for n in g.graph.node if n.op_type == "Clip"
    }
    assert (0, 15) in clips


def test_verify_warns_below_99_percent_on_torch_ao(w4a4, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    flow, model = w4a4
    path = export_onnx(model, tmp_path / f"{flow}.onnx", digits[2][:1])
    check_agreement_warning(path, model, digits[2], tmp_path)


def test_a_fake_quant_it_cannot_write_exactly_is_named(tmp_path) -> None:
    """A learnable fake-quant keeps a float zero point: refused by name, no file written."""
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    m = AoNet().train()
    act = _LearnableFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        scale=0.1, zero_point=0.0,
    )
    m.qconfig = tq.QConfig(activation=act, weight=tq.default_weight_fake_quant)
    prepared = tq.prepare_qat(m)
    prepared(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match=r"quant\.activation_post_process: _LearnableFakeQuantize"):
        export_onnx(prepared, tmp_path / "learnable.onnx", torch.randn(1, 1, 8, 8))
    assert not (tmp_path / "learnable.onnx").exists()
