"""The trade-off record, ONNX artifact metadata, tags, CPU and teacher fingerprints."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from qtemperate.export.speed import SPEED_KEYS, speed_summary
from qtemperate.recipe import parse_recipe
from qtemperate.tracking.keys import flat_summary
from qtemperate.tracking.tradeoff import (
    TRADEOFF_COLUMNS,
    onnx_artifacts,
    run_tags,
    target_cpu,
    teacher_fingerprint,
    tradeoff_record,
)
from tests.pipeline_helpers import tiny_recipe

SUMMARY = {
    "recipe": "tiny", "group": "grid", "dataset": "digits", "test_samples": 360, "teacher": "small_cnn(width=8)",
    "teacher_id": "sha256:00", "teacher_acc": 0.9, "student_acc": 0.85, "acc_drop": 0.05,
    "teacher_float_bytes": 40000.0, "student_bytes": 4000.0, "compression_ratio": 0.1, "params": 900,
    "student_weight_bits": 4, "student_act_bits": 4, "onnx_bytes": 123,
    "onnx_latency_ms": {"1": 0.5, "8": 2.0}, "onnx_top1_agreement": 1.0, "onnx_max_abs_diff": 0.0,
    "onnx_path": "/somewhere/student.onnx",
    "int8_onnx_latency_ms": {"1": 0.25}, "int8_onnx_top1_agreement": 0.99,
    "teacher_onnx_latency_ms": {"1": 0.75}, "teacher_onnx_top1_agreement": 1.0,
    "student_qonnx_top1_agreement": 0.98,
    "stages": [{"name": "w8a8", "weight_bits": 8, "act_bits": 8}, {"name": "w4a4", "weight_bits": 4, "act_bits": 4}],
    "target_cpu": "cpu X",
}


def test_record_is_the_same_from_nested_and_flat_summaries() -> None:
    nested = tradeoff_record(SUMMARY, "run-a")
    assert nested == tradeoff_record(flat_summary(SUMMARY), "run-a")
    assert list(nested) == TRADEOFF_COLUMNS
    assert nested["latency_b1_ms"] == 0.5 and nested["int8_latency_b1_ms"] == 0.25
    assert nested["teacher_latency_b1_ms"] == 0.75 and (nested["weight_bits"], nested["act_bits"]) == (4, 4)
    # Older summaries without student bits: the last stage's.
    old = {k: v for k, v in SUMMARY.items() if not k.startswith("student_") or k == "student_acc" or k == "student_bytes"}
    assert tradeoff_record(old, "old")["weight_bits"] == 4
    with pytest.raises(KeyError, match="student_acc"):
        tradeoff_record({"teacher_acc": 0.9}, "x")


def test_speed_columns_from_old_and_new_summaries() -> None:
    # A summary from before the speed keys: derived from its per-batch latencies (teacher / int8 twin).
    old = tradeoff_record(SUMMARY, "old")
    assert list(old)[-len(SPEED_KEYS):] == SPEED_KEYS
    assert (old["latency_max_batch"], old["student_ort_ms_b1"], old["teacher_ort_ms_b1"]) == (1, 0.25, 0.75)
    assert old["speedup_vs_teacher_ort_b1"] == 0.75 / 0.25 == old["speedup_vs_teacher_ort_bmax"]
    assert all(old[k] is None for k in SPEED_KEYS if "openvino" in k)  # never timed there: nothing invented
    # A summary that carries them: read as written.
    speed = {**dict.fromkeys(SPEED_KEYS), "latency_max_batch": 64, "student_openvino_ms_bmax": 4.0,
             "teacher_openvino_ms_bmax": 10.0, "speedup_vs_teacher_openvino_bmax": 2.5}
    new = tradeoff_record({**SUMMARY, **speed, "speed_missing": {"ort": "x"}}, "new")
    assert {k: new[k] for k in SPEED_KEYS} == speed


def test_the_wandb_tradeoff_row_carries_the_speed(tmp_path: Path, wandb_env: Path) -> None:
    from qtemperate.tracking import WandbLogger
    from qtemperate.tracking.tradeoff import log_run_results
    from tests.wandb_reader import read_offline_run

    summary = {**SUMMARY, "openvino_latency_ms": {"1": 0.2, "8": 1.0}, "teacher_openvino_latency_ms": {"1": 0.6}}
    summary.update(speed_summary(summary))
    assert summary["speedup_vs_teacher_openvino_b1"] == 0.6 / 0.2 and summary["latency_max_batch"] == 8
    recipe = parse_recipe(tiny_recipe(tmp_path))
    run_dir = wandb_env / "runs" / "speed"
    lg = WandbLogger("qtemperate-tests", run_dir, name="speed", settings={"x_disable_stats": True})
    log_run_results(lg, run_dir, recipe, summary)
    lg.finish()
    data = read_offline_run(run_dir)
    table = data["tables"]["tradeoff"]
    assert table["columns"] == TRADEOFF_COLUMNS
    row = dict(zip(TRADEOFF_COLUMNS, table["data"][0]))
    assert {k: row[k] for k in SPEED_KEYS} == {k: summary[k] for k in SPEED_KEYS}
    assert row["speedup_vs_teacher_ort_b1"] == 3.0 and row["speedup_vs_teacher_openvino_bmax"] is None
    # the flat W&B summary holds each speed key, and the reason for a gap
    assert data["summary"]["speedup_vs_teacher_openvino_b1"] == summary["speedup_vs_teacher_openvino_b1"]
    assert data["summary"]["speed_missing/openvino"] == summary["speed_missing"]["openvino"]


def test_every_onnx_file_is_an_artifact_with_its_own_measurements(tmp_path: Path) -> None:
    for name, size in (("student.onnx", 11), ("student_int8.onnx", 22), ("teacher.onnx", 33), ("student_qonnx.onnx", 44)):
        (tmp_path / name).write_bytes(b"x" * size)
    arts = {p.name: (name, meta) for p, name, meta in onnx_artifacts(tmp_path, SUMMARY)}
    assert sorted(arts) == ["student.onnx", "student_int8.onnx", "student_qonnx.onnx", "teacher.onnx"]
    name, s = arts["student.onnx"]
    assert name == "tiny-student-onnx"
    assert s["bytes"] == 11  # read from the file, not the summary's onnx_bytes
    assert s["latency_ms"] == {"1": 0.5, "8": 2.0} and s["top1_agreement"] == 1.0 and s["max_abs_diff"] == 0.0
    assert (s["weight_bits"], s["act_bits"], s["accuracy"]) == (4, 4, 0.85) and "path" not in s
    _, i8 = arts["student_int8.onnx"]
    assert (i8["bytes"], i8["latency_ms"], i8["top1_agreement"], i8["weight_bits"]) == (22, {"1": 0.25}, 0.99, 8)
    _, t = arts["teacher.onnx"]
    assert (t["bytes"], t["latency_ms"], t["top1_agreement"], t["accuracy"], t["weight_bits"]) == (33, {"1": 0.75}, 1.0, 0.9, 32)
    _, q = arts["student_qonnx.onnx"]
    assert (q["bytes"], q["top1_agreement"]) == (44, 0.98) and "latency_ms" not in q  # nothing invented
    assert all(m["dataset"] == "digits" and m["target_cpu"] == "cpu X" for _, m in arts.values())


def test_run_tags_name_recipe_dataset_and_hardware(tmp_path: Path) -> None:
    r = parse_recipe(tiny_recipe(tmp_path, tracking={"tags": ["mine", "recipe:tiny"]}), overrides=["hardware=edge"])
    assert run_tags(r) == ["mine", "recipe:tiny", "dataset:digits", "hardware:edge"]


def test_target_cpu_names_the_machine() -> None:
    text = target_cpu()
    assert platform.machine() in text and "cores" in text


def test_teacher_fingerprint_is_the_weights() -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    assert teacher_fingerprint(a).startswith("sha256:") and len(teacher_fingerprint(a)) == 7 + 16
