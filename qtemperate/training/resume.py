"""What a run folder holds to resume from, read (as data) before anything is written.

A run can be resumed from wherever it stopped:

=========================  ==================================================
on disk                    ``--resume`` continues
=========================  ==================================================
``summary.json``           nothing: the run finished (its summary is returned)
``checkpoint.pt``          after the checkpoint's epoch (QAT stages)
``teacher.pt``             with the trained teacher: student derivation (or the
                           saved ``student_arch.pt``) and the first stage
``teacher_training.pt``    teacher training after its last finished epoch
only ``recipe.yaml``       from the beginning
=========================  ==================================================

:func:`load_resume_state` reads every one of these files up front, so a damaged or
malicious file is refused (exit 2, one line) before the run writes anything; each
state names the length of ``metrics.jsonl`` to truncate back to.
:func:`describe_kept` says, after an interruption, what a resume will start from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.arch_spec import ArchSpec, ArchSpecError, build_architecture
from qtemperate.checkpoint import load_checkpoint
from qtemperate.errors import CheckpointError
from qtemperate.training.checkpointing import (
    CHECKPOINT,
    TrainingCheckpoint,
    load_training_checkpoint,
)
from qtemperate.training.student import STUDENT_ARCH_FILE
from qtemperate.training.teacher import (
    TEACHER_FILE,
    TEACHER_TRAINING_FILE,
    load_saved_teacher,
    load_teacher_training,
)

__all__ = [
    "STUDENT_ARCH_FORMAT",
    "SUMMARY",
    "ResumeState",
    "describe_kept",
    "load_resume_state",
    "load_student_arch",
]

SUMMARY = "summary.json"
STUDENT_ARCH_FORMAT = "qtemperate.student_arch/2"


@dataclass
class ResumeState:
    """The files a resumed run continues from (all ``None``: start from the beginning)."""

    checkpoint: TrainingCheckpoint | None = None
    teacher: dict[str, Any] | None = None
    teacher_training: dict[str, Any] | None = None
    student_arch: tuple[nn.Module, dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None

    @property
    def metrics_bytes(self) -> int | None:
        """Where ``metrics.jsonl`` is cut back to: the length the latest state recorded."""
        for record in (
            self.checkpoint.progress.metrics_bytes if self.checkpoint is not None else None,
            self.teacher.get("metrics_bytes") if self.teacher is not None else None,
            self.teacher_training.get("metrics_bytes") if self.teacher_training is not None else None,
        ):
            if record is not None:
                return int(record)
        if self.checkpoint is None and self.teacher is None and self.teacher_training is None:
            return 0  # nothing kept: the run starts over
        return None

    @property
    def start(self) -> str:
        """Where the run continues, for the console."""
        if self.checkpoint is not None:
            return f"after epoch {self.checkpoint.progress.epoch + 1} (checkpoint.pt)"
        if self.teacher is not None:
            return "with the trained teacher (teacher.pt)"
        if self.teacher_training is not None:
            return f"teacher training after epoch {int(self.teacher_training['epoch']) + 1}"
        return "from the beginning (nothing was saved yet)"


def load_student_arch(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pruned float student saved in ``student_arch.pt``; return it and its plan.

    Raises:
        CheckpointError: unreadable, unsafe, or an architecture its factory cannot rebuild.
    """
    raw = load_checkpoint(path, device)
    if not isinstance(raw, dict) or raw.get("format") != STUDENT_ARCH_FORMAT:
        raise CheckpointError(f"{path}: not a qtemperate student architecture ({STUDENT_ARCH_FORMAT})")
    try:
        arch = build_architecture(ArchSpec.from_dict(raw.get("arch")), raw.get("state_dict"), device)
    except ArchSpecError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    plan = raw.get("plan")
    return arch, plan if isinstance(plan, dict) else {"prune_ratio": None}


def load_resume_state(run_dir: str | Path, device: torch.device | str = "cpu") -> ResumeState:
    """Read every file a resume could continue from (see the module docstring).

    Raises:
        CheckpointError: any of them is damaged, truncated or not data (nothing runs).
    """
    run_dir = Path(run_dir)
    state = ResumeState()
    summary = run_dir / SUMMARY
    if summary.is_file():
        try:
            state.summary = json.loads(summary.read_text())
        except (OSError, ValueError):
            state.summary = None  # a damaged summary: finish the run again
        if state.summary is not None:
            return state
    if (run_dir / CHECKPOINT).is_file():
        state.checkpoint = load_training_checkpoint(run_dir / CHECKPOINT)
    if (run_dir / TEACHER_FILE).is_file():
        state.teacher = load_saved_teacher(run_dir / TEACHER_FILE, device)
    elif (run_dir / TEACHER_TRAINING_FILE).is_file():
        state.teacher_training = load_teacher_training(run_dir / TEACHER_TRAINING_FILE, device)
    if (run_dir / STUDENT_ARCH_FILE).is_file():
        state.student_arch = load_student_arch(run_dir / STUDENT_ARCH_FILE, device)
    if state.checkpoint is not None and (state.teacher is None or state.student_arch is None):
        missing = TEACHER_FILE if state.teacher is None else STUDENT_ARCH_FILE
        raise CheckpointError(f"{run_dir}: checkpoint.pt without {missing}; the run folder is incomplete")
    return state


def describe_kept(run_dir: str | Path, total_epochs: int | None = None) -> str:
    """What the run folder holds for ``--resume`` (reads the files as data; never raises)."""
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).is_file():
        return "the finished run"
    kept = []
    try:
        if (run_dir / CHECKPOINT).is_file():
            epoch = load_training_checkpoint(run_dir / CHECKPOINT).progress.epoch + 1
            of = f" of {total_epochs}" if total_epochs else ""
            kept.append(f"checkpoint.pt (after epoch {epoch}{of})")
        if (run_dir / TEACHER_FILE).is_file():
            kept.append("teacher.pt (the trained teacher)")
        elif (run_dir / TEACHER_TRAINING_FILE).is_file():
            t = load_teacher_training(run_dir / TEACHER_TRAINING_FILE)
            kept.append(f"teacher_training.pt (teacher epoch {int(t['epoch']) + 1} of {int(t['epochs'])})")
    except Exception:  # describing must not fail the report of another failure
        kept.append("files that could not be read back")
    return ", ".join(kept) if kept else "no checkpoint yet (--resume starts from the beginning)"
