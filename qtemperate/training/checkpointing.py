"""The training state a checkpoint carries, and its atomic save and restore.

``checkpoint.pt`` is written after every epoch (atomically: temp file + rename, see
:func:`qtemperate.checkpoint.save_atomic`) and holds everything exact resumption
needs: the :class:`Progress` (epoch, step, last validation loss, history, finished
stages, wall time, the length of ``metrics.jsonl``), the joint scheduler's state, the
stage index, the student's and the optimizer's state dicts, and the RNG states — all
plain data, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.checkpoint import load_checkpoint, save_atomic
from qtemperate.errors import CheckpointError
from qtemperate.joint_scheduler import JointScheduler
from qtemperate.training.seed import rng_state, set_rng_state

__all__ = ["CHECKPOINT", "Progress", "TrainingCheckpoint", "load_training_checkpoint", "save_training_checkpoint"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint carries.

    Attributes:
        epoch: Last completed global epoch (-1 before the first).
        global_step: Optimizer steps taken by the student so far.
        val_loss: The latest loss the temperature schedule reads.
        history: One record per finished epoch.
        stages: One record per finished stage (``summary.json``'s ``stages``).
        elapsed_s: Wall time spent so far, across resumptions.
        metrics_bytes: Length of ``metrics.jsonl`` when the checkpoint was written (a
            resumed run truncates the file there, so no record appears twice).
    """

    epoch: int = -1
    global_step: int = 0
    val_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    metrics_bytes: int | None = None


@dataclass
class TrainingCheckpoint:
    """A loaded ``checkpoint.pt``."""

    progress: Progress
    scheduler: dict[str, Any]
    stage_index: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]

    def restore_rng(self) -> None:
        """Put every generator back where it was when the checkpoint was written."""
        set_rng_state(self.rng)


def save_training_checkpoint(
    path: str | Path,
    progress: Progress,
    scheduler: JointScheduler,
    stage_index: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Path:
    """Write ``checkpoint.pt`` atomically (the previous one survives a crash mid-write)."""
    return save_atomic(
        {
            "progress": asdict(progress),
            "scheduler": scheduler.state_dict(),
            "stage_index": stage_index,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
        },
        path,
    )


_KEYS = ("progress", "scheduler", "stage_index", "model", "optimizer", "rng")


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_training_checkpoint` (as data only).

    Raises:
        CheckpointError: unreadable, unsafe, or not a training checkpoint.
    """
    raw = load_checkpoint(path)
    missing = [k for k in _KEYS if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise CheckpointError(f"{path}: not a qtemperate training checkpoint (no {', '.join(missing)})")
    known = {f.name for f in fields(Progress)}
    progress = raw["progress"]
    if not isinstance(progress, dict) or not set(progress) <= known:
        raise CheckpointError(f"{path}: not a qtemperate training checkpoint (bad progress record)")
    return TrainingCheckpoint(
        progress=Progress(**progress),
        scheduler=raw["scheduler"],
        stage_index=int(raw["stage_index"]),
        model=raw["model"],
        optimizer=raw["optimizer"],
        rng=raw["rng"],
    )
