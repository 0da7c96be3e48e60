"""The quantization report: every operation, quantized or float, read from the live model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qtemperate.models import build_model
from qtemperate.quantization import (
    FloatLeftoverError,
    QuantizationReport,
    quantization_report,
    quantize,
    set_bit_width,
)
from qtemperate.quantization.report import quantization_summary
from tests.quantization.architectures import HandAttentionClassifier, MobileNetV2ish
from tests.quantization.test_functional import _Untraceable


def test_quantize_keeps_returning_the_model_and_returns_the_report_on_request() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    q = quantize(model)
    assert isinstance(q, nn.Module)
    _, report = quantize(model, return_report=True)
    assert isinstance(report, QuantizationReport) and report.fully_quantized
    assert [r.name for r in report.rows] == [r.name for r in quantization_report(q).rows]


def test_a_float_model_is_reported_float_with_reasons() -> None:
    report = quantization_report(MobileNetV2ish().eval())
    assert report.rows and not [r for r in report.rows if r.status == "quantized"]
    convs = [r for r in report.rows if r.op == "Conv2d"]
    assert convs and all(r.weight_bits == 32 and r.reason == "not quantized" for r in convs)


def test_the_report_follows_set_bit_width() -> None:
    q = quantize(MobileNetV2ish().eval(), 8, 8)
    assert {r.act_bits for r in quantization_report(q).rows} == {8}
    set_bit_width(q, 4, 3)
    rows = quantization_report(q).rows
    assert {r.act_bits for r in rows} == {3, 8}  # 8: the model input
    assert {r.weight_bits for r in rows if r.weight_bits} == {4, 8}  # 8: first and last layers


def test_strict_names_every_float_leftover() -> None:
    with pytest.raises(FloatLeftoverError) as err:
        quantize(HandAttentionClassifier().eval(), strict=True)
    message = str(err.value)
    assert message.startswith("4 operation(s) stay float")
    for name in ("attn.matmul", "attn.mul", "attn.softmax", "attn.matmul_1"):
        assert name in message
    quantize(MobileNetV2ish().eval(), strict=True)  # fully covered: no error


def test_an_untraceable_model_is_unknown_not_quantized() -> None:
    import brevitas.nn as qnn

    model = _Untraceable()
    model.fc = qnn.QuantLinear(4, 4, bias=True)
    report = quantization_report(model)
    assert not report.traced and not report.fully_quantized
    assert report.rows[-1].status == "unknown" and "not FX-traceable" in report.rows[-1].reason
    with pytest.raises(FloatLeftoverError, match="forward"):
        report.raise_on_float()


def test_format_write_and_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = quantize(HandAttentionClassifier().eval(), 4, 4)
    report = quantization_report(q)
    text = report.format()
    assert "attn.softmax" in text and text.splitlines()[-1].startswith(
        f"{len(report.rows) - 4} of {len(report.rows)}"
    )
    data = json.loads(report.write(tmp_path / "r.json").read_text())
    assert data["float_ops"] == ["attn.matmul", "attn.mul", "attn.softmax", "attn.matmul_1"]
    summary = quantization_summary(q)
    assert summary["float_ops"] == data["float_ops"] and summary["act_bits_used"] == [4, 8]
    assert summary["quantized_ops"] == len(report.rows) - 4
    assert quantization_summary(torch.nn.Linear(2, 2))["act_bits_used"] == []
