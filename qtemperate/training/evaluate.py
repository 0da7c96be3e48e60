"""Accuracy and loss of a model over a loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qtemperate.heads import LABELS, Task, target_of, targets_to
from qtemperate.training import distributed
from qtemperate.training.memory_format import channels_last, to_format, wants_channels_last

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, task: Task | None = None
) -> tuple[float, float]:
    """Top-1 accuracy and mean task loss of ``model`` over ``loader``.

    A classifier (``task`` ``None`` or without heads): ``acc = #{argmax f(x) = y} / N``
    and ``loss = Σ CE(f(x), y) / N`` over all samples. A multi-output model: the
    accuracy is that of ``task.accuracy_head`` against the class labels, and the loss
    is the task loss ``Σ_h w_h · L_h`` (:meth:`~qtemperate.heads.Task.loss`, each a
    batch mean) averaged over samples. A dict output without a ``task`` naming its
    scored head is an error, never a guess. The model runs in eval mode, in fp32, and
    its train/eval flag is restored.

    In a data-parallel run a loader over a shard (``sampler.sharded``) holds part of
    the samples: the three sums are added over ranks, so every rank returns the
    figures of the whole split. A DDP-wrapped model is evaluated through its bare
    module (a DDP forward would synchronise buffers, and shards may differ in length).
    """
    model = distributed.unwrap_ddp(model)
    non_blocking = device.type == "cuda"
    task = task or Task()
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    cl = device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    try:
        with channels_last(model, cl):  # NHWC: faster CPU convolutions (memory_format)
            for batch in loader:
                x = batch[0].to(device, non_blocking=non_blocking)
                y = targets_to(batch[1], device)
                out = model(to_format(x, cl and wants_channels_last(x)))
                logits, labels = task.logits(out).float(), target_of(y, LABELS)
                if task.multi_head:
                    loss_sum += float(task.loss(out, y)[0]) * int(labels.numel())
                else:
                    loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                total += int(labels.numel())
    finally:
        model.train(was_training)
    if getattr(loader.sampler, "sharded", False):
        c, t, loss_sum = distributed.sum_over_ranks([float(correct), float(total), loss_sum])
        correct, total = round(c), round(t)
    return correct / max(total, 1), loss_sum / max(total, 1)
