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


# --------------------------------------------------------------------------- one front per task


def _facts(root: Path, name: str, ratio: float, acc: float, **facts: object) -> Path:
    d = _run(root, name, ratio, acc)
    s = json.loads((d / "summary.json").read_text())
    s.update({"dataset": "digits", "test_samples": 360, "teacher": "small_cnn", "teacher_id": "sha256:aa", **facts})
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_runs_of_other_datasets_or_teachers_are_refused(tmp_path: Path) -> None:
    from qtemperate.cli import UsageError

    a = _facts(tmp_path, "a", 0.1, 0.9)
    b = _facts(tmp_path, "b", 0.05, 0.85, dataset="fashion_mnist", test_samples=2000)
    c = _facts(tmp_path, "c", 0.2, 0.95, teacher_id="sha256:bb")
    with pytest.raises(UsageError, match=r"different datasets \(digits \(360 test samples\): a; fashion_mnist \(2000 test samples\): b\)"):
        compare_runs([a, b])
    with pytest.raises(UsageError, match=r"different teachers .*sha256:aa: a; small_cnn sha256:bb: c"):
        compare_runs([a, c])
    with pytest.raises(UsageError, match="different datasets"):
        compare_runs([a, _facts(tmp_path, "d", 0.1, 0.9, test_samples=100)])  # another test slice
    # Asked for: each (dataset, teacher) group has its own front, so every run here is on one.
    rows = compare_runs([a, b, c], allow_mixed=True)
    assert [r["pareto"] for r in rows] == [True, True, True]


def test_folders_that_are_not_runs_are_named(tmp_path: Path) -> None:
    from qtemperate.compare import NotARunError

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad, message in ((tmp_path / "empty", "no summary.json"), (tmp_path / "notes.txt", "neither a qtemperate run"),
                         (tmp_path / "no" / "such" / "dir", "no such run folder")):
        with pytest.raises(NotARunError, match=message):
            compare_runs([bad])
    (tmp_path / "summary.json").write_text(json.dumps({"teacher_acc": 0.9}))
    with pytest.raises(NotARunError, match="summary has no student_acc"):
        compare_runs([tmp_path])


def test_the_front_from_offline_wandb_folders_is_the_front_from_the_folders(offline_sweep: dict) -> None:
    dirs = sorted(p for p in offline_sweep["folder"].iterdir() if p.is_dir() and p.name[:2].isdigit())
    local = compare_runs(dirs)  # one teacher: the same recipe and seed train the same weights
    from_wandb = compare_runs([d / "wandb" for d in dirs])
    keys = ["run", "student_acc", "compression_ratio", "student_bytes", "latency_b1_ms", "teacher_id", "pareto"]
    assert [{k: r[k] for k in keys} for r in from_wandb] == [{k: r[k] for k in keys} for r in local]
    assert all(r["source"].endswith(".wandb") for r in from_wandb)
    assert any(r["pareto"] for r in from_wandb)


def test_online_group_through_a_wandb_api_object(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from qtemperate.tracking.keys import flat_summary

    def run(i: int, ratio: float, acc: float, job: str = "train") -> SimpleNamespace:
        s = {"recipe": "r", "teacher_acc": 0.92, "student_acc": acc, "compression_ratio": ratio,
             "student_bytes": ratio * 1e6, "dataset": "digits", "test_samples": 360, "teacher_id": "sha256:aa",
             "onnx_latency_ms": {"1": 0.5}}
        return SimpleNamespace(id=f"id{i}", name=f"p{i}", group="g", job_type=job, tags=[], config={},
                               summary_metrics=flat_summary(s) if job == "train" else {"runs": 2})

    class Api:
        def runs(self, path: str, filters: object = None) -> list[SimpleNamespace]:
            assert (path, filters) == ("team/proj", {"group": "g"})
            return [run(0, 0.1, 0.9), run(1, 0.05, 0.85), run(2, 0.2, 0.88), run(3, 0, 0, job="compare")]

    rows = compare_runs(["team/proj/g"], api=Api())
    assert [(r["run"], r["pareto"], r["latency_b1_ms"]) for r in rows] == [
        ("p1", True, 0.5), ("p0", True, 0.5), ("p2", False, 0.5)]
    assert rows[0]["source"] == "team/proj/id1"


def test_log_comparison_offline_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qtemperate.compare import COMPARE_COLUMNS, log_comparison, pareto_plot
    from qtemperate.tracking.wandb_reader import read_wandb_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = compare_runs([_run(tmp_path, "a", 0.1, 0.9), _run(tmp_path, "b", 0.05, 0.85)])
    png = pareto_plot(rows, tmp_path / "p.png")
    lg = log_comparison(rows, png, tmp_path / "cmp", project="p", group="grp", name="my-cmp")
    assert lg.run_file is not None and lg.run_file.is_file()
    (run,) = read_wandb_runs(tmp_path / "cmp")
    assert (run.name, run.group, run.job_type) == ("my-cmp", "grp", "compare")
    assert run.summary["runs"] == 2 and run.summary["pareto_runs"] == 2
    assert run.summary["best_student_acc"] == 0.9 and run.summary["smallest_compression_ratio"] == 0.05
    table = json.loads((lg.run_file.parent / "files" / run.summary["comparison"]["path"]).read_text())
    assert table["columns"] == COMPARE_COLUMNS and len(table["data"]) == 2
    assert run.summary["pareto"]["_type"] == "image-file" and run.summary["pareto_scatter_table"]["nrows"] == 2  # the scatter chart's data
