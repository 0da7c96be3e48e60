"""base_temperature: auto and hardware: edge | cloud | mobile — closed forms, then real runs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtemperate.joint_scheduler import JointScheduler
from qtemperate.preflight import ProtocolWarning, validation_warnings
from qtemperate.recipe import RecipeError, parse_recipe
from qtemperate.schedule_switches import (
    TEMPERATURE_TABLE_FILE,
    ModelFacts,
    no_feedback_path,
    read_temperature_table,
    reads_validation_loss,
    resolve_switches,
)
from qtemperate.temperature import suggest_initial_temperature
from tests.pipeline_helpers import SHORT_TEACHER, tiny_recipe

FACTS = ModelFacts(num_classes=10, teacher_params=20_000, student_params=3_000, class_counts=(100,) * 10)


def _recipe(tmp_path: Path, *overrides: str, **sections: Any):  # type: ignore[no-untyped-def]
    return parse_recipe(tiny_recipe(tmp_path, **sections), overrides=list(overrides))


def _blocks(recipe) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [st.temperature.model_dump() for st in recipe.stages]


# --------------------------------------------------------------------------- auto


@pytest.mark.parametrize(("facts", "expected"), [
    (FACTS, 3.5 + 1.0),  # 10 classes; teacher/student = 6.7 >= 4
    (ModelFacts(10, 20_000, 3_000, (300,) + (100,) * 9), 3.5 + 1.0 - 0.5),  # max/min count 3
    (ModelFacts(100, 64_000, 1_000, None), 5.5 + 2.0),  # complex task, gap 64 >= 16
    (ModelFacts(10, 1_000, 1_000, (10,) * 9 + (200,)), 3.5 - 1.0),  # imbalance 20 >= 10
])
def test_auto_applies_the_41_rule(tmp_path: Path, facts: ModelFacts, expected: float) -> None:
    r = _recipe(tmp_path, "stages.1.temperature.base_temperature=auto")
    res = resolve_switches(r, facts)
    assert res.auto is not None and res.auto.temperature == pytest.approx(expected)
    assert res.auto == suggest_initial_temperature(facts.num_classes, facts.teacher_params, facts.student_params,
                                                   list(facts.class_counts) if facts.class_counts else None)
    assert _blocks(res.recipe)[1]["base_temperature"] == pytest.approx(expected)
    assert _blocks(res.recipe)[0]["base_temperature"] is None  # only the stage that asked
    # The stage starts at T as if the number had been written (the coupling rule is bypassed).
    assert JointScheduler.from_recipe(res.recipe).start_temperature(1) == pytest.approx(expected)
    assert res.summary()["auto_temperature"] == pytest.approx(expected)
    assert res.notes[0].startswith(f"base_temperature auto -> T = {expected:.4g} (w4a4): ")


def test_auto_needs_the_facts_and_is_never_built_unresolved(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "stages.0.temperature.base_temperature=auto")
    with pytest.raises(ValueError, match="needs the dataset's classes"):
        resolve_switches(r)
    with pytest.raises(ValueError, match="'auto' is not resolved"):
        JointScheduler.from_recipe(r)


# --------------------------------------------------------------------------- hardware


def test_edge_is_a_constant_mid_temperature(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "hardware=edge", "stages.1.temperature.base_temperature=5")
    res = resolve_switches(r)
    # T_mid = (T_min + T_ref) / 2 = (1 + 6) / 2; a stage's own base temperature is kept.
    assert _blocks(res.recipe) == [{"schedule": "constant", "base_temperature": 3.5},
                                   {"schedule": "constant", "base_temperature": 5.0}]
    rows = no_feedback_path(JointScheduler.from_recipe(res.recipe))
    assert [row["T"] for row in rows] == [3.5, 5.0, 5.0]
    # The multi-scale set follows the affine map T_i = 1 + (T_i^ref - 1)(T - 1)/(T_ref - 1).
    assert rows[0]["temperatures"] == pytest.approx([3.5, 1 + 2 * 2.5 / 5, 1.0])
    assert resolve_switches(res.recipe).recipe == res.recipe  # idempotent


def test_cloud_makes_every_stage_dynamic(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "hardware=cloud", "stages.0.temperature={schedule: constant, base_temperature: 4.0}",
                "stages.1.temperature={schedule: gradient_norm}")
    res = resolve_switches(r)
    blocks = _blocks(res.recipe)
    assert blocks[0]["schedule"] == "temperate" and blocks[0]["base_temperature"] == 4.0
    assert blocks[1]["schedule"] == "gradient_norm"  # moves T already
    assert res.notes == ["hardware cloud: stage w8a8 constant -> temperate (dynamic T)"]


def test_mobile_tabulates_the_no_feedback_path(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "hardware=mobile")
    res = resolve_switches(r)
    # w8a8: T0 = 6 + 1 * 2 halvings = 8, one adaptive epoch: 0.9 * 8 (no val loss).
    # w4a4: T0 = 6 + 3 = 9; epoch 0 adaptive (A = ceil(0.5 * 2) = 1): 8.1; epoch 1 converges to 1.
    assert _blocks(res.recipe) == [{"schedule": "lookup_table", "table": [pytest.approx(7.2)]},
                                   {"schedule": "lookup_table", "table": [pytest.approx(8.1), 1.0]}]
    assert resolve_switches(res.recipe).recipe == res.recipe
    replay_rows = res.table["stages"] if res.table else []
    assert [s["table"] for s in replay_rows] == [[pytest.approx(7.2)], [pytest.approx(8.1), 1.0]]


def test_mobile_refuses_a_schedule_that_moves_per_update(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\.1\.temperature\.schedule: hardware: mobile replays"):
        _recipe(tmp_path, "hardware=mobile", "stages.1.temperature={schedule: gradient_norm}")


def test_no_feedback_path_closed_form(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "stages=[{epochs: 10, weight_bits: 8, act_bits: 8}]", "distillation.coupling=none")
    rows = no_feedback_path(JointScheduler.from_recipe(r))
    # warm-up W = ceil(0.3 * 10) = 3, adaptive until A = 8 (T <- 0.9 T), cosine decay to 1 at epoch 9.
    t_enter = 6.0 * 0.9**5
    expected = [6.0] * 3 + [6.0 * 0.9**k for k in range(1, 6)] + [t_enter, 1.0]
    assert [row["T"] for row in rows] == pytest.approx(expected)
    assert [row["phase"] for row in rows] == ["warmup"] * 3 + ["adaptive"] * 5 + ["convergence"] * 2


def test_which_stages_read_the_validation_loss(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "data.val_fraction=0", "stages.0.temperature={schedule: constant}")
    assert reads_validation_loss(r) == ["w4a4"]
    (warning,) = validation_warnings(r)
    assert "data.val_fraction is 0" in warning and "w4a4" in warning and "TEST loss" in warning
    assert validation_warnings(_recipe(tmp_path, "data.val_fraction=0", "hardware=edge")) == []
    assert validation_warnings(_recipe(tmp_path, "data.val_fraction=0", "hardware=mobile")) == []
    assert reads_validation_loss(_recipe(tmp_path, "hardware=cloud", "stages.0.temperature={schedule: constant}")) == [
        "w8a8", "w4a4"]
    assert validation_warnings(_recipe(tmp_path)) == []  # the default carves a validation split


# --------------------------------------------------------------------------- real runs from recipes


def _run(tmp_path: Path, *overrides: str, **sections: Any) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    from qtemperate.checkpoint import load_checkpoint
    from qtemperate.trainer import Trainer

    recipe = parse_recipe(tiny_recipe(tmp_path, teacher=SHORT_TEACHER, **sections), overrides=list(overrides))
    run_dir = tmp_path / "run"
    summary = Trainer(recipe, run_dir=run_dir, progress=False).run()
    history = load_checkpoint(run_dir / "checkpoint.pt")["progress"]["history"]
    return summary, history, run_dir


def test_run_auto_and_mobile_from_a_recipe(tmp_path: Path) -> None:
    from qtemperate.data import build_datasets
    from qtemperate.training.resume import load_student_arch

    summary, history, run_dir = _run(tmp_path, "stages.1.temperature.base_temperature=auto", "hardware=mobile")
    # auto: the rule from the training split's class counts and the derived student's size.
    bundle = build_datasets("digits", val_fraction=0.1, seed=0)
    arch, _ = load_student_arch(run_dir / "student_arch.pt")
    student_params = sum(p.numel() for p in arch.parameters())
    expected = suggest_initial_temperature(10, summary["teacher_params"], student_params, bundle.class_counts)
    assert summary["auto_temperature"] == pytest.approx(expected.temperature)
    assert summary["auto_temperature_reasons"] == "; ".join(expected.reasons)
    # mobile: the table beside the model is what training used, epoch by epoch.
    assert summary["hardware"] == "mobile" and summary["temperature_table_file"] == TEMPERATURE_TABLE_FILE
    replay = read_temperature_table(run_dir / TEMPERATURE_TABLE_FILE)
    assert [r["T"] for r in replay] == pytest.approx([h["T"] for h in history])
    assert [r["temperatures"] for r in replay] == [pytest.approx(h["temperatures"]) for h in history]
    assert [r["weights"] for r in replay] == [pytest.approx(h["weights"]) for h in history]
    # The auto stage (w4a4) replays T0 = auto, then alpha * T0, then the decay to 1.
    assert [h["T"] for h in history[1:]] == pytest.approx([0.9 * expected.temperature, 1.0])
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["stages"][1]["temperature"]["base_temperature"] == "auto"  # the user's recipe, as given
    table = json.loads((run_dir / TEMPERATURE_TABLE_FILE).read_text())
    assert table["hardware"] == "mobile" and [s["name"] for s in table["stages"]] == ["w8a8", "w4a4"]


def test_run_edge_and_cloud_from_recipes(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProtocolWarning)  # edge reads no validation loss: no warning
        edge, history, _ = _run(tmp_path / "edge", "hardware=edge", "data.val_fraction=0")
    assert edge["hardware"] == "edge" and [h["T"] for h in history] == [3.5, 3.5, 3.5]
    with pytest.warns(ProtocolWarning, match="follow the TEST loss"):
        cloud, history, _ = _run(tmp_path / "cloud", "hardware=cloud", "data.val_fraction=0", "stages.0.epochs=3",
                                 "stages.0.temperature={schedule: constant, base_temperature: 4.0}")
    assert cloud["hardware"] == "cloud" and cloud["val_samples"] == 0
    # The constant stage became Temperate (W = ceil(0.3 * 3) = 1): warm-up at 4, then
    # T <- 0.9 T - 0.1 v with v the loss of the previous epoch -- here the TEST loss.
    assert [h["phase"] for h in history[:3]] == ["warmup", "adaptive", "adaptive"]
    assert history[0]["T"] == 4.0 and history[0]["val_loss"] == history[0]["test_loss"]
    assert history[1]["T"] == pytest.approx(max(1.0, 0.9 * 4.0 - 0.1 * history[0]["test_loss"]))
    assert math.isclose(history[-1]["T"], 1.0)


def test_an_empty_validation_split_stops_before_training(tmp_path: Path) -> None:
    from qtemperate.trainer import Trainer

    recipe = parse_recipe(tiny_recipe(tmp_path, teacher=SHORT_TEACHER),
                          overrides=["data.limit_train=20", "data.val_fraction=0.01"])
    with pytest.raises(RecipeError, match=r"data\.val_fraction: 0\.01 of 20 training samples holds out no sample"):
        Trainer(recipe, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "teacher.pt").exists()
