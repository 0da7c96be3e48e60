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


# --------------------------------------------------------------------------- speed as an axis


def _speed_run(root: Path, name: str, ratio: float, acc: float, ms: float | None, cpu: str = "cpu A",
               big: int = 64, openvino: bool = False) -> Path:
    """A run folder whose summary carries the speed keys as ``export_and_check`` writes them."""
    from qtemperate.export.speed import speed_summary

    d = _facts(root, name, ratio, acc, target_cpu=cpu)
    s = json.loads((d / "summary.json").read_text())
    if ms is not None:
        s["int8_onnx_latency_ms"] = {"1": ms, str(big): ms * 10}
        s["teacher_onnx_latency_ms"] = {"1": 4.0, str(big): 80.0}
        if openvino:
            s["openvino_latency_ms"] = {"1": ms / 2, str(big): ms * 4}
            s["teacher_openvino_latency_ms"] = {"1": 2.0, str(big): 40.0}
    s.update(speed_summary(s))
    (d / "summary.json").write_text(json.dumps(s))
    return d


@pytest.fixture
def speed_runs(tmp_path: Path) -> list[Path]:
    # (ratio, acc, onnxruntime b1 ms): over size a and b are the front; over latency c and a.
    return [_speed_run(tmp_path, "a", 0.1, 0.90, 2.0), _speed_run(tmp_path, "b", 0.05, 0.85, 3.0),
            _speed_run(tmp_path, "c", 0.2, 0.88, 1.0), _speed_run(tmp_path, "d", 0.3, 0.95, None)]


def test_the_front_over_latency_is_computed_on_latency(speed_runs: list[Path]) -> None:
    from qtemperate.errors import QtemperateWarning

    size = {r["run"]: r["pareto"] for r in compare_runs(speed_runs)}
    assert size == {"a": True, "b": True, "c": False, "d": True}
    with pytest.warns(QtemperateWarning, match=r"not on the latency front \(no student_ort_ms_b1\): d$"):
        rows = compare_runs(speed_runs, pareto_over="latency")
    assert [(r["run"], r["pareto"]) for r in rows] == [("c", True), ("a", True), ("b", False), ("d", None)]
    # b (3 ms, 0.85) is dominated by c (1 ms, 0.88); its speed-up over the teacher is 4 / 3 at batch 1
    b = rows[2]
    assert b["student_ort_ms_b1"] == 3.0 and b["speedup_vs_teacher_ort_b1"] == 4.0 / 3.0
    assert b["speedup_vs_teacher_ort_bmax"] == 80.0 / 30.0 and b["latency_max_batch"] == 64
    # Over the largest batch the same order here (ms * 10 against one teacher).
    with pytest.warns(QtemperateWarning):
        assert [r["pareto"] for r in compare_runs(speed_runs, pareto_over="latency", batch="max")] == [
            True, True, False, None]


def test_latencies_of_other_cpus_or_batches_are_not_one_front(tmp_path: Path) -> None:
    from qtemperate.cli import UsageError

    a = _speed_run(tmp_path, "a", 0.1, 0.90, 2.0)
    b = _speed_run(tmp_path, "b", 0.05, 0.85, 3.0, cpu="cpu B")
    assert [r["pareto"] for r in compare_runs([a, b])] == [True, True]  # sizes compare across CPUs
    with pytest.raises(UsageError, match=r"different CPUs \(cpu A: a; cpu B: b\) — a front compares students "
                                         r"of one dataset and one teacher, timed on one CPU"):
        compare_runs([a, b], pareto_over="latency")
    # Asked for: one front per CPU, so each run is on its own.
    assert [r["pareto"] for r in compare_runs([a, b], pareto_over="latency", allow_mixed=True)] == [True, True]
    c = _speed_run(tmp_path, "c", 0.2, 0.80, 1.0, big=256)
    assert [r["pareto"] for r in compare_runs([a, c], pareto_over="latency")] == [True, True]  # batch 1: fine
    with pytest.raises(UsageError, match=r"different largest batch sizes \(batch 64: a; batch 256: c\)"):
        compare_runs([a, c], pareto_over="latency", batch="max")


