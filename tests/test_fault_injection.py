"""Fault injection against the real CLI: kills, signals, full disks, two runs, malicious files.

Every case ends in the stated exit code with one line on stderr, keeps what it says it
keeps, and a ``--resume`` afterwards reaches the result (and the ``metrics.jsonl``,
line for line) of a run that was never interrupted.

The kill tests run ``python -m qtemperate.cli`` in subprocesses that stop themselves at
an injected point (:mod:`qtemperate._faults`) and get a real signal from outside.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qtemperate import _faults
from qtemperate.cli import main
from qtemperate.training.checkpointing import load_training_checkpoint
from tests import fault_helpers as F
from tests.malicious import evil_cifar_batch, evil_torch_file

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def recipe(work: Path) -> Path:
    return F.fault_recipe(work)


@pytest.fixture(scope="module")
def reference(work: Path, recipe: Path) -> Path:
    """One uninterrupted run: what every interrupted-and-resumed run must reproduce."""
    res = F.run("run", recipe, "--no-progress", "--run-dir", work / "ref", cwd=work)
    assert res.rc == 0, res.err
    return work / "ref"


def _one_line(res: F.Result) -> str:
    assert len(res.lines) == 1, res.err
    assert "Traceback" not in res.err
    return res.lines[0]


# --------------------------------------------------------------------------- kill -9 / SIGTERM / Ctrl-C


@pytest.fixture(scope="module")
def chain(work: Path, recipe: Path, reference: Path) -> dict[str, Any]:
    """One run folder killed at every kind of point in turn, then resumed to the end."""
    run_dir = work / "killed"
    args = ("run", recipe, "--no-progress", "--run-dir", run_dir)
    resume = (*args, "--resume")
    steps: dict[str, Any] = {}
    # Teacher epoch 2 of 2 (19 steps per epoch): teacher_training.pt holds epoch 1.
    steps["teacher"] = (F.stop_and_signal(*args, cwd=work, point="teacher_step@30", sig=signal.SIGKILL),
                        sorted(p.name for p in run_dir.iterdir()))
    # The switch from W8A8 to W4A4 (the first stage entry is switch 1).
    steps["stage_switch"] = (F.stop_and_signal(*resume, cwd=work, point="stage_switch@2", sig=signal.SIGKILL),
                             load_training_checkpoint(run_dir / "checkpoint.pt").progress.epoch)
    # SIGTERM at the next switch (restoring W8A8 from the checkpoint is not a switch).
    steps["sigterm"] = (F.stop_and_signal(*resume, cwd=work, point="stage_switch@1", sig=signal.SIGTERM),
                        load_training_checkpoint(run_dir / "checkpoint.pt").progress.epoch)
    # Inside the write of the next checkpoint: the temp file is complete, not yet renamed.
    steps["checkpoint_write"] = (
        F.stop_and_signal(*resume, cwd=work, point="write:checkpoint.pt@1", sig=signal.SIGKILL),
        F.temp_files(run_dir), load_training_checkpoint(run_dir / "checkpoint.pt").progress.epoch)
    # Inside the ONNX export at the end.
    steps["export"] = (F.stop_and_signal(*resume, cwd=work, point="write:student.onnx@1", sig=signal.SIGKILL),
                       F.temp_files(run_dir), sorted(p.name for p in run_dir.iterdir()))
    steps["final"] = F.run(*resume, cwd=work)
    steps["again"] = F.run(*resume, cwd=work)  # a finished run: nothing redone
    steps["run_dir"] = run_dir
    return steps


@pytest.mark.slow
def test_kill_during_teacher_training_keeps_the_last_teacher_epoch(chain: dict[str, Any]) -> None:
    res, files = chain["teacher"]
    assert res.rc == -signal.SIGKILL
    assert "teacher_training.pt" in files and "teacher.pt" not in files and "checkpoint.pt" not in files


@pytest.mark.slow
def test_kill_at_a_stage_switch_keeps_the_previous_epoch(chain: dict[str, Any]) -> None:
    res, epoch = chain["stage_switch"]
    assert res.rc == -signal.SIGKILL and epoch == 0  # the W8A8 epoch's checkpoint


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(chain: dict[str, Any], recipe: Path) -> None:
    res, epoch = chain["sigterm"]
    assert res.rc == 143 and epoch == 0
    run_dir = chain["run_dir"]
    assert _one_line(res) == (
        f"qtemperate: terminated (SIGTERM); kept in {run_dir}: checkpoint.pt (after epoch 1 of 3), "
        f"teacher.pt (the trained teacher); continue with: qtemperate run {recipe} --resume --run-dir {run_dir}"
    )


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(chain: dict[str, Any]) -> None:
    res, temps, epoch = chain["checkpoint_write"]
    assert res.rc == -signal.SIGKILL and epoch == 0
    assert len(temps) == 1 and temps[0].startswith(".checkpoint.pt.")


@pytest.mark.slow
def test_kill_inside_the_export_leaves_no_truncated_onnx(chain: dict[str, Any]) -> None:
    res, temps, files = chain["export"]
    assert res.rc == -signal.SIGKILL
    assert "student.onnx" not in files and "summary.json" not in files and "student.pt" in files
    assert temps == [] or all(t.startswith(".student.onnx.") for t in temps)


@pytest.mark.slow
def test_resumed_after_every_kill_equals_the_uninterrupted_run(chain: dict[str, Any], reference: Path) -> None:
    assert chain["final"].rc == 0, chain["final"].err
    run_dir = chain["run_dir"]
    assert F.result_of(run_dir) == F.result_of(reference)
    assert F.metrics(run_dir) == F.metrics(reference)  # no record twice, none missing
    assert F.temp_files(run_dir) == [] and not (run_dir / "teacher_training.pt").exists()
    again = chain["again"]
    assert again.rc == 0 and "student accuracy:" in again.out


# --------------------------------------------------------------------------- two runs, one folder


@pytest.mark.slow
def test_two_runs_never_share_a_folder(work: Path, recipe: Path, reference: Path) -> None:
    runs = work / "runs"  # the recipe's output_dir
    holder = F.start("run", recipe, "--no-progress", cwd=work, fault="teacher_step@1=stop")
    F.wait_stopped(holder)
    try:
        busy = F.run("run", recipe, "--no-progress", "--run-dir", runs / "tiny", cwd=work)
        assert busy.rc == 3
        assert _one_line(busy) == (
            f"qtemperate: error: run folder {runs / 'tiny'} is in use by another qtemperate process "
            f"(PID {holder.pid}); wait for it to finish or choose another folder with --run-dir")
        resuming = F.run("run", recipe, "--no-progress", "--resume", cwd=work)
        assert resuming.rc == 3 and f"PID {holder.pid}" in _one_line(resuming)
        second = F.run("run", recipe, "--no-progress", cwd=work)  # a fresh run takes the next folder
        assert second.rc == 0, second.err
        assert f"run:               {runs / 'tiny-2'}" in second.out
    finally:
        ctrl_c = F.signal_stopped(holder, signal.SIGINT)
    assert ctrl_c.rc == 130
    assert _one_line(ctrl_c).startswith(
        f"qtemperate: interrupted; kept in {runs / 'tiny'}: no checkpoint yet (--resume starts from the beginning)")
    first = F.run("run", recipe, "--no-progress", "--resume", cwd=work)
    assert first.rc == 0, first.err
    for run_dir in (runs / "tiny", runs / "tiny-2"):
        assert F.result_of(run_dir) == F.result_of(reference)
        assert F.metrics(run_dir) == F.metrics(reference)


# --------------------------------------------------------------------------- disk full, read-only


def _userns_tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _userns_tmpfs_works(), reason="no user namespace to mount a small tmpfs in")
def test_disk_full_on_a_real_tmpfs_then_resume(work: Path, recipe: Path, reference: Path) -> None:
    """The run folder on a 160 KiB tmpfs: the write that does not fit fails with exit 3 naming
    the file and the bytes it needed; every file already there stays loadable; after the
    disk grows, --resume ends where the uninterrupted run did."""
    mnt, out = work / "tmpfs", work / "tmpfs-out"
    mnt.mkdir()
    out.mkdir()
    q = F.cli("run", recipe, "--no-progress", "--run-dir", mnt / "run")
    cmd = " ".join(f"'{a}'" for a in q)
    script = f"""
        mount -t tmpfs -o size=160k tmpfs '{mnt}' || exit 99
        {cmd} > '{out}/full.out' 2> '{out}/full.err'; echo $? > '{out}/full.rc'
        ls -a '{mnt}/run' > '{out}/full.ls'
        for f in '{mnt}'/run/*.pt; do cp "$f" '{out}/'; done
        mount -o remount,size=64m '{mnt}'
        {cmd} --resume > '{out}/resume.out' 2> '{out}/resume.err'; echo $? > '{out}/resume.rc'
        cp '{mnt}/run/summary.json' '{mnt}/run/metrics.jsonl' '{out}/'
        mount -o remount,ro '{mnt}'
        {" ".join(f"'{a}'" for a in F.cli("run", recipe, "--no-progress", "--run-dir", mnt / "ro"))} \
            > /dev/null 2> '{out}/ro.err'; echo $? > '{out}/ro.rc'
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=work, env=F.cli_env(),
                          capture_output=True, text=True, timeout=F.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert (out / "full.rc").read_text().strip() == "3"
    err = [ln for ln in (out / "full.err").read_text().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"qtemperate: error: disk full: writing {mnt}/run/"), err
    assert "needs " in err[0] and " bytes" in err[0] and " free" in err[0]
    listing = (out / "full.ls").read_text().split()
    assert not [n for n in listing if n.endswith(".tmp")]
    for kept in out.glob("*.pt"):  # nothing half-written
        torch.load(kept, weights_only=True)
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.err").read_text()
    assert F.result_of(out) == F.result_of(reference)
    assert F.metrics(out) == F.metrics(reference)
    ro = [ln for ln in (out / "ro.err").read_text().splitlines() if ln.strip()]
    assert (out / "ro.rc").read_text().strip() == "3"
    assert ro == [f"qtemperate: error: read-only file system: {mnt}/ro"]


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(_faults.ENV, raising=False)
    _faults.reset()
    return tmp_path


@pytest.mark.slow
def test_injected_enospc_at_checkpoint_and_export_then_resume(
    in_process: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where no tmpfs can be mounted, the same path is driven by an injected ENOSPC; and
    ``--offline`` wins over ``tracking.mode: online`` (no online attempt at all)."""
    from qtemperate.tracking import wandb_logger

    def no_online(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("--offline must not try W&B online")

    monkeypatch.setattr(wandb_logger, "wandb_online_problem", no_online)
    recipe = F.fault_recipe(in_process, tracking={"loggers": ["jsonl", "wandb"], "mode": "online"},
                            teacher={"train": {"epochs": 1, "lr": 0.05}})
    run_dir = in_process / "run"
    args = ["run", str(recipe), "--no-progress", "--offline", "--run-dir", str(run_dir)]
    monkeypatch.setenv(_faults.ENV, "write:checkpoint.pt@2=enospc")
    assert main(args) == 3
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"qtemperate: error: disk full: writing {run_dir / 'checkpoint.pt'} needs ")
    assert "\n" not in line and F.temp_files(run_dir) == []
    assert load_training_checkpoint(run_dir / "checkpoint.pt").progress.epoch == 0  # the previous one
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B offline files, as asked
    monkeypatch.setenv(_faults.ENV, "write:student.onnx@1=enospc")
    assert main([*args, "--resume"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qtemperate: error: disk full: writing {run_dir / 'student.onnx'} needs ")
    assert not (run_dir / "student.onnx").exists() and F.temp_files(run_dir) == []
    monkeypatch.delenv(_faults.ENV)
    assert main([*args, "--resume"]) == 0
    assert (run_dir / "student.onnx").is_file() and (run_dir / "summary.json").is_file()
    assert "W&B online unavailable" not in capsys.readouterr().err


# --------------------------------------------------------------------------- malicious files


def test_malicious_teacher_checkpoint_in_validate_and_run(in_process: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = in_process / "ran"
    evil = evil_torch_file(in_process / "teacher.pt", marker)
    recipe = F.fault_recipe(in_process, teacher={"model": "small_cnn", "kwargs": {"width": 8},
                                                 "checkpoint": str(evil), "train": None})
    for argv in (["validate", str(recipe), "--check-files"], ["run", str(recipe), "--no-progress"]):
        assert main(argv) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"qtemperate: error: teacher.checkpoint: refused to load {evil}") and "\n" not in line
        assert "torch.save(model.state_dict(), path)" in line
    assert not marker.exists() and not (in_process / "runs").exists()


@pytest.fixture(scope="module")
def unfinished(reference: Path, work: Path) -> Path:
    """The reference run as it was before its results were written (for --resume slots)."""
    copy = work / "unfinished"
    shutil.copytree(reference, copy)
    for name in ("summary.json", "student.pt", "student.onnx"):
        (copy / name).unlink()
    return copy


@pytest.mark.parametrize("planted", ["checkpoint.pt", "teacher.pt", "student_arch.pt"])
def test_malicious_file_planted_in_a_run_folder_is_refused_on_resume(
    in_process: Path, unfinished: Path, recipe: Path, planted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = in_process / "run"
    shutil.copytree(unfinished, run_dir)
    marker = in_process / "ran"
    evil_torch_file(run_dir / planted, marker, "checkpoint" if planted == "checkpoint.pt" else "state_dict")
    before = F.snapshot(run_dir)
    assert main(["run", str(recipe), "--no-progress", "--resume", "--run-dir", str(run_dir)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"qtemperate: error: refused to load {run_dir / planted}: it pickles the Python object exec")
    assert "\n" not in line and not marker.exists()
    assert F.snapshot(run_dir) == before  # nothing written


def test_malicious_student_file_is_refused_by_export(
    in_process: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = in_process / "run"
    shutil.copytree(reference, run_dir)
    marker = in_process / "ran"
    evil_torch_file(run_dir / "student.pt", marker, "top")
    before = F.snapshot(run_dir)
    assert main(["export", str(run_dir), "--batch-sizes", "1"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"qtemperate: error: student file: refused to load {run_dir / 'student.pt'}")
    assert "\n" not in line and not marker.exists() and F.snapshot(run_dir) == before


def test_malicious_cifar_batch_is_refused(in_process: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.data.fakes import fake_cifar10

    fake_cifar10(in_process / "cifar")
    marker = in_process / "ran"
    batch = evil_cifar_batch(in_process / "cifar" / "cifar-10-batches-py" / "data_batch_3", marker)
    recipe = F.fault_recipe(in_process, data={"name": "cifar10", "root": str(in_process / "cifar")})
    assert main(["run", str(recipe), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"refused to load CIFAR batch {batch}: it pickles builtins.exec" in line and "\n" not in line
    assert not marker.exists() and not (in_process / "runs" / "tiny").exists()


# --------------------------------------------------------------------------- damaged files, bad input


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_checkpoint_on_resume_is_one_line(
    in_process: Path, unfinished: Path, recipe: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = in_process / "run"
    shutil.copytree(unfinished, run_dir)
    ckpt = run_dir / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "garbage": b"\x00\x01 not torch " * 50, "truncated": data[: len(data) // 3]}[damage])
    before = F.snapshot(run_dir)
    assert main(["run", str(recipe), "--no-progress", "--resume", "--run-dir", str(run_dir)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"qtemperate: error: cannot load {ckpt}") and "\n" not in line
    assert F.snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated_idx", "declares shape (30, 28, 28) (23520 bytes) but holds 23000 bytes"),
        ("wrong_magic", "has magic number 1213484364 (0x48544d4c)"),
        ("truncated_gz", "truncated or damaged gzip file"),
        ("label_12", "data: dataset 'fashion_mnist': train labels span 0..12 but it has 10 classes"),
    ],
)
def test_bad_data_files_are_one_line_before_any_training(
    in_process: Path, damage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from tests.data.fakes import fake_fashion, write_idx

    root = in_process / "fmnist"
    fake_fashion(root, gz=damage == "truncated_gz")
    images = root / "train-images-idx3-ubyte"
    if damage == "truncated_idx":
        images.write_bytes(images.read_bytes()[:-520])
    elif damage == "wrong_magic":
        images.write_bytes(b"HTML<!doctype html>")
    elif damage == "truncated_gz":
        gz = images.with_name(images.name + ".gz")
        gz.write_bytes(gz.read_bytes()[:-100])
    else:
        labels = np.arange(30, dtype=np.uint8) % 10
        labels[7] = 12
        write_idx(root / "train-labels-idx1-ubyte", labels, gz=False)
    recipe = F.fault_recipe(in_process, data={"name": "fashion_mnist", "root": str(root)})
    assert main(["run", str(recipe), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("qtemperate: error: ") and message in line and "\n" not in line
    assert not (in_process / "runs" / "tiny").exists()  # the fresh folder is removed again


def test_unreachable_size_target_fails_before_the_teacher_trains(
    in_process: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = F.fault_recipe(in_process, student={"target_size_ratio": 0.002, "max_layer_ratio": 0.5})
    assert main(["run", str(recipe), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("qtemperate: error: student.target_size_ratio=0.002 not reachable") and "\n" not in line
    assert not (in_process / "runs" / "tiny").exists()  # no teacher was trained, nothing kept


def test_teacher_checkpoint_shape_mismatch_is_found_before_data_load(
    in_process: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qtemperate import trainer
    from qtemperate.models import build_model

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the data must not be loaded for a checkpoint that cannot be used")

    monkeypatch.setattr(trainer, "build_datasets", no_data)
    ckpt = in_process / "w16.pt"
    torch.save(build_model("small_cnn", num_classes=10, in_channels=1, width=16).state_dict(), ckpt)
    recipe = F.fault_recipe(in_process, teacher={"model": "small_cnn", "kwargs": {"width": 8},
                                                 "checkpoint": str(ckpt), "train": None})
    assert main(["run", str(recipe), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"teacher.checkpoint: {ckpt} does not fit the model: conv1.weight is (16, 1, 3, 3)" in line


def test_changed_recipe_on_resume_writes_nothing(
    in_process: Path, unfinished: Path, recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = in_process / "run"
    shutil.copytree(unfinished, run_dir)
    before = F.snapshot(run_dir)
    assert main(["run", str(recipe), "--no-progress", "--resume", "--run-dir", str(run_dir),
                 "--set", "seed=7", "--set", "optimizer.lr=0.5"]) == 2
    line = capsys.readouterr().err.strip()
    assert "seed (0 -> 7)" in line and "optimizer.lr (0.02 -> 0.5)" in line
    assert main(["run", str(recipe), "--no-progress", "--resume", "--run-dir", str(run_dir),
                 "--set", "data.num_workers=1"]) == 2
    assert "--allow-change data.num_workers" in capsys.readouterr().err
    assert F.snapshot(run_dir) == before


def test_diverged_run_exits_4_and_says_what_is_kept(
    in_process: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qtemperate import losses

    real = losses.TemperateLoss.forward

    def poisoned(self: Any, s: Any, t: Any, y: Any) -> Any:
        out = real(self, s, t, y)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses.TemperateLoss, "forward", poisoned)
    recipe = F.fault_recipe(in_process, teacher={"model": "small_cnn", "kwargs": {"width": 8},
                                                 "train": {"epochs": 1, "lr": 0.05}})
    assert main(["run", str(recipe), "--no-progress"]) == 4
    line = capsys.readouterr().err.strip()
    assert "loss is nan (NaN/Inf)" in line and "\n" not in line
    run_dir = in_process / "runs" / "tiny"
    assert line.endswith(f"kept in {run_dir}: teacher.pt (the trained teacher); a new run can reuse its "
                         f"teacher: teacher.checkpoint: {run_dir / 'teacher.pt'}")


def test_bad_run_folders_are_one_line(in_process: Path, recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_process / "afile").write_text("x")
    (in_process / "dangling").symlink_to(in_process / "gone")
    for target, why in (("afile", "is a file, not a folder"), ("dangling", "which does not exist")):
        assert main(["run", str(recipe), "--no-progress", "--run-dir", str(in_process / target)]) == 2
        line = capsys.readouterr().err.strip()
        assert why in line and "\n" not in line
