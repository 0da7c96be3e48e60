"""Entering a stage: float stays float, the first quantized stage quantizes, later ones switch in place."""

from __future__ import annotations

import torch

from qtemperate.joint_scheduler import BitStage
from qtemperate.models import build_model
from qtemperate.quantization import get_quant_config, is_quantized
from qtemperate.recipe import StudentConfig
from qtemperate.training.stages import enter_stage

CPU = torch.device("cpu")


def test_stage_sequence() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    cfg = StudentConfig(calibration_batches=2)
    calib = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))] * 2
    same = enter_stage(model, BitStage("float", 1), False, cfg, CPU, calib)
    assert same is model and not is_quantized(model)
    q = enter_stage(model, BitStage("w8a8", 1, 8, 8), False, cfg, CPU, calib)
    assert q is not model and is_quantized(q) and not is_quantized(model)
    assert get_quant_config(q).weight_bits == 8
    q4 = enter_stage(q, BitStage("w4a4", 1, 4, 4), True, cfg, CPU, calib)
    assert q4 is q
    c = get_quant_config(q4)
    assert (c.weight_bits, c.act_bits, c.first_last_bits) == (4, 4, 8)


def test_first_quantized_stage_prints_and_writes_the_quantization_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    cfg = StudentConfig(calibration_batches=1)
    calib = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))]
    lines: list[str] = []
    q = enter_stage(model, BitStage("w8a8", 1, 8, 8), False, cfg, CPU, calib, report_dir=tmp_path, say=lines.append)
    written = json.loads((tmp_path / "quantization_report.json").read_text())
    assert written["fully_quantized"] and written["float_ops"] == []
    assert {r["name"] for r in written["rows"]} >= {"conv1", "relu1", "fc"}
    assert len(lines) == 1 and "w8a8" in lines[0] and "operations quantized" in lines[0]
    # later stages switch bits in place and say nothing more
    enter_stage(q, BitStage("w4a4", 1, 4, 4), True, cfg, CPU, calib, report_dir=tmp_path, say=lines.append)
    assert len(lines) == 1
