"""The pipeline as 2 gloo processes (CPU): equivalence with 1 process, resume, identical
ranks, failures that stop every rank with one line, bad input before any training.

Equivalence: 2 processes x 32 samples and 1 process x 64 (``data.batch_size: 64``, the
global batch) read the same global batches (:mod:`qtemperate.data.sharding`), normalise
BatchNorm over the global batch (sync BN) and average gradients, so one step agrees to
rounding (``tests/training/test_distributed.py`` checks 1e-6 after 4 steps). Over a run
that rounding is amplified where the model is discontinuous — a ReLU input that sits at 0 to
rounding (its gradient jumps 0 <-> 1; bench/data_parallel_steps.py: step 35 of 66, 1e-7 -> 3e-5) or a
quantizer's rounding step flips — so whole runs are compared with a tolerance:
the first teacher epoch's test loss to 1e-2 relative (1e-7 when nothing flips, 1e-3 when
one does: both seen), the accuracies to within
``ACC_TOL`` (3 % = 11 of the 359 digits test images). Resume under 2 processes is exact.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qtemperate.errors import EXIT_DIVERGED
from qtemperate.launch import launch_local
from qtemperate.recipe import parse_recipe
from qtemperate.trainer import Trainer
from tests.pipeline_helpers import tiny_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ACC_TOL = 0.03


def _recipe(tmp: Path, **over: Any) -> dict[str, Any]:
    raw = tiny_recipe(tmp, teacher={"model": "small_cnn", "kwargs": {"width": 8}, "train": {"epochs": 2, "lr": 0.05}})
    raw["stages"][1]["epochs"] = 1  # w8a8 1 epoch, w4a4 1 epoch: 2 student epochs
    raw["distributed"] = {"timeout_s": 60}
    for key, value in over.items():
        raw[key] = value
    return raw


def _launch(tmp: Path, name: str, raw: dict[str, Any], nproc: int = 2, grace_s: float = 30.0,
            run_dir: str | None = None, **spec: Any) -> tuple[int, dict[int, dict[str, Any]], float]:
    out = tmp / f"out-{name}"
    out.mkdir()
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps({"recipe": raw, "run_dir": str(tmp / (run_dir or name)), "out": str(out), **spec}))
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    code = launch_local(["-m", "tests.dist_entry", str(spec_file)], nproc, grace_s=grace_s, env=env)
    took = time.monotonic() - t0
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    return code, ranks, took


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["progress"]["history"]


def _rows(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 1-process run and an uninterrupted 2-process run of the same recipe."""
    tmp = tmp_path_factory.mktemp("dp")
    raw = _recipe(tmp)
    one = Trainer(parse_recipe(raw), run_dir=tmp / "one", progress=False).run()
    code, ranks, _ = _launch(tmp, "two", raw)
    assert code == 0, ranks
    return {"tmp": tmp, "raw": raw, "one": one, "two": ranks, "dirs": (tmp / "one", tmp / "two")}


def test_two_processes_match_one_process_with_the_global_batch(runs: dict[str, Any]) -> None:
    one, two = runs["one"], runs["two"][0]["summary"]
    d1, d2 = runs["dirs"]
    # Same architecture and sizes: pruning saw the same teacher up to rounding.
    for key in ("params", "student_bytes", "teacher_params", "compression_ratio"):
        assert two[key] == one[key], key
    l1, l2 = _rows(d1, "teacher/test_loss"), _rows(d2, "teacher/test_loss")
    assert l2[0] == pytest.approx(l1[0], rel=1e-2)  # one epoch: rounding, or one ReLU flipped
    assert two["teacher_acc"] == pytest.approx(one["teacher_acc"], abs=ACC_TOL)
    assert two["student_acc"] == pytest.approx(one["student_acc"], abs=ACC_TOL)
    s1, s2 = _rows(d1, "stage/start_val_loss"), _rows(d2, "stage/start_val_loss")
    assert s2[0] == pytest.approx(s1[0], rel=1e-3)  # the quantized student before QAT
    print("\n1 process x 64 vs 2 processes x 32:",
          {k: (one[k], two[k]) for k in ("teacher_acc", "student_acc")},
          "first teacher epoch test loss", (l1[0], l2[0]))


