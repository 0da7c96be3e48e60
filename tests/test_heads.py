"""Multi-output task losses and the scored head, against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtemperate.heads import LABELS, TASK_LOSSES, HeadLoss, Task, target_of, targets_to
from qtemperate.losses import TemperateLoss, multi_scale_kd_loss


def _batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = {"features": torch.randn(4, 6, generator=g), "logits": torch.randn(4, 3, generator=g),
           "boxes": torch.rand(4, 4, generator=g)}
    targets = {LABELS: torch.tensor([0, 2, 1, 2]), "boxes": torch.rand(4, 4, generator=g)}
    return out, targets


TASK = Task("logits", {"logits": HeadLoss("cross_entropy"), "boxes": HeadLoss("smooth_l1", "boxes", 5.0)})


def test_task_loss_is_the_weighted_sum_of_head_losses() -> None:
    out, y = _batch()
    total, parts = TASK.loss(out, y)
    ce = F.cross_entropy(out["logits"], y["labels"])
    box = F.smooth_l1_loss(out["boxes"], y["boxes"])
    assert parts == {"task_logits": pytest.approx(ce), "task_boxes": pytest.approx(box)}
    assert float(total) == pytest.approx(float(ce + 5.0 * box))
    assert torch.equal(TASK.logits(out), out["logits"])


def test_a_classifier_task_is_cross_entropy_on_the_labels() -> None:
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    total, parts = Task().loss(logits, y)
    assert parts == {} and float(total) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_missing_heads_and_targets_are_named() -> None:
    out, y = _batch()
    with pytest.raises(ValueError, match=r"dict of heads \(features, logits, boxes\): name the head"):
        Task().logits(out)
    with pytest.raises(ValueError, match=r"accuracy_head 'cls' is not among the model's heads"):
        Task("cls", TASK.losses).logits(out)
    with pytest.raises(ValueError, match=r"task\.losses names head 'box'"):
        Task("logits", {"box": HeadLoss("mse", "boxes")}).loss(out, y)
    with pytest.raises(KeyError, match=r"no target 'boxes'; it has only class labels"):
        target_of(y["labels"], "boxes")
    with pytest.raises(ValueError, match="unknown task loss 'huber'"):
        HeadLoss("huber")
    assert set(TASK_LOSSES.keys()) >= {"cross_entropy", "smooth_l1", "mse", "l1"}
    assert targets_to(y, "cpu")["boxes"] is not None


def test_temperate_loss_with_per_head_task_losses_and_temperatures() -> None:
    out, y = _batch()
    g = torch.Generator().manual_seed(1)
    teacher = {k: torch.randn(v.shape, generator=g) for k, v in out.items()}
    loss = TemperateLoss(kd_weight=0.4, temperatures=(4.0,), head_temperatures={"features": 5.0, "logits": 3.0},
                         head_weights={"boxes": 0.0}, task=TASK)
    parts = loss(out, teacher, y)
    task, _ = TASK.loss(out, y)
    kd = 0.5 * multi_scale_kd_loss(out["features"], teacher["features"], 5.0) + 0.5 * multi_scale_kd_loss(
        out["logits"], teacher["logits"], 3.0)
    assert float(parts["task_loss"]) == pytest.approx(float(task))
    assert float(parts["kd_loss"]) == pytest.approx(float(kd))
    assert float(parts["loss"]) == pytest.approx(float(0.6 * task + 0.4 * kd))
    assert "kd_boxes" not in parts and "task_boxes" in parts and "kd_features_T5" in parts
