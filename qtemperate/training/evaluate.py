"""Accuracy and loss of a model over a loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qtemperate.training.memory_format import channels_last, to_format, wants_channels_last

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

    ``acc = #{argmax f(x) = y} / N`` and ``loss = Σ CE(f(x), y) / N`` over all
    samples; the model runs in eval mode and its train/eval flag is restored.
    """
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    cl = device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    with channels_last(model, cl):  # NHWC: faster CPU convolutions (memory_format)
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            logits = model(to_format(x, cl and wants_channels_last(x)))
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1), loss_sum / max(total, 1)