def test_a_latency_front_without_latencies_is_bad_input(tmp_path: Path) -> None:
    from qtemperate.cli import UsageError

    dirs = [_speed_run(tmp_path, "a", 0.1, 0.9, 2.0), _speed_run(tmp_path, "b", 0.05, 0.85, 3.0)]
    with pytest.raises(UsageError, match=r"no run has student_openvino_ms_b1 \(the deployed student timed in "
                                         r"OpenVINO at batch 1\)"):
        compare_runs(dirs, pareto_over="latency", runtime="openvino")
    with pytest.raises(UsageError, match="--pareto-over 'speed'"):
        compare_runs(dirs, pareto_over="speed")
    with pytest.raises(UsageError, match="--latency-batch '8'"):
        compare_runs(dirs, pareto_over="latency", batch="8")


def test_the_table_carries_latency_and_speedups(speed_runs: list[Path], tmp_path: Path) -> None:
    from qtemperate.compare import format_table

    with pytest.warns(Warning):
        rows = compare_runs(speed_runs, pareto_over="latency")
    text = format_table(rows, pareto_over="latency").splitlines()
    head = text[0].split()
    assert head[6:] == ["ort", "ms", "b1", "ort", "xT", "b1", "ort", "xT", "b64", "pareto"]  # no OpenVINO column
    cells = {line.split()[0]: line.split()[6:] for line in text[1:5]}
    assert cells["b"] == ["3.000", "1.33", "2.67"]  # 4 / 3 and 80 / 30, no star: dominated
    assert cells["c"] == ["1.000", "4.00", "8.00", "*"] and cells["d"] == ["-", "-", "-", "-"]
    assert text[-1].startswith("pareto: front over latency (student_ort_ms_b1) and student accuracy; ms: the "
                               "deployed student")
    # OpenVINO columns appear when a run was timed there; over its largest batch, its ms too.
    ov = compare_runs([_speed_run(tmp_path, "e", 0.1, 0.9, 2.0, openvino=True)], pareto_over="latency",
                      runtime="openvino", batch="max")
    text = format_table(ov, pareto_over="latency", runtime="openvino", batch="max").splitlines()
    assert "ov ms b64" in text[0] and "ov xT b64" in text[0]
    assert text[1].split()[-5:] == ["1.000", "8.000", "2.00", "5.00", "*"]  # ov ms b1, b64; 2 / 1, 40 / 8
    assert format_table(compare_runs([_run(tmp_path, "old", 0.1, 0.9)])).splitlines()[0].split()[-1] == "pareto"


def test_the_plot_is_drawn_over_each_axis(speed_runs: list[Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure's axis, the front joined on it and the note naming a run without latency."""
    import matplotlib.figure

    from qtemperate.cli import UsageError
    from qtemperate.compare import pareto_plot

    seen: list[dict] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig: matplotlib.figure.Figure, *args: object, **kwargs: object) -> None:
        ax = fig.axes[0]
        seen.append({"xlabel": ax.get_xlabel(), "front": [list(line.get_xdata()) for line in ax.get_lines()
                                                           if line.get_color() == "tab:red"],
                     "texts": [t.get_text() for t in ax.texts]})
        save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    with pytest.warns(Warning):
        rows = compare_runs(speed_runs, pareto_over="latency")
    size_png = pareto_plot(rows, tmp_path / "size.png")  # the front is recomputed on the axis drawn
    lat_png = pareto_plot(rows, tmp_path / "lat.png", x="latency")
    for png in (size_png, lat_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    size, lat = seen
    assert size["xlabel"] == "student bytes / teacher float bytes" and size["front"] == [[0.05, 0.1, 0.3]]
    assert lat["xlabel"] == "deployed student latency, ms per batch (onnxruntime at batch 1)"
    assert lat["front"] == [[1.0, 2.0]]
    assert "not drawn (no student_ort_ms_b1): d" in lat["texts"]
    with pytest.raises(UsageError, match="no run has student_openvino_ms_b1"):
        pareto_plot(rows, tmp_path / "ov.png", x="latency", runtime="openvino")


def test_log_comparison_over_latency(speed_runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qtemperate.compare import log_comparison
    from qtemperate.tracking.wandb_reader import read_wandb_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.warns(Warning):
        rows = compare_runs(speed_runs, pareto_over="latency")
    lg = log_comparison(rows, None, tmp_path / "cmp", project="p", name="lat", pareto_over="latency")
    assert lg.run_file is not None
    (run,) = read_wandb_runs(tmp_path / "cmp")
    assert run.summary["pareto_x"] == "student_ort_ms_b1" and run.summary["fastest_student_ms"] == 1.0
    assert run.summary["pareto_runs"] == 2 and run.summary["pareto_scatter_table"]["nrows"] == 4