def test_every_rank_holds_the_same_models(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"][0], runs["two"][1]
    # Teacher after training, student at each stage entry: identical before the broadcast.
    assert r0["agreed"] and all(r0["agreed"]) and r0["agreed"] == r1["agreed"]
    assert r0["synced"] == r1["synced"]
    assert r0["epochs"] == r1["epochs"] and len(r0["epochs"]) == 2  # after every epoch
    assert r0["cache"] is not None and r0["cache"] == r1["cache"]  # gathered teacher logits
    assert r0["summary"] == r1["summary"]  # broadcast from rank 0


def test_rank_zero_alone_writes(runs: dict[str, Any]) -> None:
    _, d2 = runs["dirs"]
    for name in ("summary.json", "checkpoint.pt", "teacher.pt", "student.pt", "metrics.jsonl"):
        assert (d2 / name).is_file(), name
    epochs = _rows(d2, "test/acc")
    assert len(epochs) == 2  # one line per epoch: no second writer
    assert _rows(d2, "stage/ranks_agreed") == [1, 1]


def test_resume_under_two_processes_reproduces_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    tmp, raw = runs["tmp"], runs["raw"]
    code, ranks, _ = _launch(tmp, "cut", raw, stop_after_epochs=1)
    assert code == 1 and all("stop_after_epochs" in r["error"] for r in ranks.values())
    assert not (tmp / "cut" / "summary.json").exists()
    code, ranks, _ = _launch(tmp, "cut-resume", raw, run_dir="cut", resume=True)
    assert code == 0
    full = runs["two"][0]["summary"]
    resumed = ranks[0]["summary"]
    for key in ("student_acc", "stages", "student_bytes", "teacher_acc"):
        assert resumed[key] == full[key], key
    assert _history(tmp / "cut") == _history(runs["dirs"][1])
    assert ranks[0]["epochs"] == runs["two"][0]["epochs"][1:] == ranks[1]["epochs"]


def test_nan_on_one_rank_stops_every_rank_with_the_same_line(
    runs: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    code, ranks, _ = _launch(runs["tmp"], "nan", runs["raw"], fault={"rank": 1, "epoch": 1, "kind": "nan"})
    err = capfd.readouterr().err
    assert code == EXIT_DIVERGED
    assert {r["exit"] for r in ranks.values()} == {EXIT_DIVERGED} and len(ranks) == 2
    lines = [line for line in err.splitlines() if line.startswith("qtemperate: ")]
    assert len(lines) == 1 and "NaN" in lines[0], err


def test_exception_on_one_rank_stops_every_rank_with_its_line(
    runs: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    code, ranks, _ = _launch(runs["tmp"], "boom", runs["raw"], fault={"rank": 1, "epoch": 1, "kind": "raise"})
    err = capfd.readouterr().err
    assert code == 1 and len(ranks) == 2
    want = "rank 1 of 2: RuntimeError: injected failure on rank 1"
    assert ranks[0]["error"] == ranks[1]["error"] == want  # rank 0 stops with rank 1's line
    assert [line for line in err.splitlines() if line.startswith("qtemperate: ")] == [f"qtemperate: {want}"]


def test_a_killed_rank_does_not_leave_the_others_waiting(
    runs: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    code, ranks, _ = _launch(runs["tmp"], "kill", runs["raw"], grace_s=60.0,
                                fault={"rank": 1, "epoch": 1, "kind": "kill"})
    err = capfd.readouterr().err
    assert code == 128 + 9  # the launcher reports the first failure: SIGKILL
    assert ranks[0]["exit"] == 1 and "another process stopped" in ranks[0]["error"]
    assert "qtemperate: rank 0 of 2: the process group failed" in err


def test_a_hanging_rank_ends_at_the_timeout(runs: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    # 30 s: long enough for rank 0's solo work (pruning) on a busy machine, which the
    # other rank waits for under the same timeout.
    raw = dict(runs["raw"], distributed={"timeout_s": 30})
    code, ranks, _ = _launch(runs["tmp"], "hang", raw, grace_s=5.0, fault={"rank": 1, "epoch": 1, "kind": "hang"})
    err = capfd.readouterr().err
    assert code == 1 and ranks[0]["exit"] == 1  # rank 0 gave up on its own; rank 1 was stopped
    assert "distributed.timeout_s" in ranks[0]["error"]
    assert "qtemperate: rank 0 of 2: the process group failed" in err


# -- bad input: one line, exit 2, before any training ------------------------------------------
def _cli(tmp: Path, raw: dict[str, Any], *args: str) -> tuple[int, str]:
    import subprocess

    import yaml

    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "qtemperate", "run", str(path), "--no-progress", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr


def test_bad_input_for_several_processes_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from qtemperate.cli import main

    raw = _recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    # Checked by `--nproc` itself, before any process starts.
    assert main(["run", str(path), "--nproc", "3"]) == 2  # 3 does not divide 64
    assert capsys.readouterr().err.strip().splitlines() == [
        "qtemperate: error: data.batch_size: 64 is the global batch and must be divisible by the number "
        "of processes, 3; use a multiple of 3"]
    assert main(["run", str(path), "--nproc", "2", "--set", "distributed.backend=nccl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distributed.backend: nccl" in err[0]
    assert not (tmp_path / "runs").exists()
    # More processes than the data's batches: the training set (1437 images) holds no
    # global batch of 2048. The ranks load the data, agree and stop before training.
    code, err = _cli(tmp_path, dict(raw, data={"name": "digits", "batch_size": 2048}), "--nproc", "2")
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("qtemperate: error: ")]
    assert code == 2 and len(errors) == 1 and len(lines) == len(set(lines)), err  # each line once
    assert "fewer than one global batch" in errors[0]
    assert not (tmp_path / "runs" / "tiny" / "teacher.pt").exists()
