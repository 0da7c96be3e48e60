"""torch.ao QAT models (eager ``prepare_qat``, FX ``prepare_qat_fx``, converted): understood or refused.

``model_size`` reads fake-quant ranges (prepared) and packed weights (converted),
``set_bit_width`` rewrites fake-quant ranges (prepared, warning that ``convert`` drops
sub-8-bit ranges) or refuses (converted), export of a model prepared for post-training
quantization says to convert it, a converted model exports and verifies, and nothing
ends in a bare ``StopIteration``. The QDQ export of QAT-prepared models is tested in
``tests/export/test_torch_ao.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization import quantize_fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from qtemperate.errors import QtemperateWarning
from qtemperate.export import export_onnx, verify_onnx
from qtemperate.quantization import get_bit_widths, quantize, set_bit_width
from qtemperate.size import model_size
from tests.ao_helpers import AoNet, prepared_ao, train_ao

torch.set_num_threads(1)
# torch.ao's own deprecation notices (reduce_range, quantized tensor creation)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def eager(digits) -> nn.Module:  # type: ignore[no-untyped-def]
    return prepared_ao("eager", digits)


@pytest.fixture(scope="module")
def fx_prepared(digits) -> nn.Module:  # type: ignore[no-untyped-def]
    return prepared_ao("fx", digits)


def _bits(fq: nn.Module) -> int:
    return math.ceil(math.log2(fq.quant_max - fq.quant_min + 1))


def _independent_prepared_bytes(model: nn.Module) -> float:
    """Weights at their fake-quant range + one float32 scale per channel; all else float32."""
    total = 0.0
    for _, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            wfq = m._modules.get("weight_fake_quant")
            if pname == "weight" and wfq is not None:
                total += p.numel() * _bits(wfq) / 8 + 4 * wfq.scale.numel()
            else:
                total += 4 * p.numel()
    return total


def _independent_converted_bytes(model: nn.Module) -> tuple[float, int]:
    """Packed int8 weights (from ``int_repr``) + float32 scales + float32 biases."""
    total, params = 0.0, 0
    for m in model.modules():
        if type(m).__module__.startswith("torch.ao.nn") and callable(getattr(m, "weight", None)):
            w = m.weight()
            ints = w.int_repr()
            scales = (
                w.q_per_channel_scales()
                if w.qscheme() == torch.per_channel_affine
                else torch.ones(1)
            )
            b = m.bias()
            total += ints.numel() * ints.element_size() + 4 * scales.numel() + 4 * b.numel()
            params += ints.numel() + b.numel()
    return total, params


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_prepared_sizes_read_fake_quant_ranges(flow: str, eager, fx_prepared) -> None:  # type: ignore[no-untyped-def]
    model = eager if flow == "eager" else fx_prepared
    size = model_size(model)
    assert size.bits["fc"] == 8  # was 32: every fake-quantized layer counted as float
    assert size.quantized_bytes == pytest.approx(_independent_prepared_bytes(model), rel=1e-9)
    assert size.compression_ratio < 0.6


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_set_bit_width_rewrites_fake_quant_ranges(flow: str, eager, fx_prepared, digits) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(eager if flow == "eager" else fx_prepared)
    before = get_bit_widths(model)
    with pytest.warns(QtemperateWarning, match=r"convert.*not the model trained.*export_onnx"):
        set_bit_width(model, 4, 4)
    after = get_bit_widths(model)
    # the inner conv switches; first conv and classifier keep theirs; so does the input quantizer
    assert after["conv2"]["weight"] == 4 and before["conv2"]["weight"] == 8
    assert after["conv1"]["weight"] == 8 and after["fc"]["weight"] == 8
    assert (
        model.conv2.weight_fake_quant.quant_min == -8
        and model.conv2.weight_fake_quant.quant_max == 7
    )
    acts = [
        m
        for n, m in model.named_modules()
        if isinstance(m, FakeQuantizeBase) and not n.endswith("weight_fake_quant")
    ]
    inputs = [m for m in acts if _bits(m) != 4]
    assert len(inputs) == 1  # the model-input quantizer keeps its range (7 bits: reduce_range)
    # the fake-quant now really has 16 levels and training continues
    model.eval()
    with torch.no_grad():
        w = model.conv2.weight_fake_quant(model.conv2.weight)
        scale = model.conv2.weight_fake_quant.scale.view(-1, 1, 1, 1)
    assert torch.unique(torch.round(w / scale)).numel() <= 16
    train_ao(model, digits, steps=3)
    assert model_size(model).bits["conv2"] == 4


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_converted_models_size_refuse_bits_export_and_verify(
    flow: str, eager, fx_prepared, digits, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    prepared = eager if flow == "eager" else fx_prepared
    convert = tq.convert if flow == "eager" else quantize_fx.convert_fx
    converted = convert(copy.deepcopy(prepared).eval())
    x = digits[2][:256]
    size = model_size(converted, x[:1])
    expected, params = _independent_converted_bytes(converted)
    assert size.params == params > 0  # was 0: packed weights are no nn.Parameter
    assert size.quantized_bytes == pytest.approx(expected, rel=1e-9)
    assert size.macs == model_size(prepared, x[:1]).macs  # the same convolutions
    with pytest.raises(ValueError, match=r"converted.*before torch\.ao\.quantization\.convert"):
        set_bit_width(converted, 4, 4)
    path = export_onnx(converted, tmp_path / "converted.onnx", x[:1])  # was: bare StopIteration
    rep = verify_onnx(path, converted, x)
    # two int8 engines (fbgemm/qnnpack vs onnxruntime) may round a requantization differently
    assert rep.top1_agreement >= 0.97


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_exporting_a_model_prepared_for_ptq_says_to_convert_it(flow: str, tmp_path) -> None:
    """Observers only: its forward is float, so its export would not be the quantized model.
    (QAT-prepared models export as QDQ graphs: tests/export/test_torch_ao.py.)"""
    x = torch.randn(8, 1, 8, 8)
    if flow == "eager":
        m = AoNet().eval()
        m.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(m)
    else:
        prepared = quantize_fx.prepare_fx(AoNet().eval(), tq.get_default_qconfig_mapping("x86"), (x[:1],))
    what = "convert_fx" if flow == "fx" else "torch.ao.quantization.convert"
    with pytest.raises(ValueError, match=f"post-training quantization.*{what}"):
        export_onnx(prepared, tmp_path / "prepared.onnx", x[:1])
    assert not (tmp_path / "prepared.onnx").exists()


def test_quantize_refuses_a_torch_ao_model_and_says_what_works(eager) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"torch\.ao prepared model.*set_bit_width"):
        quantize(eager)


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_a_model_prepared_for_post_training_quantization_is_refused_not_ignored(flow: str) -> None:
    """Observers only: the forward is float, so set_bit_width cannot be a silent no-op."""
    x = torch.randn(8, 1, 8, 8)
    if flow == "eager":
        m = AoNet().eval()
        m.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(m)
    else:
        prepared = quantize_fx.prepare_fx(AoNet().eval(), tq.get_default_qconfig_mapping("x86"), (x[:1],))
    prepared(x)
    before = copy.deepcopy(prepared.state_dict())
    with pytest.raises(ValueError, match=r"post-training quantization.*qconfig"):
        set_bit_width(prepared, 4, 4)
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # nothing in its forward is quantized: every weight counts at 32 bits
    size = model_size(prepared)
    assert set(size.bits.values()) == {32}
    assert size.quantized_bytes == 4 * sum(p.numel() for p in prepared.parameters())
