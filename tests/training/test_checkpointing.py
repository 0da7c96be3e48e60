"""Training checkpoints: everything a resumed run needs comes back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtemperate.joint_scheduler import BitStage, JointScheduler
from qtemperate.training.checkpointing import (
    Progress,
    load_training_checkpoint,
    save_training_checkpoint,
)


def test_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = JointScheduler([BitStage("w8a8", 2, 8, 8), BitStage("w4a4", 2, 4, 4)], temperatures=(6.0, 3.0, 1.0))
    sched.step(0, None)
    sched.step(1, 0.5)
    prog = Progress(epoch=1, global_step=17, val_loss=0.5, history=[{"epoch": 0}], stages=[], elapsed_s=2.5)
    path = save_training_checkpoint(tmp_path / "checkpoint.pt", prog, sched, 0, model, opt)
    assert path.is_file() and not list(tmp_path.glob(".checkpoint.pt.*"))  # no temp file left

    ck = load_training_checkpoint(path)
    assert ck.progress == prog
    assert ck.stage_index == 0
    other = JointScheduler([BitStage("w8a8", 2, 8, 8), BitStage("w4a4", 2, 4, 4)], temperatures=(6.0, 3.0, 1.0))
    other.load_state_dict(ck.scheduler)
    assert other.step(2, 0.4) == sched.step(2, 0.4)
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(ck.model)
    assert torch.equal(fresh.weight, model.weight)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck.optimizer)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_restore_rng(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = JointScheduler([BitStage("w8a8", 1, 8, 8)])
    torch.manual_seed(5)
    path = save_training_checkpoint(tmp_path / "c.pt", Progress(), sched, 0, model, opt)
    expected = torch.rand(3)
    torch.manual_seed(99)
    load_training_checkpoint(path).restore_rng()
    assert torch.equal(torch.rand(3), expected)
