"""Sweeps: the grid's syntax, bad input, a real 4-point offline sweep read back with
``wandb leet inspect``, resumption, and the W&B sweep config run through wandb's agent expansion."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtemperate.cli import UsageError, build_parser, main
from qtemperate.export.speed import SPEED_KEYS
from qtemperate.recipe import RecipeError, load_recipe
from qtemperate.sweep import (
    create_wandb_sweep,
    parse_grid,
    plan_sweep,
    split_values,
    wandb_sweep_config,
)
from qtemperate.tracking.keys import flat_summary
from qtemperate.tracking.tradeoff import TRADEOFF_COLUMNS
from tests import wandb_reader as leet
from tests.pipeline_helpers import tiny_recipe

# --------------------------------------------------------------------------- the grid


def test_split_values_keeps_brackets_braces_and_quotes_whole() -> None:
    assert split_values("0.1, 0.2,0.3") == ["0.1", "0.2", "0.3"]
    assert split_values("[4.0],[6.0, 3.0, 1.0]") == ["[4.0]", "[6.0, 3.0, 1.0]"]
    assert split_values("{schedule: constant, base_temperature: 4},auto") == [
        "{schedule: constant, base_temperature: 4}", "auto"]
    assert split_values("'a,b',\"c,d\"") == ["'a,b'", '"c,d"']


def test_parse_grid_values_are_yaml() -> None:
    (a, b) = parse_grid(["student.target_size_ratio=0.125,0.25", "distillation.temperatures=[4.0],[6.0,3.0,1.0]"])
    assert (a.key, a.values, a.texts) == ("student.target_size_ratio", (0.125, 0.25), ("0.125", "0.25"))
    assert b.values == ([4.0], [6.0, 3.0, 1.0])


@pytest.mark.parametrize(("specs", "message"), [
    ([], "an empty grid"),
    (["student.prune_ratio"], "expected key.path=v1,v2"),
    (["student.prune_ratio="], "an empty grid"),
    (["=0.5"], "expected key.path=v1,v2"),
    (["student.prune_ratio=0.5,,0.7"], "an empty value"),
    (["seed=1,2", "seed=3"], "given twice"),
    (["seed=[1,2"], "not valid YAML"),
])
def test_bad_grids_are_named(specs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_grid(specs)


def _recipe_file(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
    return path


def test_every_point_is_validated_before_anything_runs(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path)
    with pytest.raises(RecipeError, match=r"sweep point 0 \(student\.no_such_key=1\): .*student\.no_such_key: unknown key"):
        plan_sweep(path, parse_grid(["student.no_such_key=1,2"]))
    with pytest.raises(RecipeError, match=r"sweep point 1 \(stages\.0\.weight_bits=9\): .*stages\.0\.weight_bits"):
        plan_sweep(path, parse_grid(["stages.0.weight_bits=8,9"]))
    assert not (tmp_path / "runs").exists()


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(("grid", "field"), [
    (["--grid", "student.no_such_key=1,2"], "student.no_such_key"),
    (["--grid", "seed="], "an empty grid"),
    ([], "an empty grid"),
])
def test_cli_sweep_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   grid: list[str], field: str) -> None:
    path = _recipe_file(tmp_path)
    assert main(["sweep", str(path), *grid]) == 2
    assert field in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_over_latency_needs_every_point_timed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _recipe_file(tmp_path, export={"onnx": True})
    argv = ["sweep", str(path), "--grid", "export.benchmark=true,false", "--pareto-over", "latency"]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "sweep point 1 (export.benchmark=false) does not time its student (export.benchmark: false)" in line
    assert not list((tmp_path / "runs").glob("*/0*"))  # refused before any point ran
    assert main(["sweep", str(path), "--grid", "seed=0,1", "--set", "export.openvino=false",
                 "--pareto-over", "latency", "--latency-runtime", "openvino"]) == 2
    assert "(export.openvino: false)" in _one_line(capsys)


def test_a_folder_holding_another_sweep_is_refused(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path)
    sweep = plan_sweep(path, parse_grid(["seed=0,1"]), name="mine")
    sweep.folder.mkdir(parents=True)
    (sweep.folder / "sweep.json").write_text(json.dumps({"digest": "other"}))
    with pytest.raises(UsageError, match="holds another sweep"):
        plan_sweep(path, parse_grid(["seed=0,1"]), name="mine")
    # The default name carries the digest of recipe and grid: another grid, another folder.
    a = plan_sweep(path, parse_grid(["seed=0,1"]))
    b = plan_sweep(path, parse_grid(["seed=0,2"]))
    assert a.name.startswith("tiny-sweep-") and a.name != b.name


# --------------------------------------------------------------------------- a real sweep


def test_offline_sweep_runs_every_point_in_one_group(offline_sweep: dict) -> None:
    assert offline_sweep["rc"] == 0
    folder: Path = offline_sweep["folder"]
    manifest = json.loads((folder / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["finished"] * 4
    dirs = [Path(p["run_dir"]) for p in manifest["points"]]
    assert [d.name for d in dirs] == ["00-target_size_ratio=0.125,kd_weight=0.5", "01-target_size_ratio=0.125,kd_weight=0.9",
                                      "02-target_size_ratio=0.25,kd_weight=0.5", "03-target_size_ratio=0.25,kd_weight=0.9"]
    for d, (ratio, kd) in zip(dirs, itertools.product((0.125, 0.25), (0.5, 0.9))):
        summary = json.loads((d / "summary.json").read_text())
        recipe = load_recipe(d / "recipe.yaml")
        assert recipe.student.target_size_ratio == ratio and recipe.distillation.kd_weight == kd
        assert summary["compression_ratio"] <= ratio and summary["group"] == "grid4"
    out = offline_sweep["out"]
    assert "pareto plot:" in out and (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(line.startswith(("00-", "01-", "02-", "03-")) for line in out.splitlines()) == 4


def test_each_sweep_run_reads_back_with_leet_inspect(offline_sweep: dict) -> None:
    """The issue's check: tradeoff table, ONNX artifacts and non-colliding keys in W&B."""
    for d in sorted(p for p in offline_sweep["folder"].iterdir() if p.is_dir() and p.name[:2].isdigit()):
        summary = json.loads((d / "summary.json").read_text())
        run = leet.read_offline_run(d)
        assert run["group"] == "grid4" and run["name"] == d.name
        assert {"sweep:grid4", "recipe:tiny", "dataset:digits"} <= set(run["tags"])
        # Every summary.json value under its flat key, unchanged (nothing clobbered it).
        flat = flat_summary(summary)
        assert {k: run["summary"].get(k) for k in flat} == flat
        assert "stages" not in run["summary"] and flat["stage/w4a4/weight_bits"] == 4
        tradeoff = run["tables"]["tradeoff"]
        assert tradeoff["columns"] == TRADEOFF_COLUMNS and len(tradeoff["data"]) == 1
        row = dict(zip(TRADEOFF_COLUMNS, tradeoff["data"][0]))
        assert (row["run"], row["student_acc"], row["compression_ratio"]) == (
            d.name, summary["student_acc"], summary["compression_ratio"])
        assert row["latency_b1_ms"] == summary["onnx_latency_ms"]["1"] and row["weight_bits"] == 4
        # The deployed student (the W8A8 twin) against the float teacher, timed in the same runtime.
        assert summary["deployed_onnx"] == "student_int8.onnx" and row["latency_max_batch"] == 1
        assert row["student_ort_ms_b1"] == summary["int8_onnx_latency_ms"]["1"]
        assert row["speedup_vs_teacher_ort_b1"] == (
            summary["teacher_onnx_latency_ms"]["1"] / summary["int8_onnx_latency_ms"]["1"])
        if summary.get("openvino_latency_ms"):
            assert row["speedup_vs_teacher_openvino_b1"] == (
                summary["teacher_openvino_latency_ms"]["1"] / summary["openvino_latency_ms"]["1"])
        else:
            assert row["speedup_vs_teacher_openvino_b1"] is None and summary["speed_missing"]["openvino"]
        assert {k: row[k] for k in SPEED_KEYS} == {k: summary[k] for k in SPEED_KEYS}
        assert [r[0] for r in run["tables"]["stages_table"]["data"]] == ["w8a8", "w4a4"]
        onnx = {a["name"]: a for a in run["artifacts"] if a["name"].endswith("-onnx")}
        assert sorted(onnx) == ["tiny-student-onnx", "tiny-student.qonnx-onnx", "tiny-student_float-onnx",
                                "tiny-student_int8-onnx", "tiny-teacher-onnx"]
        assert all(a["type"] == "model" for a in onnx.values())
        assert onnx["tiny-student-onnx"]["files"] == ["student.onnx"]


def test_artifact_metadata_is_what_was_measured(offline_sweep: dict) -> None:
    from qtemperate.tracking.wandb_reader import read_wandb_runs

    d = offline_sweep["folder"] / "00-target_size_ratio=0.125,kd_weight=0.5"
    summary = json.loads((d / "summary.json").read_text())
    (run,) = read_wandb_runs(d)
    meta = {a["name"]: a["metadata"] for a in run.artifacts}
    s = meta["tiny-student-onnx"]
    assert s["bytes"] == (d / "student.onnx").stat().st_size == summary["onnx_bytes"]
    assert s["latency_ms"] == summary["onnx_latency_ms"] and s["top1_agreement"] == summary["onnx_top1_agreement"]
    t = meta["tiny-teacher-onnx"]
    assert t["bytes"] == (d / "teacher.onnx").stat().st_size
    assert t["latency_ms"] == summary["teacher_onnx_latency_ms"]
    assert t["top1_agreement"] == summary["teacher_onnx_top1_agreement"]  # its value: tests/export/test_check.py
    i8 = meta["tiny-student_int8-onnx"]
    assert i8["top1_agreement"] == summary["int8_onnx_top1_agreement"] and (i8["weight_bits"], i8["act_bits"]) == (8, 8)
    assert meta["tiny-student"]["student_acc"] == summary["student_acc"]


