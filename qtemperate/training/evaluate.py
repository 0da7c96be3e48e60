"""Accuracy and loss of a model over a loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qtemperate.training import distributed

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

    ``acc = #{argmax f(x) = y} / N`` and ``loss = Σ CE(f(x), y) / N`` over all
    samples; the model runs in eval mode, in fp32, and its train/eval flag is restored.
    In a data-parallel run a loader over a shard (``sampler.sharded``) holds part of
    the samples: the three sums are added over ranks, so every rank returns the
    figures of the whole split. A DDP-wrapped model is evaluated through its bare
    module (a DDP forward would synchronise buffers, and shards may differ in length).
    """
    model = distributed.unwrap_ddp(model)
    was_training = model.training
    model.eval()
    non_blocking = device.type == "cuda"
    correct, total, loss_sum = 0, 0, 0.0
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=non_blocking), batch[1].to(device, non_blocking=non_blocking)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    if getattr(loader.sampler, "sharded", False):
        c, t, loss_sum = distributed.sum_over_ranks([float(correct), float(total), loss_sum])
        correct, total = round(c), round(t)
    return correct / max(total, 1), loss_sum / max(total, 1)
