"""A tiny but real recipe for pipeline tests: digits, a small CNN, seconds per run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "batch_size": 64, "eval_batch_size": 256},
    "teacher": {"model": "small_cnn", "kwargs": {"width": 16}, "train": {"epochs": 3, "lr": 0.05}},
    "student": {"target_size_ratio": 0.125, "calibration_batches": 4, "iterative_steps": 4},
    "stages": [
        {"name": "w8a8", "epochs": 1, "weight_bits": 8, "act_bits": 8, "lr": 0.02,
         "temperature": {"warmup": 0.0, "adapt_until": 1.0}},
        {"name": "w4a4", "epochs": 2, "weight_bits": 4, "act_bits": 4, "lr": 0.02,
         "temperature": {"warmup": 0.0, "adapt_until": 0.5}},
    ],
    "distillation": {"kd_weight": 0.9, "temperatures": [6.0, 3.0, 1.0]},
    "optimizer": {"lr": 0.02},
    "tracking": {"loggers": ["jsonl"], "log_every": 5, "mode": "offline"},
    "export": {"onnx": False, "verify_samples": 128, "batch_sizes": [1, 8], "benchmark_iters": 3},
}


SHORT_TEACHER: dict[str, Any] = {"model": "small_cnn", "kwargs": {"width": 8}, "train": {"epochs": 1, "lr": 0.05}}
"""A teacher trained for one epoch: seconds, for tests that need a run but not a good teacher."""


def tiny_recipe(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY` writing into ``tmp_path`` with sections replaced."""
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw
