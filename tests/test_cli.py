"""The command line: bad input exits 2 with one line naming the field; plan; compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from qtemperate.cli import main
from tests.numerics import assert_accuracy_explained
from tests.numerics import assert_figures_explained as explained
from tests.pipeline_helpers import tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


BAD = [
    ({"stages": [{"epochs": 1, "weight_bits": 9, "act_bits": 8}]}, "stages.0.weight_bits"),
    ({"stages": [{"epochs": 0, "weight_bits": 8, "act_bits": 8}]}, "stages.0.epochs"),
    ({"stages": [{"epochs": 1}]}, "stages"),
    ({"distillation": {"temperatures": [4.0, -1.0]}}, "distillation.temperatures"),
    ({"distillation": {"temperatures": [4.0, 2.0], "weights": [1.0, -1.0]}}, "distillation.weights"),
    ({"colour": "blue"}, "colour"),
    ({"teacher": {"model": "small_cnn", "train": {"epochs": 1}, "chekpoint": "x"}}, "teacher.chekpoint"),
]


@pytest.mark.parametrize(("patch", "field"), BAD)


def test_validate_bad_recipe_exits_2_naming_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], patch: dict, field: str) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path, **patch))
    assert main(["validate", str(path)]) == 2
    line = _one_error_line(capsys)
    assert field in line and str(path) in line


def test_malformed_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: [\n")
    assert main(["run", str(p)]) == 2
    assert "malformed YAML" in _one_error_line(capsys)


@pytest.mark.parametrize("verb", ["run", "validate"])
def test_a_recipe_that_is_not_utf8_text_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str) -> None:
    p = tmp_path / "garbage.yaml"
    p.write_bytes(b"name: x\n\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    assert main([verb, str(p)]) == 2
    line = _one_error_line(capsys)
    assert str(p) in line and "not UTF-8 text" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("verb", ["run", "validate"])
def test_a_teacher_checkpoint_with_nan_weights_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    from qtemperate.models import build_model

    state = build_model("small_cnn", num_classes=10, in_channels=1, width=8).state_dict()
    state["bn1.running_var"][3] = float("nan")  # the first non-finite tensor (in state-dict order)
    state["fc.weight"][0, 0] = float("inf")
    ckpt = tmp_path / "diverged.pt"
    torch.save(state, ckpt)
    raw = tiny_recipe(tmp_path, teacher={"model": "small_cnn", "kwargs": {"width": 8}, "checkpoint": str(ckpt), "train": None})
    extra = ["--no-progress"] if verb == "run" else ["--check-files"]  # validate reads files on request
    assert main([verb, str(_write(tmp_path, raw)), *extra]) == 2
    line = _one_error_line(capsys)
    assert "teacher.checkpoint" in line and str(ckpt) in line and "'bn1.running_var'" in line and "NaN" in line
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_missing_checkpoint_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_recipe(tmp_path, teacher={"model": "small_cnn", "checkpoint": str(tmp_path / "nope.pt"), "train": None})
    path = _write(tmp_path, raw)
    assert main(["run", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "teacher.checkpoint" in line and "nope.pt" in line
    assert not (tmp_path / "runs").exists()


def test_class_count_mismatch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qtemperate.models import build_model

    ckpt = tmp_path / "teacher100.pt"
    torch.save(build_model("small_cnn", num_classes=100, in_channels=1, width=8).state_dict(), ckpt)
    raw = tiny_recipe(tmp_path, teacher={"model": "small_cnn", "kwargs": {"width": 8}, "checkpoint": str(ckpt), "train": None})
    assert main(["run", str(_write(tmp_path, raw))]) == 2
    line = _one_error_line(capsys)
    assert "teacher.checkpoint" in line and "100" in line and "10 classes" in line


def test_missing_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_recipe(tmp_path, data={"name": "cifar10", "root": str(tmp_path / "no-cifar")})
    assert main(["run", str(_write(tmp_path, raw))]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("qtemperate: error: data:") and "no-cifar" in line


def test_bad_set_override_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["validate", str(path), "--set", "stages.5.epochs=2"]) == 2
    assert "stages.5" in _one_error_line(capsys)


def test_resume_without_checkpoint_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path))
    existing = tmp_path / "runs" / "tiny"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("keep me")
    assert main(["run", str(path), "--resume"]) == 2
    assert "--resume" in _one_error_line(capsys)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_every_shipped_recipe_validates(capsys: pytest.CaptureFixture[str]) -> None:
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
    assert recipes
    assert main(["validate", *recipes]) == 0
    assert capsys.readouterr().out.count("ok:") == len(recipes)


def test_plan_json_resnet50_meets_one_eighth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(ROOT / "recipes" / "resnet50_1of8.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compression_ratio"] <= 0.125
    # Independent check of the ratio's definition and of the teacher's float bytes.
    assert out["teacher_float_bytes"] == 4 * 25_557_032
    assert out["compression_ratio"] == pytest.approx(out["student_bytes"] / out["teacher_float_bytes"])
    assert [(s["weight_bits"], s["act_bits"]) for s in out["stages"]] == [(8, 8), (4, 4)]
    assert out["stages"][0]["bytes"] > out["stages"][1]["bytes"]
    # the numbers the planner gave before it counted bytes from widths (one DepGraph)
    from tests.test_planner import RESNET50_1OF8_BEFORE

    # The sizes are today's to the byte (the schedule keys of `plan` are tested with --plot).
    assert {k: out[k] for k in RESNET50_1OF8_BEFORE} == RESNET50_1OF8_BEFORE


def test_compare_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = []
    for i, (ratio, acc) in enumerate([(0.1, 0.9), (0.05, 0.85), (0.2, 0.88)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "teacher_acc": 0.92, "student_acc": acc, "acc_drop": 0.92 - acc, "compression_ratio": ratio,
            "student_bytes": ratio * 1e6, "params": 1000, "onnx_latency_ms": {"1": 0.5},
            "int8_onnx_latency_ms": {"1": 0.25 * (3 - i), "64": 4.0}, "teacher_onnx_latency_ms": {"1": 1.0, "64": 8.0},
        }))
        dirs.append(str(d))
    out_png = tmp_path / "pareto.png"
    assert main(["compare", *dirs, "--out", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "run1" in text and "pareto plot" in text
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [line for line in text.splitlines() if line[:3] == "run" and line[3:4].isdigit()]
    assert [line.split()[0] for line in lines] == ["run1", "run0", "run2"]  # sorted by size
    assert lines[2].split()[-3:] == ["0.250", "4.00", "2.00"]  # run2: int8 b1 ms, x teacher at b1, b64; no star
    # Over latency (onnxruntime, batch 1): run2 is the fastest and on the front, run1 dominated by it.
    assert main(["compare", *dirs, "--out", str(out_png), "--pareto-over", "latency"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line[:3] == "run" and line[3:4].isdigit()]
    assert [(line.split()[0], line.split()[-1]) for line in lines] == [("run2", "*"), ("run1", "2.00"),
                                                                       ("run0", "*")]
    assert "front over latency (student_ort_ms_b1)" in text
    assert main(["compare", *dirs, "--no-plot", "--pareto-over", "latency", "--latency-runtime", "openvino"]) == 2
    assert "no run has student_openvino_ms_b1" in _one_error_line(capsys)


def test_compare_missing_summary_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path), "--no-plot"]) == 2
    assert "summary.json" in _one_error_line(capsys)


def test_run_prints_summary_and_never_overwrites_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_recipe(tmp_path, teacher={"model": "small_cnn", "kwargs": {"width": 8}, "train": {"epochs": 1, "lr": 0.05}})
    path = _write(tmp_path, raw)
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "student accuracy:" in out and "compression_ratio" in out
    first = tmp_path / "runs" / "tiny"
    summary = json.loads((first / "summary.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    # Same recipe again: a fresh folder, the first run untouched.
    assert main(["run", str(path), "--no-progress", "--set", "stages.1.epochs=1"]) == 0
    second = tmp_path / "runs" / "tiny-2"
    assert (second / "summary.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
    assert json.loads((first / "summary.json").read_text()) == summary
    assert "epochs: 1" in (second / "recipe.yaml").read_text()


def test_run_a_multi_output_detector_with_per_head_temperatures(tmp_path: Path) -> None:
    """The shipped toy-detector recipe through `qtemperate run` (shrunk): the seed's detection
    case — feature T = 5, class head T = 3, fine-tune T = 1 — from the recipe's
    distillation.head_temperatures, the box head trained by smooth L1 and not distilled."""
    from qtemperate.checkpoint import load_student
    from qtemperate.data import build_datasets

    run_dir = tmp_path / "det"
    small = ["data.kwargs.n_train=384", "data.kwargs.n_test=128", "teacher.train.epochs=2",
             "stages.0.epochs=1", "stages.1.epochs=1", "tracking.loggers=[jsonl]", "tracking.log_every=1",
             "export.benchmark=false", "export.openvino=false", "export.qonnx=false", "export.verify_samples=64",
             f"output_dir={tmp_path}"]
    args = ["run", str(ROOT / "recipes" / "synthetic_detection.yaml"), "--run-dir", str(run_dir), "--no-progress"]
    assert main([*args, *(x for s in small for x in ("--set", s))]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher_logits_cached"] is True  # the dict of heads was cached per head

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert {r["epoch"] for r in train} == {0, 1, 2}
    for r in train:
        want = (5.0, 3.0) if r["epoch"] < 2 else (1.0, 1.0)  # float, w8a8 | fine-tune
        assert (r["train/T_features_scale5"], r["train/T_logits_scale3"]) == want
        assert r["train/kd_features_T5"] >= 0 and r["train/kd_logits_T3"] >= 0
        assert r["train/task_boxes"] >= 0 and r["train/task_logits"] >= 0
        assert not any(k.startswith("train/kd_boxes") for k in r)  # weight 0: not distilled
    assert [s["weight_bits"] for s in summary["stages"]] == [32, 8, 4]
    # Every head exported under its name and checked against PyTorch, the graph exactly.
    import onnx

    graph = onnx.load(str(run_dir / "student.onnx")).graph
    assert [o.name for o in graph.output] == ["features", "logits", "boxes"]
    heads = summary["onnx_outputs"]
    assert set(heads) == {"features", "logits", "boxes"}
    assert heads["logits"]["deployed_agreement"] is not None
    assert heads["boxes"]["graph_agreement"] is None  # regression: max |diff| only

    # student_acc is the accuracy of the `logits` head (task.accuracy_head), recomputed here
    # independently from student.pt and the test split.
    student, _ = load_student(run_dir / "student.pt")
    bundle = build_datasets("synthetic_detection", val_fraction=0.1, seed=0, n_train=384, n_test=128,
                            num_classes=3)
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.stack([bundle.test[i][1]["labels"] for i in range(len(bundle.test))])
    assert_accuracy_explained(summary["student_acc"], student, x, y, output="logits", what="logits head")
    # The graph is exact per head: |Δ| <= 2 γ_L max|head|, agreement >= 1 - near-ties / N
    # (the first 64 test samples were verified; tests.numerics)
    for h in heads:
        explained(heads[h]["graph_agreement"], heads[h]["graph_max_abs_diff"], student, x[:64], output=h,
                  what=f"graph session, head {h}")


def test_a_bug_exits_1_with_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import qtemperate.planner as planner

    def broken(recipe: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(planner, "plan_recipe", broken)
    assert main(["plan", str(_write(tmp_path, tiny_recipe(tmp_path)))]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1] == (
        "qtemperate: error: internal error (a bug, please report it): ZeroDivisionError: division by zero")


def test_degenerate_settings_warn_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_recipe(tmp_path)
    raw["stages"][1].update(weight_bits=2, act_bits=2)
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qtemperate: warning: {path}: stages.1: W2A2: 2-bit stages rarely keep a useful accuracy; "
                   "expect a large drop"]


def test_unreachable_target_in_plan_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_recipe(tmp_path, student={"target_size_ratio": 0.002, "max_layer_ratio": 0.5})
    assert main(["plan", str(_write(tmp_path, raw))]) == 2
    assert _one_error_line(capsys).startswith("qtemperate: error: student.target_size_ratio=0.002 not reachable")


def test_plan_plot_draws_the_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path))
    png = tmp_path / "schedule.png"
    assert main(["plan", str(path), "--plot", str(png), "--json",
                 "--set", "stages.1.temperature.base_temperature=auto", "hardware=mobile"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["epoch"] for row in out["schedule"]] == [0, 1, 2]
    assert [(row["weight_bits"], row["act_bits"]) for row in out["schedule"]] == [(8, 8), (4, 4), (4, 4)]
    assert out["switches"][0].startswith("base_temperature auto -> T = ")
    assert "class counts not read (dry run)" in out["switches"][0]
    assert out["schedule"][-1]["T"] == 1.0 and out["reference_temperatures"] == [6.0, 3.0, 1.0]


def test_validate_accepts_auto_and_warns_when_the_test_split_drives_t(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["validate", str(path), "--set", "stages.0.temperature.base_temperature=auto"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["validate", str(path), "--set", "data.val_fraction=0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qtemperate: warning: ") and "follow the TEST loss" in err[0]
    assert main(["validate", str(path), "--set", "hardware=phone"]) == 2
    assert "hardware" in _one_error_line(capsys)


def test_compare_bad_sources_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes").mkdir()
    assert main(["compare", str(tmp_path / "notes"), "--no-plot"]) == 2
    assert "summary.json" in _one_error_line(capsys)
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert main(["compare", "wandb:team/proj/group", "--no-plot"]) == 2
    line = _one_error_line(capsys)
    assert "needs credentials" in line and "offline, pass the runs' folders" in line


def test_compare_logs_to_wandb_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = []
    for i, (ratio, acc) in enumerate([(0.1, 0.9), (0.05, 0.85)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "teacher_acc": 0.92, "student_acc": acc, "acc_drop": 0.92 - acc, "compression_ratio": ratio,
            "student_bytes": ratio * 1e6}))
        dirs.append(str(d))
    assert main(["compare", *dirs, "--out", str(tmp_path / "p.png"), "--log-to-wandb", "--offline",
                 "--group", "g"]) == 0
    out = capsys.readouterr().out
    assert "comparison logged to W&B:" in out and ".wandb" in out
    from qtemperate.tracking.wandb_reader import read_wandb_runs

    (run,) = read_wandb_runs(tmp_path / "wandb")
    assert (run.group, run.job_type, run.summary["runs"]) == ("g", "compare", 2)


def test_run_set_takes_several_overrides(tmp_path: Path) -> None:
    from qtemperate.cli import build_parser

    args = build_parser().parse_args(["run", "r.yaml", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.recipe == "r.yaml" and args.set == ["a=1", "b=2", "c=3"]


def _modules_after(argv: list[str]) -> dict:
    """Run ``qtemperate <argv>`` in a fresh interpreter; which heavy packages did it import?"""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from qtemperate.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(json.dumps({'rc': rc, **{m: m in sys.modules for m in ('brevitas', 'onnxruntime', 'wandb')}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_verbs_that_need_no_brevitas_do_not_import_it(tmp_path: Path) -> None:
    """validate, plan and compare start without Brevitas (it costs seconds of start-up)."""
    recipe = str(ROOT / "recipes" / "fashion_mnist_quickstart.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "teacher_acc": 0.9, "student_acc": 0.88, "acc_drop": 0.02, "compression_ratio": 0.1,
        "student_bytes": 1e5, "params": 1000}))
    for argv in (["validate", recipe], ["plan", recipe, "--json"], ["compare", str(run), "--no-plot"]):
        seen = _modules_after(argv)
        assert seen == {"rc": 0, "brevitas": False, "onnxruntime": False, "wandb": False}, argv
