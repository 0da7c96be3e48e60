"""What stops a run early: divergence (NaN/Inf loss) and a simulated kill.

The training loop reads loss values back only at log points and at the end of an
epoch (a host sync on a GPU); :func:`check_finite` is called there, before the
epoch's evaluation and checkpoint, so a divergent epoch never overwrites the last
good checkpoint.
"""

from __future__ import annotations

import math

import torch

from qtemperate.errors import EXIT_DIVERGED, QtemperateError

__all__ = ["TrainingDiverged", "TrainingInterrupted", "check_finite"]


class TrainingDiverged(QtemperateError, RuntimeError):
    """The loss became NaN/Inf; the run stops without writing a checkpoint for that epoch (exit 4)."""

    exit_code = EXIT_DIVERGED


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_epochs`` (tests simulate a killed run with it)."""


_ADVICE = "stopping without saving this epoch. Lower the learning rate or raise the temperature"


def check_finite(loss: float | torch.Tensor, where: str, advice: str = _ADVICE) -> None:
    """Raise :class:`TrainingDiverged` naming ``where`` when ``loss`` is NaN or infinite.

    The message is one line: ``"<where>: loss is nan (NaN/Inf); <advice>"``.

    Args:
        loss: The loss (a float or a 0-dim tensor; reading a tensor is a host sync).
        where: What was running: the epoch, the step, the stage.
        advice: What the run does now and what to change (the recipe trainer's by default).
    """
    value = float(loss)
    if not math.isfinite(value):
        raise TrainingDiverged(f"{where}: loss is {value} (NaN/Inf); {advice}")
