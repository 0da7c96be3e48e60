"""The size planner against independent counts: bytes = params × bits + scales + float parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtemperate.models import build_model
from qtemperate.planner import plan_recipe, plan_stages, plan_student
from qtemperate.quantization import quantize
from qtemperate.recipe import parse_recipe
from qtemperate.size import model_size
from tests.pipeline_helpers import tiny_recipe

X = torch.randn(1, 1, 8, 8)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, width=16).eval()


def test_plan_student_meets_a_bytes_target() -> None:
    teacher = _teacher()
    student, rep = plan_student(teacher, X, 4, 4, target_size_ratio=0.1, iterative_steps=1)
    q = quantize(student, 4, 4)
    assert model_size(q).quantized_bytes == pytest.approx(rep.student_bytes)
    assert rep.student_bytes <= 0.1 * rep.teacher_float_bytes
    assert rep.compression_ratio == pytest.approx(rep.student_bytes / rep.teacher_float_bytes)
    assert rep.teacher_float_bytes == 4 * sum(p.numel() for p in teacher.parameters())


def test_unreachable_target_names_the_field() -> None:
    with pytest.raises(ValueError, match="target_size_ratio"):
        plan_student(_teacher(), X, 8, 8, target_size_ratio=0.001, iterative_steps=1, max_layer_ratio=0.5)


def test_both_targets_is_an_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        plan_student(_teacher(), X, 8, 8, target_size_ratio=0.5, prune_ratio=0.5)


def test_plan_stages_bytes_are_the_quantized_models() -> None:
    student = _teacher()
    stages = plan_stages(student, X, [("float", 32, 32), ("w8a8", 8, 8), ("w4a4", 4, 4)], 1000.0)
    assert stages[0].bytes == 4 * sum(p.numel() for p in student.parameters())
    assert stages[1].bytes == pytest.approx(model_size(quantize(student, 8, 8)).quantized_bytes)
    assert stages[2].bytes == pytest.approx(model_size(quantize(student, 4, 4)).quantized_bytes)
    assert stages[1].compression_ratio == pytest.approx(stages[1].bytes / 1000.0)


def test_plan_recipe_reports_every_stage(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny_recipe(tmp_path))
    out = plan_recipe(recipe)
    assert [s["name"] for s in out["stages"]] == ["w8a8", "w4a4"]
    assert out["compression_ratio"] <= 0.125
    assert out["compression_ratio"] == pytest.approx(out["student_bytes"] / out["teacher_float_bytes"])
    assert out["params"] < out["teacher"]["params"]
