"""Flat W&B summary keys: one rule, every value once, nothing on a table's key."""

from __future__ import annotations

import pytest

from qtemperate.tracking.keys import RESERVED_KEYS, flat_summary


def test_scalars_mappings_named_records_and_lists() -> None:
    summary = {
        "student_acc": 0.8,
        "onnx_latency_ms": {"1": 0.5, "64": 12.0},
        "stages": [
            {"name": "w8a8", "accuracy": 0.7, "final_temperatures": [6.0, 3.0, 1.0]},
            {"name": "w4a4", "accuracy": 0.75, "final_temperatures": [1.0, 1.0, 1.0]},
        ],
        "prune_ratio": None,
        "empty": [],
    }
    assert flat_summary(summary) == {
        "student_acc": 0.8,
        "onnx_latency_ms/1": 0.5,
        "onnx_latency_ms/64": 12.0,
        "stage/w8a8/accuracy": 0.7,
        "stage/w8a8/final_temperatures/0": 6.0,
        "stage/w8a8/final_temperatures/1": 3.0,
        "stage/w8a8/final_temperatures/2": 1.0,
        "stage/w4a4/accuracy": 0.75,
        "stage/w4a4/final_temperatures/0": 1.0,
        "stage/w4a4/final_temperatures/1": 1.0,
        "stage/w4a4/final_temperatures/2": 1.0,
        "prune_ratio": None,
        "empty": None,
    }


def test_repeated_and_slashed_stage_names_stay_apart() -> None:
    flat = flat_summary({"stages": [{"name": "w4a4", "accuracy": 1}, {"name": "w4a4", "accuracy": 2},
                                    {"name": "a/b", "accuracy": 3}]})
    assert flat == {"stage/w4a4/accuracy": 1, "stage/w4a4_2/accuracy": 2, "stage/a_b/accuracy": 3}


def test_every_value_lands_once_and_no_key_is_reserved() -> None:
    with pytest.raises(ValueError, match="written twice"):
        flat_summary({"a/b": 1, "a": {"b": 2}})
    for key in RESERVED_KEYS:
        with pytest.raises(ValueError, match="reserved"):
            flat_summary({key: 1})
