"""Entering a bit-width stage: quantize once, then switch bits in place.

The first quantized stage turns the float student into a Brevitas QAT model
(:func:`~qtemperate.quantization.quantize`, calibrated on a fixed slice of training
data) and, when given a run folder, prints its quantization report (what is quantized,
what stays float and why) and writes it to ``quantization_report.json``; every later stage
lowers the bit widths in place (:func:`~qtemperate.quantization.set_bit_width`), keeping
weights and learned ranges (ranges a previous stage froze learn again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.joint_scheduler import BitStage
from qtemperate.quantization import quantize, set_bit_width
from qtemperate.quantization.freeze import activation_ranges_frozen, freeze_activation_ranges
from qtemperate.quantization.report import REPORT_FILE
from qtemperate.recipe import StudentConfig

__all__ = ["enter_stage"]


def enter_stage(
    student: nn.Module,
    stage: BitStage,
    quantized_now: bool,
    config: StudentConfig,
    device: torch.device,
    calibration: Iterable[Any] | None = None,
    report_dir: str | Path | None = None,
    say: Callable[[str], None] | None = None,
    target: str | None = None,
) -> nn.Module:
    """The student to train in ``stage``.

    Args:
        student: The current student (float before the first quantized stage).
        stage: The stage being entered.
        quantized_now: Whether ``student`` is already quantized.
        config: The recipe's ``student`` section (first/last bits, per-channel,
            calibration batches).
        device: Where the quantized model goes.
        calibration: Batches for activation-range calibration; ``None`` on resume, where
            the ranges come from the checkpoint's state dict.
        report_dir: Folder for ``quantization_report.json`` when the student is quantized
            here (None: no file).
        say: Prints the quantization report when the student is quantized here.
        target: The deployment target the student is trained for (its QAT ranges;
            :mod:`qtemperate.quantization.targets`); later stages keep the model's own.

    Returns:
        ``student`` itself (float stage, or bits switched in place) or a new quantized model.
    """
    if not stage.quantized:
        return student
    if quantized_now:  # the ranges a previous stage froze learn again at the new width
        if activation_ranges_frozen(student):
            freeze_activation_ranges(student, frozen=False)
        return set_bit_width(student, stage.weight_bits, stage.act_bits)
    use = calibration if config.calibration_batches > 0 else None
    qmodel, report = quantize(
        student,
        weight_bits=stage.weight_bits,
        act_bits=stage.act_bits,
        first_last_bits=config.first_last_bits,
        per_channel=config.per_channel,
        calibration_loader=use,
        calibration_batches=max(config.calibration_batches, 1),
        return_report=True,
        target=target,
    )
    if report_dir is not None:
        report.write(Path(report_dir) / REPORT_FILE)
    if say is not None:
        say(f"quantization report ({stage.name}):\n{report.format()}")
    return qmodel.to(device)
