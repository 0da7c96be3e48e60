"""Channels-last memory format for convolutional training on a CPU.

oneDNN's CPU convolutions run faster on NHWC tensors: a ResNet-8 training step took
0.77x the time in ``channels_last`` and a W4A4 QAT step of its pruned student 0.90x
(``bench/RESULTS.md``). :func:`channels_last` converts a model for a block of work
(teacher training, the teacher's logit cache, a distillation epoch) and restores the
default layout afterwards, so checkpoints, pruning, quantization and export see what
they always saw; batches go through :func:`to_format`. Other devices and non-image
inputs are left alone (not measured there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["channels_last", "to_format", "wants_channels_last"]


def wants_channels_last(x: torch.Tensor) -> bool:
    """Whether a batch ``x`` is one that channels-last helps: 4-D (N, C, H, W) on a CPU."""
    return x.dim() == 4 and x.device.type == "cpu"


def to_format(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``x`` in channels-last layout when ``enabled`` (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


@contextmanager
def channels_last(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """``model`` with channels-last parameters inside the block, default layout after.

    The parameters stay the same objects (optimizers keep working); only their strides
    change.
    """
    if not enabled:
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)
