"""Student derivation is one function shared by ``plan`` and ``run``."""

from __future__ import annotations

from pathlib import Path

import torch

from qtemperate.models import build_model
from qtemperate.planner import plan_recipe
from qtemperate.pruning import count_params_macs
from qtemperate.recipe import parse_recipe
from qtemperate.training.student import derive_student
from tests.pipeline_helpers import tiny_recipe

X = torch.randn(1, 1, 8, 8)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, width=16).eval()


def test_prune_ratio_student_matches_the_plan(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, student={"prune_ratio": 0.5, "iterative_steps": 1})
    raw["student"].pop("target_size_ratio")
    recipe = parse_recipe(raw)
    student, report = derive_student(recipe, _teacher(), 10, 1, X, iterative_steps=1)
    assert report is not None and abs(report.prune_ratio - 0.5) <= 0.06
    plan = plan_recipe(recipe)
    assert plan["params"] == count_params_macs(student, X)[0]


def test_size_target_is_met(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny_recipe(tmp_path))  # target_size_ratio 0.125 at W4A4
    teacher = _teacher()
    student, report = derive_student(recipe, teacher, 10, 1, X, iterative_steps=1)
    assert report is not None and report.compression_ratio <= 0.125
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_own_student_model_without_target_is_not_pruned(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, student={"model": "small_cnn", "kwargs": {"width": 4}})
    raw["student"].pop("target_size_ratio")
    recipe = parse_recipe(raw)
    student, report = derive_student(recipe, _teacher(), 10, 1, X)
    assert report is None
    expected = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in expected.parameters())
