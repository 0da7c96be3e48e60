"""Comparing runs: the Pareto front's closed form, the table, and re-export keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtemperate.compare import compare_runs, pareto_front


def test_pareto_front_closed_form() -> None:
    pts = [(0.10, 0.90), (0.05, 0.85), (0.20, 0.89), (0.05, 0.80), (0.30, 0.95)]
    assert pareto_front(pts) == [True, True, False, False, True]


def test_pareto_front_ties_are_not_dominated() -> None:
    assert pareto_front([(0.1, 0.9), (0.1, 0.9)]) == [True, True]
    assert pareto_front([]) == []


def _run(root: Path, name: str, ratio: float, acc: float) -> Path:
    d = root / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({
        "recipe": "r", "teacher_acc": 0.92, "student_acc": acc, "acc_drop": 0.92 - acc,
        "compression_ratio": ratio, "student_bytes": ratio * 1e6, "params": 1000,
        "onnx_latency_ms": {"1": 0.5},
    }))
    return d


def test_compare_runs_sorted_by_size_with_flags(tmp_path: Path) -> None:
    dirs = [_run(tmp_path, "a", 0.1, 0.9), _run(tmp_path, "b", 0.05, 0.85), _run(tmp_path, "c", 0.2, 0.88)]
    rows = compare_runs(dirs)
    assert [r["run"] for r in rows] == ["b", "a", "c"]
    assert [r["pareto"] for r in rows] == [True, True, False]
    assert rows[0]["latency_b1_ms"] == 0.5 and rows[0]["acc_drop"] == pytest.approx(0.07)


def test_compare_runs_names_a_folder_without_summary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json"):
        compare_runs([tmp_path])
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="not valid JSON"):
        compare_runs([tmp_path])
