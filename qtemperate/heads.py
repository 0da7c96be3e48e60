"""Models with several outputs: which head is scored, and the task loss of each head.

A classifier returns one tensor of logits; it is trained with cross-entropy against the
class labels and scored by top-1 accuracy. A multi-output model (a detector returning
``{"features": ..., "logits": ..., "boxes": ...}``) has to say both things explicitly, so
no number is reported about a head nobody chose:

* ``accuracy_head``: the head whose arg-max is compared with the class labels — the
  accuracy a run reports (``teacher_acc``, ``student_acc``, ``test/acc``);
* ``losses``: the task loss of each trained head, against a named target of the
  dataset (``labels``, the class labels, or an extra target the dataset provides, such
  as ``boxes``), with a weight::

      task = Σ_h w_h · L_h(output_h, target_h)

A head without a task loss (e.g. ``features``) is only distilled. Distillation itself
(:class:`~qtemperate.losses.TemperateLoss`) is the softmax KD per head, so it applies to
heads whose outputs are logits or feature activations; a regression head (``boxes``)
is trained by its task loss and not distilled.

A recipe says this in its ``task`` section::

    task:
      accuracy_head: logits
      losses:
        logits: cross_entropy                        # target: labels, weight 1
        boxes: {loss: smooth_l1, target: boxes, weight: 2.0}

Targets: a dataset with only class labels yields ``y`` as an ``int64`` tensor (the
``labels`` target); a dataset with extra targets yields a dict of tensors keyed by
target name, ``labels`` included (see :mod:`qtemperate.data.detection`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtemperate.registry import Registry

if TYPE_CHECKING:
    from qtemperate.recipe import Recipe

__all__ = [
    "LABELS",
    "REGRESSION_LOSSES",
    "TASK_LOSSES",
    "HeadLoss",
    "Task",
    "target_of",
    "targets_to",
]

LABELS = "labels"
"""The name of the class-label target (the only target of a classification dataset)."""

TASK_LOSSES: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("task loss")
"""Task losses by name: ``loss(output, target) -> 0-dim tensor`` (mean reduction)."""
TASK_LOSSES.register("cross_entropy", F.cross_entropy)
TASK_LOSSES.register("smooth_l1", F.smooth_l1_loss)
TASK_LOSSES.register("mse", F.mse_loss)
TASK_LOSSES.register("l1", F.l1_loss)

REGRESSION_LOSSES = frozenset({"smooth_l1", "mse", "l1"})
"""Losses whose head regresses values (softmax KD does not apply to such a head)."""


def target_of(targets: Tensor | Mapping[str, Tensor], name: str) -> Tensor:
    """The target ``name`` of a batch: the class labels tensor itself, or ``targets[name]``.

    Raises:
        KeyError: the batch has no such target, listing the ones it has.
    """
    if isinstance(targets, Mapping):
        if name not in targets:
            raise KeyError(f"the data has no target {name!r}; it has: {', '.join(targets)}")
        return targets[name]
    if name != LABELS:
        raise KeyError(f"the data has no target {name!r}; it has only class labels ({LABELS!r})")
    return targets


def as_float(outputs: Any) -> Any:
    """A model's outputs (a tensor, or a dict/tuple/list of tensors) in float32.

    Autocast (bf16) forwards return low-precision outputs; losses are computed in fp32.
    """
    if isinstance(outputs, Mapping):
        return {k: as_float(v) for k, v in outputs.items()}
    if isinstance(outputs, tuple | list):
        return type(outputs)(as_float(v) for v in outputs)
    return outputs.float() if torch.is_tensor(outputs) else outputs


def targets_to(targets: Any, device: torch.device | str) -> Any:
    """Move a batch's targets (a tensor or a dict of tensors) to ``device``."""
    if isinstance(targets, Mapping):
        return {k: v.to(device) for k, v in targets.items()}
    return targets.to(device)


@dataclass(frozen=True)
class HeadLoss:
    """The task loss of one head.

    Attributes:
        loss: A key of :data:`TASK_LOSSES` (``cross_entropy``, ``smooth_l1``, ``mse``, ``l1``).
        target: The dataset target it is compared with (``labels``, ``boxes``, ...).
        weight: Its weight ``w_h`` in the task loss (≥ 0).
    """

    loss: str
    target: str = LABELS
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in TASK_LOSSES:
            raise ValueError(f"unknown task loss {self.loss!r}; known: {', '.join(TASK_LOSSES.keys())}")
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight!r}")


@dataclass(frozen=True)
class Task:
    """How a model's outputs are trained and scored (see the module docstring).

    Attributes:
        accuracy_head: The head scored against the class labels; ``None`` for a model
            that returns one tensor of logits.
        losses: Task loss per head (``{}`` with ``accuracy_head=None``: cross-entropy on
            the single output).
    """

    accuracy_head: str | None = None
    losses: Mapping[str, HeadLoss] = field(default_factory=dict)

    @property
    def multi_head(self) -> bool:
        return self.accuracy_head is not None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Task:
        """The recipe's ``task`` section (a classifier when it has none)."""
        t = recipe.task
        if t is None:
            return cls()
        return cls(
            t.accuracy_head,
            {h: HeadLoss(c.loss, c.target, c.weight) for h, c in t.losses.items()},
        )

    def logits(self, outputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The scored output: the tensor itself, or the accuracy head.

        Raises:
            ValueError: a dict output without an ``accuracy_head``, or a missing head.
        """
        if isinstance(outputs, Mapping):
            if self.accuracy_head is None:
                raise ValueError(
                    f"the model returns a dict of heads ({', '.join(outputs)}): name the head "
                    "scored against the class labels (task.accuracy_head) and each head's task "
                    "loss (task.losses)"
                )
            if self.accuracy_head not in outputs:
                raise ValueError(
                    f"task.accuracy_head {self.accuracy_head!r} is not among the model's heads "
                    f"({', '.join(outputs)})"
                )
            return outputs[self.accuracy_head]
        if self.accuracy_head is not None:
            raise ValueError(
                f"task.accuracy_head is {self.accuracy_head!r} but the model returns a single tensor"
            )
        return outputs

    def loss(
        self, outputs: Tensor | Mapping[str, Tensor], targets: Tensor | Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``Σ_h w_h · L_h(outputs[h], target_h)`` and the per-head terms ``{"task_<head>": L_h}``.

        A single-tensor model is trained with cross-entropy against the labels (and
        returns no per-head terms).

        Raises:
            ValueError: a head or target that is missing, naming it.
        """
        if not self.multi_head:
            return F.cross_entropy(self.logits(outputs), target_of(targets, LABELS)), {}
        if not isinstance(outputs, Mapping):
            raise ValueError("task.losses is set but the model returns a single tensor, not a dict of heads")
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for head, spec in self.losses.items():
            if head not in outputs:
                raise ValueError(f"task.losses names head {head!r}, which is not among the model's heads "
                                 f"({', '.join(outputs)})")
            out = outputs[head]
            target = target_of(targets, spec.target)
            if spec.loss != "cross_entropy":
                target = target.to(out.dtype)
            value = TASK_LOSSES.get(spec.loss)(out, target)
            parts[f"task_{head}"] = value
            total = spec.weight * value if total is None else total + spec.weight * value
        assert total is not None  # the recipe requires at least one task loss
        return total, parts
