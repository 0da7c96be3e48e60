"""Tests for qtemperate.quantization.targets: the per-target ranges travel with the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtemperate.models import build_model
from qtemperate.quantization import (
    get_bit_widths,
    get_quant_config,
    quantize,
    set_bit_width,
)
from qtemperate.quantization.targets import TARGET_ATTR, DeploymentTargetTag, model_target


def _weights(q: nn.Module) -> dict[str, int | None]:
    return {k: v["weight"] for k, v in get_bit_widths(q).items() if v["weight"] is not None}


def _max_int_weight(q: nn.Module) -> int:
    levels = []
    for m in q.modules():
        if hasattr(m, "quant_weight") and getattr(m, "weight_quant", None) is not None:
            qw = m.quant_weight()
            levels.append(int(torch.round(qw.value / qw.scale).abs().max()))
    return max(levels)


@pytest.fixture()
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, width=8).eval()


def test_avx2_caps_every_layer_at_7_bits_and_keeps_activations(cnn) -> None:
    q = quantize(cnn, 8, 8, first_last_bits=8, target="x86-avx2")
    assert set(_weights(q).values()) == {7}  # first and last included
    assert _max_int_weight(q) == 63
    assert get_quant_config(q).target == "x86-avx2"
    assert get_quant_config(q).act_bits == 8 and get_quant_config(q).input_bits == 8
    set_bit_width(q, 8, 8)  # asking for 8 keeps the cap
    assert set(_weights(q).values()) == {7} and _max_int_weight(q) == 63
    set_bit_width(q, 4, 4)
    bits = get_quant_config(q)
    assert (bits.weight_bits, bits.first_last_bits, bits.act_bits) == (4, 7, 4)


def test_exact_targets_keep_8_bits_and_none_means_as_asked(cnn) -> None:
    for target in ("x86-vnni", "arm64", None):
        q = quantize(cnn, 8, 8, target=target)
        assert set(_weights(q).values()) == {8} and _max_int_weight(q) == 127
        assert get_quant_config(q).target == target
    assert model_target(quantize(cnn, 8, 8, target="generic")) == "generic"


def test_auto_resolves_to_the_detected_target(monkeypatch, cnn) -> None:
    monkeypatch.setenv("QTEMPERATE_TARGET", "x86-avx2")
    assert get_quant_config(quantize(cnn, target="auto")).target == "x86-avx2"
    monkeypatch.setenv("QTEMPERATE_TARGET", "arm64")
    assert get_quant_config(quantize(cnn, target="auto")).target == "arm64"
    with pytest.raises(ValueError, match="allowed"):
        quantize(cnn, target="sse2")


def test_retarget_with_set_bit_width_caps_first_and_last(cnn) -> None:
    q = quantize(cnn, 8, 8, target="x86-vnni")
    set_bit_width(q, 8, 8, target="x86-avx2")
    assert set(_weights(q).values()) == {7} and model_target(q) == "x86-avx2"


def test_target_travels_in_the_state_dict(cnn) -> None:
    q = quantize(cnn, 8, 8, target="x86-avx2", calibration_loader=[torch.randn(16, 1, 8, 8)])
    sd = q.state_dict()
    assert sd[f"{TARGET_ATTR}.code"].dtype == torch.int8
    fresh = quantize(cnn, 8, 8)  # no target yet
    fresh.load_state_dict(sd)
    assert model_target(fresh) == "x86-avx2"
    set_bit_width(fresh, 8, 8)
    assert set(_weights(fresh).values()) == {7}
    # a state_dict saved before targets existed still loads (strict) and changes nothing
    old = {k: v for k, v in sd.items() if not k.startswith(TARGET_ATTR)}
    other = quantize(cnn, 8, 8, target="arm64")
    other.load_state_dict(old)
    assert model_target(other) == "arm64"
    bad = dict(sd)
    bad[f"{TARGET_ATTR}.code"] = torch.tensor([99], dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown deployment target code 99"):
        other.load_state_dict(bad)


def test_student_file_knows_its_target(tmp_path, cnn) -> None:
    from qtemperate.checkpoint import load_student, save_student

    q = quantize(cnn, 8, 8, target="x86-avx2", calibration_loader=[torch.randn(16, 1, 8, 8)]).eval()
    save_student(tmp_path / "student.pt", cnn, q, 8, 8, 8, True, arch_model="small_cnn",
                 arch_kwargs={"num_classes": 10, "in_channels": 1, "width": 8})
    back, _ = load_student(tmp_path / "student.pt")
    assert get_quant_config(back).target == "x86-avx2"
    assert set(_weights(back).values()) == {7}
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x))


def test_tag_is_inert_inside_a_sequential() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    q = quantize(seq, target="x86-avx2").eval()
    assert isinstance(getattr(q, TARGET_ATTR), DeploymentTargetTag)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = q(x)
        out = x
        for name, m in q.named_children():
            if name != TARGET_ATTR:
                out = m(out)
    torch.testing.assert_close(y, out)
    assert sum(p.numel() for p in getattr(q, TARGET_ATTR).parameters()) == 0