def test_the_sweep_comparison_is_a_wandb_run_of_the_group(offline_sweep: dict) -> None:
    from qtemperate.tracking.wandb_reader import read_wandb_runs

    (cmp,) = read_wandb_runs(offline_sweep["folder"] / "wandb")
    assert (cmp.group, cmp.job_type, cmp.name) == ("grid4", "compare", "grid4-comparison")
    assert cmp.summary["runs"] == 4 and cmp.summary["comparison"]["nrows"] == 4
    assert cmp.summary["pareto"]["_type"] == "image-file"


def test_rerunning_a_sweep_skips_finished_points(offline_sweep: dict) -> None:
    folder: Path = offline_sweep["folder"]
    before = sorted(str(p) for p in folder.glob("0*/wandb/*run-*"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*offline_sweep["argv"], "--set", "tracking.loggers=[jsonl]"]) == 2  # another recipe: refused
        assert main(offline_sweep["argv"]) == 0
    assert out.getvalue().count("finished before, skipped") == 4
    assert sorted(str(p) for p in folder.glob("0*/wandb/*run-*")) == before  # no run was repeated
    assert "ort ms b1" in out.getvalue() and "ort xT b1" in out.getvalue()  # the table carries the speed


def test_a_sweep_over_latency_on_finished_points(offline_sweep: dict) -> None:
    """The front over the deployed student's onnxruntime latency, on the finished points."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*offline_sweep["argv"], "--pareto-over", "latency"]) == 0
    assert "front over latency (student_ort_ms_b1)" in out.getvalue()
    assert (offline_sweep["folder"] / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- as a W&B sweep


def test_wandb_sweep_agent_runs_each_point_with_qtemperate_run(tmp_path: Path) -> None:
    """Expand the generated command with wandb's own agent code, parse it with our CLI,
    and get each local point's recipe."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    path = _recipe_file(tmp_path)
    sweep = plan_sweep(path, parse_grid(["student.target_size_ratio=0.125,0.25",
                                         "distillation.temperatures=[4.0],[6.0, 3.0, 1.0]",
                                         "stages.0.temperature={schedule: constant, base_temperature: 3}"]),
                       ["seed=2"], name="wb")
    config = wandb_sweep_config(sweep)
    assert config["method"] == "grid" and config["name"] == "wb"
    assert config["parameters"]["student.target_size_ratio"] == {"values": [0.125, 0.25]}
    assert config["parameters"]["distillation.temperatures"] == {"values": [[4.0], [6.0, 3.0, 1.0]]}
    command = sweep_utils.create_sweep_command(config["command"])
    keys = list(config["parameters"])
    combos = itertools.product(*[config["parameters"][k]["values"] for k in keys])
    for point, combo in zip(sweep.points, combos):
        expanded = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in zip(keys, combo)}})
        expanded["env"] = ["/usr/bin/env"]
        argv: list[str] = []
        for c in command:
            argv += (expanded.get(c[2:-1]) or []) if c.startswith("${") else [c]
        assert argv[:3] == ["/usr/bin/env", "qtemperate", "run"]
        args = build_parser().parse_args(argv[2:])
        got = load_recipe(args.recipe, args.set)
        want = point.recipe.model_dump()
        want["tracking"]["tags"] = []  # the local sweep also tags its runs; W&B groups agent runs itself
        assert got.model_dump() == want


def test_creating_a_wandb_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _recipe_file(tmp_path)
    sweep = plan_sweep(path, parse_grid(["seed=0,1"]), name="wb")
    calls = []

    def fake_sweep(**kwargs: Any) -> str:
        calls.append(kwargs)
        return "abc123"

    assert create_wandb_sweep(wandb_sweep_config(sweep), "proj", "team", sweep_fn=fake_sweep) == "abc123"
    assert calls[0]["project"] == "proj" and calls[0]["entity"] == "team"
    assert calls[0]["sweep"]["parameters"] == {"seed": {"values": [0, 1]}}
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert main(["sweep", str(path), "--grid", "seed=0,1", "--wandb-sweep"]) == 2
    assert "needs credentials" in _one_line(capsys)
    assert main(["sweep", str(path), "--grid", "seed=0,1", "--wandb-sweep", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["parameters"] == {"seed": {"values": [0, 1]}} and "${args_no_hyphens}" in printed["command"]
