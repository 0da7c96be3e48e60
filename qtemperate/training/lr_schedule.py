"""The learning-rate schedule: cosine decay within a stage (or constant).

The rate is a pure function of the step, so a resumed run continues it exactly:

    lr(step) = peak · (1 + cos(π · min(step, total) / total)) / 2

(``constant``: ``lr = peak``; a stage of one step keeps ``peak``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "set_lr"]


def lr_at(step: int, total: int, peak: float, kind: str = "cosine") -> float:
    """The learning rate at ``step`` of ``total`` (see the module docstring).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in ("cosine", "constant"):
        raise ValueError(f"lr schedule must be 'cosine' or 'constant', got {kind!r}")
    if kind == "constant" or total <= 1:
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
