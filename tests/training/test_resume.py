"""What a run folder resumes from, read as data before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qtemperate.arch_spec import describe_architecture
from qtemperate.checkpoint import save_atomic
from qtemperate.errors import CheckpointError
from qtemperate.joint_scheduler import BitStage, JointScheduler
from qtemperate.models import build_model
from qtemperate.training.checkpointing import Progress, save_training_checkpoint
from qtemperate.training.resume import STUDENT_ARCH_FORMAT, describe_kept, load_resume_state
from qtemperate.training.seed import rng_state
from tests.malicious import evil_torch_file

KW = {"num_classes": 10, "in_channels": 1, "width": 4}


def _teacher_training(run: Path, epoch: int, nbytes: int) -> None:
    m = build_model("small_cnn", **KW)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    save_atomic({"state_dict": m.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "epochs": 3,
                 "step": 10, "rng": rng_state(), "metrics_bytes": nbytes}, run / "teacher_training.pt")


def _teacher(run: Path, nbytes: int) -> None:
    m = build_model("small_cnn", **KW)
    save_atomic({"state_dict": m.state_dict(), "model": "small_cnn", "kwargs": KW, "steps": 30,
                 "metrics_bytes": nbytes}, run / "teacher.pt")


def _arch(run: Path) -> nn.Module:
    m = build_model("small_cnn", **KW)
    save_atomic({"format": STUDENT_ARCH_FORMAT, "arch": describe_architecture(m, "small_cnn", KW).to_dict(),
                 "state_dict": m.state_dict(), "plan": {"prune_ratio": None}}, run / "student_arch.pt")
    return m


def _checkpoint(run: Path, model: nn.Module, nbytes: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = JointScheduler([BitStage("w8a8", 2, 8, 8)])
    save_training_checkpoint(run / "checkpoint.pt", Progress(epoch=1, metrics_bytes=nbytes), sched, 0, model, opt)


def test_each_resume_point_and_its_metrics_length(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    state = load_resume_state(run)
    assert state.metrics_bytes == 0 and "beginning" in state.start  # nothing kept: start over
    _teacher_training(run, 0, 111)
    state = load_resume_state(run)
    assert (state.metrics_bytes, state.start) == (111, "teacher training after epoch 1")
    assert describe_kept(run) == "teacher_training.pt (teacher epoch 1 of 3)"
    _teacher(run, 222)
    assert load_resume_state(run).metrics_bytes == 222 and load_resume_state(run).teacher_training is None
    arch = _arch(run)
    _checkpoint(run, arch, 333)
    state = load_resume_state(run)
    assert state.metrics_bytes == 333 and state.start == "after epoch 2 (checkpoint.pt)"
    rebuilt, plan = state.student_arch
    assert plan == {"prune_ratio": None} and torch.equal(rebuilt.conv1.weight, arch.conv1.weight)
    assert describe_kept(run, 4) == "checkpoint.pt (after epoch 2 of 4), teacher.pt (the trained teacher)"
    (run / "summary.json").write_text(json.dumps({"student_acc": 0.5}))
    assert load_resume_state(run).summary == {"student_acc": 0.5}


@pytest.mark.parametrize("planted", ["checkpoint.pt", "teacher.pt", "student_arch.pt", "teacher_training.pt"])
def test_a_planted_file_is_refused_before_anything_runs(tmp_path: Path, planted: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _teacher(run, 1)
    _checkpoint(run, _arch(run), 2)
    if planted == "teacher_training.pt":
        (run / "teacher.pt").unlink()
        (run / "checkpoint.pt").unlink()
    marker = tmp_path / "ran"
    evil_torch_file(run / planted, marker, "checkpoint" if planted == "checkpoint.pt" else "state_dict")
    with pytest.raises(CheckpointError, match=f"refused to load .*{planted}"):
        load_resume_state(run)
    assert not marker.exists()


def test_checkpoint_without_teacher_is_an_incomplete_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run, _arch(run), 1)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt without teacher\.pt"):
        load_resume_state(run)
