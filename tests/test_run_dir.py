"""Run folders: one owner (an OS lock naming its PID), race-free fresh folders, resume checks."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import yaml

from qtemperate.errors import ResumeMismatch, RunFolderBusy, UsageError
from qtemperate.recipe import parse_recipe
from qtemperate.run_dir import (
    LOCK_FILE,
    check_allow_changes,
    check_resume_compatible,
    claim_fresh,
    claim_run_dir,
    truncate_metrics,
)
from tests.pipeline_helpers import tiny_recipe


def _hold(path: str, ready: mp.Event, done: mp.Event) -> None:  # runs in a child process
    with claim_run_dir(path):
        ready.set()
        done.wait(30)


def test_second_owner_gets_the_holders_pid(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path / "run"), ready, done))
    child.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunFolderBusy, match=f"in use by another qtemperate process \\(PID {child.pid}\\)"):
            claim_run_dir(tmp_path / "run", resume=False)
        (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
        with pytest.raises(RunFolderBusy, match=str(child.pid)):
            claim_run_dir(tmp_path / "run", resume=True)
    finally:
        done.set()
        child.join(30)
    # The OS dropped the lock with the process: the folder is usable again.
    with claim_run_dir(tmp_path / "run", resume=True) as folder:
        assert (folder.path / LOCK_FILE).read_text().strip() == str(os.getpid())


def _claim_fresh(base: str, queue: mp.Queue, go: mp.Event) -> None:  # child process
    go.wait(30)
    folder = claim_fresh(base)
    (folder.path / "recipe.yaml").write_text("x")  # the run starts writing
    queue.put(folder.path.name)
    folder.release()


def test_fresh_runs_started_together_get_distinct_folders(tmp_path: Path) -> None:
    # fork: four processes racing for the same folders within milliseconds (spawn would
    # spend seconds importing torch in each child and let them arrive one by one).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_fresh, args=(str(tmp_path / "runs" / "tiny"), queue, go)) for _ in range(4)]
    for p in procs:
        p.start()
    go.set()
    names = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert names == ["tiny", "tiny-2", "tiny-3", "tiny-4"]


def test_claim_is_reentrant_and_fresh_folder_is_removed_on_early_failure(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError), claim_run_dir(path) as outer:
        with claim_run_dir(path) as inner:
            assert inner is outer
        raise RuntimeError("bad input found before anything was written")
    assert not path.exists() and (tmp_path / "runs").is_dir()


def test_bad_run_folders_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        claim_run_dir(tmp_path / "file")
    with pytest.raises(UsageError, match=r"is a symlink to .*nowhere, which does not exist"):
        claim_run_dir(tmp_path / "dangling")
    with pytest.raises(UsageError, match=r"cannot create run folder .*file is a file"):
        claim_run_dir(tmp_path / "file" / "run")
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        claim_run_dir(done)
    with pytest.raises(UsageError, match="--resume: no qtemperate run"):
        claim_run_dir(done, resume=True)
    assert sorted(p.name for p in done.iterdir()) == ["summary.json"]  # untouched


def test_stale_temp_files_are_removed_on_claim(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    (run / ".checkpoint.pt.k2j3.tmp").write_bytes(b"half")
    with claim_run_dir(run, resume=True):
        assert not (run / ".checkpoint.pt.k2j3.tmp").exists()


def test_truncate_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    truncate_metrics(tmp_path, 12)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    truncate_metrics(tmp_path, None)
    truncate_metrics(tmp_path, 100)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _recorded(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    recipe = parse_recipe(tiny_recipe(tmp_path))
    (run / "recipe.yaml").write_text("# header\n" + recipe.to_yaml())
    (run / "teacher.pt").write_bytes(b"x")
    return run


def test_resume_refuses_result_changing_fields_by_name(tmp_path: Path) -> None:
    run = _recorded(tmp_path)
    same = parse_recipe(tiny_recipe(tmp_path))
    assert check_resume_compatible(run, same) == []
    raw = tiny_recipe(tmp_path, seed=3)
    raw["stages"][1]["epochs"] = 5
    raw["output_dir"] = str(tmp_path / "elsewhere")  # ignored: the folder is chosen
    with pytest.raises(ResumeMismatch) as info:
        check_resume_compatible(run, parse_recipe(raw), allow=["data.num_workers"])
    msg = str(info.value)
    assert "seed (0 -> 3)" in msg and "stages.1.epochs (2 -> 5)" in msg and "output_dir" not in msg
    assert f"teacher.checkpoint: {run / 'teacher.pt'}" in msg
    assert yaml.safe_load((run / "recipe.yaml").read_text())["seed"] == 0  # nothing written


def test_safe_fields_need_an_explicit_allow(tmp_path: Path) -> None:
    run = _recorded(tmp_path)
    raw = tiny_recipe(tmp_path, data={"num_workers": 2}, tracking={"log_every": 7})
    changed = parse_recipe(raw)
    with pytest.raises(ResumeMismatch, match=r"--allow-change data.num_workers --allow-change tracking.log_every"):
        check_resume_compatible(run, changed)
    diffs = check_resume_compatible(run, changed, allow=["data.num_workers", "tracking"])
    assert sorted(d[0] for d in diffs) == ["data.num_workers", "tracking.log_every"]
    with pytest.raises(UsageError, match=r"--allow-change data\.batch_size: not a field"):
        check_allow_changes(["data.batch_size"])
