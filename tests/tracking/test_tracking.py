"""Tests of qtemperate.tracking: JSONL/console output, failure isolation and a real
offline W&B run read back from its ``.wandb`` file."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qtemperate import tracking as T
from tests import wandb_reader

# --------------------------------------------------------------------------- JSONL / console


def test_jsonl_lines_parse_back_exactly(tmp_path: Path) -> None:
    logged = [
        ({"loss": 1 / 3, "acc": 0.875, "phase": "fp32", "bits": 8}, 0),
        ({"loss": 2.5e-7, "lr": 0.1, "flag": True}, 10),
        ({"neg": -1234567.125}, 25),
    ]
    with T.JsonlLogger(tmp_path) as lg:
        for metrics, step in logged:
            lg.log(metrics, step)
        lg.log({"np": np.float32(0.5), "t": torch.tensor(3)}, 30)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    expected = [{"step": s, **m} for m, s in logged] + [{"step": 30, "np": 0.5, "t": 3}]
    assert [json.loads(line) for line in lines] == expected
    assert type(json.loads(lines[3])["t"]) is int
    # A resumed run appends.
    lg2 = T.JsonlLogger(tmp_path)
    lg2.log({"loss": 0.25}, 40)
    lg2.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 40, "loss": 0.25}
    with pytest.raises(ValueError, match="'step'"):
        lg2.log({"step": 1}, 1)


def test_jsonl_config_summary_table_artifact(tmp_path: Path) -> None:
    lg = T.JsonlLogger(tmp_path)
    lg.log_config({"name": "r", "data": {"batch_size": 64}})
    lg.log_summary({"best_acc": 0.9})
    lg.log_summary({"final_acc": 0.85, "best_acc": 0.91})
    lg.log_table("stage results", ["stage", "acc"], [["fp", 0.9], ["w4a4", 0.8]])
    (tmp_path / "student.pt").write_bytes(b"x")
    lg.log_artifact(tmp_path / "student.pt", "r-student", "model")
    lg.finish()
    assert json.loads((tmp_path / "config.json").read_text()) == {"name": "r", "data": {"batch_size": 64}}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_acc": 0.91, "final_acc": 0.85}
    table = json.loads((tmp_path / "tables" / "stage-results.json").read_text())
    assert table == {"columns": ["stage", "acc"], "rows": [["fp", 0.9], ["w4a4", 0.8]]}
    art = json.loads((tmp_path / "artifacts.jsonl").read_text())
    assert art == {"name": "r-student", "type": "model", "path": str((tmp_path / "student.pt").resolve())}
    with pytest.raises(ValueError, match="row 0 has 1 values for 2 columns"):
        lg.log_table("bad", ["a", "b"], [[1]])


def test_console_logger_every_and_format() -> None:
    buf = io.StringIO()
    lg = T.ConsoleLogger(every=2, precision=3, file=buf)
    for step in range(4):
        lg.log({"loss": 1 / (step + 1), "phase": "w8"}, step)
    lg.log_summary({"acc": 0.5})
    lg.log_table("t", ["a", "bb"], [[1, 0.25]])
    assert buf.getvalue().splitlines() == [
        "step 0 | loss 1.000 | phase w8",
        "step 2 | loss 0.333 | phase w8",
        "summary | acc 0.500",
        "table t",
        "a  bb",
        "1  0.250",
    ]
    with pytest.raises(ValueError, match="every"):
        T.ConsoleLogger(every=0)


class _Broken(T.MetricLogger):
    def __init__(self) -> None:
        self.calls = 0
        self.finished = False

    def log(self, metrics: Any, step: int) -> None:
        self.calls += 1
        raise OSError("disk full")

    def finish(self) -> None:
        self.finished = True


def test_multilogger_isolates_a_failing_logger(tmp_path: Path) -> None:
    broken, good = _Broken(), T.JsonlLogger(tmp_path)
    multi = T.MultiLogger([broken, good])
    with pytest.warns(RuntimeWarning, match=r"_Broken.log failed \(OSError: disk full\)") as rec:
        for step in range(3):
            multi.log({"x": float(step)}, step)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert broken.calls == 1
    multi.log_summary({"done": 1})
    multi.finish()
    assert broken.finished
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": s, "x": float(s)} for s in range(3)]
    assert multi.get(T.JsonlLogger) is good and multi.get(T.WandbLogger) is None


def test_build_loggers_kinds(tmp_path: Path) -> None:
    multi = T.build_loggers(["jsonl", "console"], tmp_path, console_every=5)
    assert [type(lg) for lg in multi.loggers] == [T.JsonlLogger, T.ConsoleLogger]
    assert multi.loggers[1].every == 5
    with pytest.raises(KeyError, match=r"tensorboard.*known: console, jsonl, wandb"):
        T.build_loggers(["jsonl", "tensorboard"], tmp_path)


def test_resolve_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert T.resolve_wandb_mode("auto") == "offline"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert T.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert T.resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert T.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert T.resolve_wandb_mode("auto") == "offline"
    assert T.resolve_wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="'cloud'"):
        T.resolve_wandb_mode("cloud")


# --------------------------------------------------------------------------- W&B




HISTORY = [
    {"train/loss": 2.25, "train/acc": 0.125, "phase": "fp32"},
    {"train/loss": 1 / 3, "train/acc": 0.5, "phase": "w8a8"},
    {"train/loss": 0.0625, "train/acc": 0.875, "phase": "w4a4"},
]
STEPS = [0, 50, 100]


@pytest.fixture(scope="module")
def offline_run(wandb_env: Path) -> tuple[T.WandbLogger, dict[str, Any], Path]:
    run_dir = wandb_env / "runs" / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # any W&B failure would fail the test
        lg = T.WandbLogger(
            "qtemperate-tests", run_dir, group="grp", name="demo", mode="auto",
            tags=["test"], config={"seed": 0, "data": {"name": "synthetic"}},
            settings={"x_disable_stats": True},
        )
        assert lg.mode == "offline" and lg.active
        lg.log_config({"stages": [8, 4]})
        for metrics, step in zip(HISTORY, STEPS):
            lg.log(metrics, step)
        lg.log_table("stages", ["stage", "acc"], [["w8a8", 0.5], ["w4a4", 0.875]])
        lg.log_summary({"best_acc": 0.875, "final_phase": "w4a4"})
        artifact = run_dir / "student.pt"
        artifact.write_bytes(b"weights")
        lg.log_artifact(artifact, "demo student", "model")
        lg.finish()
        lg.finish()  # idempotent
    return lg, wandb_reader.read_offline_run(run_dir), run_dir


def test_wandb_offline_run_files(offline_run: tuple[T.WandbLogger, dict[str, Any], Path]) -> None:
    lg, data, run_dir = offline_run
    assert lg.run_path is not None and lg.run_path.parent == run_dir / "wandb"
    assert lg.run_path.name.startswith("offline-run-")
    assert lg.run_file is not None and lg.run_file.is_file() and lg.run_file.suffix == ".wandb"
    assert Path(data["file"]) == lg.run_file and data["run_id"] == lg.run_id
    assert (data["name"], data["project"], data["group"], data["tags"]) == ("demo", "qtemperate-tests", "grp", ["test"])
    assert data["state"] == "finished" and data["exit_code"] == 0


def test_wandb_offline_history_summary_config(offline_run: tuple[T.WandbLogger, dict[str, Any], Path]) -> None:
    _, data, _ = offline_run
    rows = [{k: v for k, v in row.items() if k in HISTORY[0]} for row in data["history"]]
    assert [row["_step"] for row in data["history"]] == STEPS
    assert rows == HISTORY
    summary = data["summary"]
    assert summary["best_acc"] == 0.875 and summary["final_phase"] == "w4a4"
    assert summary["train/loss"] == 0.0625 and summary["_step"] == 100
    assert data["config"] == {"seed": 0, "data": {"name": "synthetic"}, "stages": [8, 4]}
    assert data["tables"]["stages"] == {"columns": ["stage", "acc"], "data": [["w8a8", 0.5], ["w4a4", 0.875]]}
    model = [a for a in data["artifacts"] if a["type"] == "model"]
    assert model == [{"name": "demo-student", "type": "model", "files": ["student.pt"]}]


def test_wandb_init_failure_warns_once(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def boom(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="wandb.init failed: ConnectionError: no network") as rec:
        lg = T.WandbLogger("p", wandb_env / "runs" / "broken", mode="online")
        lg.log({"loss": 1.0}, 0)
        lg.log_summary({"a": 1})
        lg.log_table("t", ["a"], [[1]])
        lg.log_artifact(wandb_env, "x", "model")
        lg.finish()
    assert len(rec) == 1
    assert not lg.active and lg.run_path is None and lg.run_id is None


def test_wandb_midrun_failure_disables(wandb_env: Path) -> None:
    lg = T.WandbLogger("p", wandb_env / "runs" / "midrun", settings={"x_disable_stats": True})
    assert lg.active
    real_log = lg.run.log
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise RuntimeError("service died")

    lg.run.log = flaky
    with pytest.warns(RuntimeWarning, match="run.log failed: RuntimeError: service died") as rec:
        lg.log({"loss": 1.0}, 0)
        lg.log({"loss": 0.5}, 1)
        lg.log_summary({"a": 1})
    assert len(rec) == 1 and len(calls) == 1 and not lg.active
    lg.run.log = real_log
    lg.finish()
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        wandb_reader.read_offline_run(wandb_env / "nothing-here")


def test_wandb_disabled_mode_makes_no_files(tmp_path: Path) -> None:
    lg = T.WandbLogger("p", tmp_path / "run", mode="disabled")
    lg.log({"x": 1}, 0)
    lg.finish()
    assert lg.run is None and not (tmp_path / "run").exists()


def test_wandb_resume_continues_the_same_run(wandb_env: Path) -> None:
    run_dir = wandb_env / "runs" / "resumed"
    first = T.WandbLogger("p", run_dir, settings={"x_disable_stats": True})
    first.log({"loss": 1.0}, 0)
    first.finish()
    assert (run_dir / T.RUN_ID_FILE).read_text() == first.run_id
    second = T.WandbLogger("p", run_dir, resume=True, settings={"x_disable_stats": True})
    assert second.run_id == first.run_id
    second.log({"loss": 0.5}, 1)
    second.finish()
    fresh = T.WandbLogger("p", run_dir, settings={"x_disable_stats": True})  # no resume: a new run
    assert fresh.run_id != first.run_id
    fresh.finish()


def test_artifact_metadata_and_images_in_jsonl_and_old_loggers(tmp_path: Path) -> None:
    class OldLogger(T.MetricLogger):  # written before artifacts had metadata
        def __init__(self) -> None:
            self.got: list[tuple[Any, ...]] = []

        def log(self, metrics: Any, step: int) -> None:
            pass

        def log_artifact(self, path: Any, name: str, type: str) -> None:
            self.got.append((name, type))

    old, jl = OldLogger(), T.JsonlLogger(tmp_path)
    multi = T.MultiLogger([old, jl])
    (tmp_path / "m.onnx").write_bytes(b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        multi.log_artifact(tmp_path / "m.onnx", "r-m-onnx", "model", metadata={"bytes": 1, "latency_ms": {"1": 0.5}})
        multi.log_image("schedule", tmp_path / "s.png")
    assert old.got == [("r-m-onnx", "model")] and old not in multi.failed
    records = [json.loads(line) for line in (tmp_path / "artifacts.jsonl").read_text().splitlines()]
    assert records[0]["metadata"] == {"bytes": 1, "latency_ms": {"1": 0.5}}
    assert records[1] == {"name": "schedule", "type": "image", "path": str((tmp_path / "s.png").resolve())}
