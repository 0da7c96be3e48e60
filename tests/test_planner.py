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


# -- the fast planner gives today's numbers ---------------------------------------------
# plan_recipe("recipes/resnet50_1of8.yaml") as computed before the planner counted bytes from
# widths (quantize() + model_size() per candidate, one DepGraph per trial), commit c7b42ea.
RESNET50_1OF8_BEFORE = {
    "recipe": "resnet50_1of8",
    "teacher": {"model": "resnet50", "params": 25557032, "macs": 4089184256},
    "teacher_float_bytes": 102228128.0, "prune_ratio": 0.9055968627342956, "target_size_ratio": 0.125,
    "params": 23144368, "macs": 3579740864, "student_bytes": 12740692.0, "compression_ratio": 0.12463000398481326,
    "stages": [
        {"name": "w8a8", "weight_bits": 8, "act_bits": 8, "params": 23144368, "macs": 3579740864,
         "bytes": 23303028.0, "compression_ratio": 0.22795123471301362},
        {"name": "w4a4", "weight_bits": 4, "act_bits": 4, "params": 23144368, "macs": 3579740864,
         "bytes": 12740692.0, "compression_ratio": 0.12463000398481326},
    ],
}


def _the_old_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantize every candidate to count its bytes; prune a copy with a fresh DepGraph per trial."""
    import qtemperate.planner as planner
    import qtemperate.pruning as pruning

    monkeypatch.setattr(planner, "quant_layout", lambda model: None)
    monkeypatch.setattr(pruning, "_STATELESS_OPS", ())  # no group is replayable: copies are pruned


def _report(rep) -> dict:
    out = rep.to_dict()
    out.pop("seconds")
    out["prune_report"].pop("seconds")
    return out


def test_resnet20_plan_is_the_quantize_paths_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    kw = dict(target_size_ratio=0.125, iterative_steps=1, round_to=8)
    student, rep = plan_student(teacher, x, 4, 4, **kw)
    assert rep.student_bytes == model_size(quantize(student, 4, 4)).quantized_bytes
    with monkeypatch.context() as m:
        _the_old_way(m)
        student_old, rep_old = plan_student(teacher, x, 4, 4, **kw)
    assert _report(rep) == _report(rep_old)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), student_old.state_dict().values()))


def test_resnet50_plan_is_todays_and_the_quantized_models() -> None:
    """The recipe's student (test_cli checks the whole ``qtemperate plan`` output)."""
    torch.manual_seed(0)
    teacher = build_model("resnet50", num_classes=1000, in_channels=3).eval()
    student, rep = plan_student(teacher, torch.randn(1, 3, 64, 64), 4, 4, target_size_ratio=0.125,
                                iterative_steps=1, round_to=8)
    assert rep.prune_ratio == RESNET50_1OF8_BEFORE["prune_ratio"]
    assert rep.student_params == RESNET50_1OF8_BEFORE["params"]
    assert rep.student_bytes == RESNET50_1OF8_BEFORE["student_bytes"]
    assert model_size(quantize(student, 4, 4)).quantized_bytes == rep.student_bytes
