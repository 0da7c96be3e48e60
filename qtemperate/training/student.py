"""Student derivation, shared by ``qtemperate plan`` and ``qtemperate run``.

The student is the teacher pruned to the recipe's size target
(``student.target_size_ratio``: true quantized bytes at the final stage's bits over
the teacher's float bytes; or ``student.prune_ratio``: kept fraction of parameters),
or the recipe's own ``student.model`` (pruned only when it asks for a
``prune_ratio``). :func:`derive_student` is the one place that reads those settings,
so a plan and a run of the same recipe derive the same architecture.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qtemperate.planner import PlanReport, plan_student
from qtemperate.recipe import Recipe
from qtemperate.size import SizeReport
from qtemperate.training.architecture import build_recipe_model, check_outputs_kept

__all__ = ["STUDENT_ARCH_FILE", "derive_student"]

STUDENT_ARCH_FILE = "student_arch.pt"


def derive_student(
    recipe: Recipe,
    teacher: nn.Module,
    num_classes: int,
    in_channels: int,
    example_input: torch.Tensor,
    device: torch.device | str = "cpu",
    calibration: Iterable[Any] | None = None,
    iterative_steps: int | None = None,
    teacher_size: SizeReport | None = None,
) -> tuple[nn.Module, PlanReport | None]:
    """The float student architecture a recipe asks for, and the planner's report.

    Args:
        recipe: The validated recipe (``student`` section and final stage bits).
        teacher: The teacher (not modified; pruned copies are returned).
        num_classes: Classes of the data (for ``student.model``).
        in_channels: Input channels of the data (for ``student.model``).
        example_input: One input batch for tracing and MAC counting.
        device: Where ``student.model`` is built.
        calibration: Batches for BatchNorm re-estimation after pruning (``None``: skip,
            as the dry run does).
        iterative_steps: Override ``student.iterative_steps`` (the dry run prunes in one
            step: the widths depend only on the per-group ratio).
        teacher_size: The teacher's size report when the caller has it.

    Returns:
        ``(student, report)``; ``report`` is ``None`` when nothing was pruned.
    """
    s = recipe.student
    final = recipe.final_stage
    if s.model is None:
        base = teacher
    else:
        base = build_recipe_model(recipe, "student", num_classes, in_channels, device)
        if s.target_size_ratio is None and s.prune_ratio is None:
            return base, None
    student, report = plan_student(
        base, example_input, final.weight_bits, final.act_bits,
        first_last_bits=s.first_last_bits, per_channel=s.per_channel,
        # A size target is relative to the teacher: only meaningful when pruning it.
        target_size_ratio=s.target_size_ratio if s.model is None else None,
        prune_ratio=s.prune_ratio,
        importance=s.importance,
        iterative_steps=s.iterative_steps if iterative_steps is None else iterative_steps,
        max_layer_ratio=s.max_layer_ratio,
        calibration_loader=calibration,
        round_to=s.round_to,
        teacher_size=teacher_size if s.model is None else None,
    )
    check_outputs_kept(base, student, example_input)
    return student, report
