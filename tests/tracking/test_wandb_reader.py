"""The production W&B reader against wandb's own inspector, byte damage, and a mocked online API."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qtemperate import tracking as T
from qtemperate.tracking.wandb_reader import (
    WandbReadError,
    find_wandb_run_files,
    read_online_runs,
    read_wandb_run,
    read_wandb_runs,
)
from tests import wandb_reader as leet


@pytest.fixture(scope="module")
def big_run(wandb_env: Path) -> Path:
    """An offline run whose log spans several 32 KiB blocks (records split across them)."""
    run_dir = wandb_env / "big"
    lg = T.WandbLogger("reader-tests", run_dir, group="g", name="big", tags=["t1"],
                       config={"seed": 3, "data": {"name": "digits"}}, system_stats=False, job_type="train")
    for step in range(400):
        lg.log({f"m{k}": step * 0.5 + k for k in range(12)} | {"long": "x" * 300}, step)
    lg.log_summary({"student_acc": 0.75, "stages": [{"name": "w4a4", "accuracy": 0.75}],
                    "onnx_latency_ms": {"1": 0.25}})
    lg.log_table("tradeoff", ["run", "student_acc"], [["big", 0.75]])
    (run_dir / "student.onnx").write_bytes(b"onnx bytes")
    lg.log_artifact(run_dir / "student.onnx", "big-student-onnx", "model", metadata={"bytes": 10, "latency_ms": {"1": 0.25}})
    lg.finish()
    return run_dir


def test_reads_what_wandbs_own_inspector_reads(big_run: Path) -> None:
    files = find_wandb_run_files(big_run)
    assert len(files) == 1 and files[0].stat().st_size > 3 * 32768  # really spans blocks
    run = read_wandb_run(files[0])
    ref = leet.read_offline_run(big_run)
    assert run.run_id == ref["run_id"] and run.project == ref["project"] == "reader-tests"
    assert (run.name, run.group, run.tags, run.job_type) == ("big", "g", ["t1"], "train")
    assert run.config == ref["config"] == {"seed": 3, "data": {"name": "digits"}}
    ours = {k: v for k, v in run.summary.items() if not k.startswith("_")}
    theirs = {k: v for k, v in ref["summary"].items() if not k.startswith("_")}
    assert ours == theirs
    # The flat keys the logger wrote, and the last history values.
    assert ours["stage/w4a4/accuracy"] == 0.75 and ours["onnx_latency_ms/1"] == 0.25
    assert ours["m11"] == 399 * 0.5 + 11 and ours["tradeoff"]["_type"] == "table-file"
    model = [a for a in run.artifacts if a["type"] == "model"]
    assert model == [{"name": "big-student-onnx", "type": "model",
                      "metadata": {"bytes": 10, "latency_ms": {"1": 0.25}}, "files": ["student.onnx"]}]
    assert [a["name"] for a in run.artifacts] == [a["name"] for a in ref["artifacts"]]
    assert run.exit_code == 0 == ref["exit_code"]


def test_a_cut_log_reads_its_whole_records_and_damage_is_named(big_run: Path, tmp_path: Path) -> None:
    data = find_wandb_run_files(big_run)[0].read_bytes()
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(data[: len(data) // 2])  # a run killed mid-write
    run = read_wandb_run(cut)
    assert run.run_id and run.exit_code is None and 0 < run.summary["m0"] < 399 * 0.5
    bad = tmp_path / "run-bad.wandb"
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(damaged))
    with pytest.raises(WandbReadError, match="checksum"):
        read_wandb_run(bad)
    other = tmp_path / "run-other.wandb"
    other.write_bytes(b"PK\x03\x04 not a run")
    with pytest.raises(WandbReadError, match="not a W&B run file"):
        read_wandb_run(other)


def test_a_resumed_run_folds_into_one(wandb_env: Path) -> None:
    run_dir = wandb_env / "resumed"
    first = T.WandbLogger("reader-tests", run_dir, name="r", system_stats=False)
    first.log({"loss": 1.0}, 0)
    first.log_summary({"student_acc": 0.5, "teacher_acc": 0.9})
    first.finish()
    second = T.WandbLogger("reader-tests", run_dir, name="r", resume=True, system_stats=False)
    second.log({"loss": 0.5}, 1)
    second.log_summary({"student_acc": 0.6})
    second.finish()
    assert len(find_wandb_run_files(run_dir)) == 2
    (run,) = read_wandb_runs(run_dir)
    assert run.run_id == first.run_id and run.summary["student_acc"] == 0.6
    assert run.summary["teacher_acc"] == 0.9 and run.summary["loss"] == 0.5
    shutil.rmtree(run_dir)


class _FakeApi:
    """A ``wandb.Api`` stand-in: records the query, returns public-API-like runs."""

    def __init__(self, runs: list[Any] | Exception) -> None:
        self._runs = runs
        self.calls: list[tuple[str, Any]] = []

    def runs(self, path: str, filters: Any = None) -> list[Any]:
        self.calls.append((path, filters))
        if isinstance(self._runs, Exception):
            raise self._runs
        return self._runs


def _online_run(run_id: str, acc: float) -> SimpleNamespace:
    return SimpleNamespace(id=run_id, name=f"run-{run_id}", group="grid", job_type="train", tags=["x"],
                           config={"_wandb": {}, "data": {"name": "digits"}},
                           summary_metrics={"student_acc": acc, "_step": 3})


def test_online_runs_through_the_api_object() -> None:
    api = _FakeApi([_online_run("a1", 0.8), _online_run("b2", 0.7)])
    runs = read_online_runs("wandb:team/proj/grid", api=api)
    assert api.calls == [("team/proj", {"group": "grid"})]
    assert [(r.run_id, r.name, r.entity, r.project, r.group) for r in runs] == [
        ("a1", "run-a1", "team", "proj", "grid"), ("b2", "run-b2", "team", "proj", "grid")]
    assert runs[0].config == {"data": {"name": "digits"}} and runs[0].summary["student_acc"] == 0.8
    api = _FakeApi([])
    read_online_runs("team/proj", api=api)
    assert api.calls == [("team/proj", None)]


def test_online_failures_are_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(WandbReadError, match=r"cannot read the runs from W&B \(ConnectionError: no route"):
        read_online_runs("team/proj", api=_FakeApi(ConnectionError("no route\nto host")))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(WandbReadError, match=r"needs credentials .* and network"):
        read_online_runs("team/proj/grid")
    with pytest.raises(WandbReadError, match="not a W&B path"):
        read_online_runs("team/proj/grid/extra")
