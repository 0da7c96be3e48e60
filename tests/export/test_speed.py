"""The deployed student's speed keys: closed forms from given latencies, and the reasons for gaps."""

from __future__ import annotations

import pytest

from qtemperate.export.speed import SPEED_KEYS, per_batch, speed_key, speed_summary
from qtemperate.tracking.keys import flat_summary

REPORT = {
    "onnx_latency_ms": {"1": 9.0, "64": 90.0},  # student.onnx at W4A4: not the deployed file
    "int8_onnx_latency_ms": {"1": 0.5, "8": 2.0, "64": 8.0},
    "teacher_onnx_latency_ms": {"1": 1.5, "8": 5.0, "64": 20.0},
    "openvino_latency_ms": {"1": 0.4, "8": 1.0, "64": 4.0},
    "teacher_openvino_latency_ms": {"1": 0.6, "8": 3.0, "64": 16.0},
}


def test_names_are_one_rule() -> None:
    assert speed_key("student") == "student_ort_ms_b1"
    assert speed_key("teacher", "openvino", "max") == "teacher_openvino_ms_bmax"
    assert speed_key("speedup", "ort", "bmax") == "speedup_vs_teacher_ort_bmax"
    assert len(SPEED_KEYS) == 1 + 2 * 3 * 2 and SPEED_KEYS[0] == "latency_max_batch"
    for bad, message in ((("student", "tensorrt"), "runtime 'tensorrt'"), (("student", "ort", "8"), "batch '8'"),
                         (("fastest",), "what 'fastest'")):
        with pytest.raises(ValueError, match=message):
            speed_key(*bad)


def test_speedups_are_teacher_over_student_in_one_runtime_and_batch() -> None:
    s = speed_summary(REPORT)
    assert s["latency_max_batch"] == 64
    for rt, student, teacher in (("ort", "int8_onnx_latency_ms", "teacher_onnx_latency_ms"),
                                 ("openvino", "openvino_latency_ms", "teacher_openvino_latency_ms")):
        for b, batch in (("b1", "1"), ("bmax", "64")):
            assert s[speed_key("student", rt, b)] == REPORT[student][batch]
            assert s[speed_key("teacher", rt, b)] == REPORT[teacher][batch]
            # one division of two floats: exact to the last bit
            assert s[speed_key("speedup", rt, b)] == REPORT[teacher][batch] / REPORT[student][batch]
    assert (s["speedup_vs_teacher_ort_b1"], s["speedup_vs_teacher_ort_bmax"]) == (3.0, 2.5)
    assert (s["speedup_vs_teacher_openvino_b1"], s["speedup_vs_teacher_openvino_bmax"]) == (pytest.approx(1.5), 4.0)
    assert s["speed_missing"] is None
    assert set(s) == {*SPEED_KEYS, "speed_missing"}
    # The W&B (flat) summary gives the same figures.
    assert speed_summary(flat_summary(REPORT)) == s


def test_a_float_student_is_its_own_deployed_file() -> None:
    s = speed_summary({k: v for k, v in REPORT.items() if k != "int8_onnx_latency_ms"}, quantized=False)
    assert s["student_ort_ms_b1"] == 9.0 and s["speedup_vs_teacher_ort_bmax"] == 20.0 / 90.0


def test_nothing_is_made_up_and_each_gap_says_why() -> None:
    no_ov = {k: v for k, v in REPORT.items() if "openvino" not in k}
    s = speed_summary({**no_ov, "openvino_note": "OpenVINO not installed: pip install 'qtemperate[openvino]'"})
    assert all(s[k] is None for k in SPEED_KEYS if "openvino" in k)
    assert s["speed_missing"] == {"openvino": "OpenVINO not installed: pip install 'qtemperate[openvino]'"}
    assert s["speedup_vs_teacher_ort_b1"] == 3.0  # the other runtime's figures stand
    # The student timed in OpenVINO, the teacher not: the student's figure, no speed-up.
    s = speed_summary({**no_ov, "openvino_latency_ms": {"1": 0.4}})
    assert s["student_openvino_ms_b1"] == 0.4 and s["speedup_vs_teacher_openvino_b1"] is None
    assert s["speed_missing"]["openvino"] == "the float teacher was not timed in OpenVINO"
    # No batch 1 timed: the b1 keys are None, bmax stands.
    s = speed_summary({"int8_onnx_latency_ms": {"64": 8.0}, "teacher_onnx_latency_ms": {"64": 16.0}})
    assert s["student_ort_ms_b1"] is None and s["speedup_vs_teacher_ort_bmax"] == 2.0
    assert s["speed_missing"]["ort"] == "batch 1 was not timed for both the student and the teacher"
    assert s["speed_missing"]["openvino"] == "the deployed student was not timed in OpenVINO"
    # Nothing timed, and the caller's reasons win over the generic ones.
    s = speed_summary({"onnx_latency_ms": None}, why={"ort": "not timed (benchmark off)"})
    assert s["latency_max_batch"] is None and all(s[k] is None for k in SPEED_KEYS)
    assert s["speed_missing"]["ort"] == "not timed (benchmark off)"
    s = speed_summary({"int8_onnx_latency_ms": {"1": 1.0}}, why={"teacher": "no teacher was given to time"})
    assert s["speed_missing"]["ort"] == "no teacher was given to time"


def test_per_batch_reads_nested_and_flat() -> None:
    assert per_batch(REPORT, "openvino_latency_ms") == {"1": 0.4, "8": 1.0, "64": 4.0}
    assert per_batch(flat_summary(REPORT), "openvino_latency_ms") == {"1": 0.4, "8": 1.0, "64": 4.0}
    assert per_batch({"x": None}, "x") == {} and per_batch({}, "x") == {}
