"""Student derivation, shared by ``qtemperate plan`` and ``qtemperate run``.

The student is the teacher pruned to the recipe's size target
(``student.target_size_ratio``: true quantized bytes at the final stage's bits over
the teacher's float bytes; or ``student.prune_ratio``: kept fraction of parameters),
or the recipe's own ``student.model`` (pruned only when it asks for a
``prune_ratio``). :func:`derive_student` is the one place that reads those settings,
so a plan and a run of the same recipe derive the same architecture.

The derived architecture is saved as data (``student_arch.pt``: the factory name and
kwargs from :func:`student_source`, every layer's shape, the float weights and the
plan; see :mod:`qtemperate.arch_spec`), never as a pickled module.
:func:`check_student_target` is the dry run a run makes before its teacher trains, so
an unreachable size target fails in seconds, not after the teacher's training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qtemperate.errors import BadInput
from qtemperate.models import resolve_model
from qtemperate.planner import PlanReport, plan_student
from qtemperate.recipe import Recipe
from qtemperate.size import SizeReport
from qtemperate.training.architecture import (
    build_recipe_model,
    check_outputs_kept,
    factory_kwargs,
    model_search_path,
)
from qtemperate.training.seed import rng_state, set_rng_state

__all__ = ["STUDENT_ARCH_FILE", "check_student_target", "derive_student", "student_source"]

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


def student_source(
    recipe: Recipe, num_classes: int, in_channels: int
) -> tuple[str, dict[str, Any], list[str]]:
    """What the student's architecture is rebuilt from: the factory name, the exact kwargs
    it is called with (recipe kwargs plus the data facts it accepts) and the folders an
    import path is resolved from — the teacher's when the student is derived from it,
    else ``student.model``'s."""
    section = "teacher" if recipe.student.model is None else "student"
    cfg = getattr(recipe, section)
    search = model_search_path(recipe)
    factory = resolve_model(cfg.model, search)
    kwargs = factory_kwargs(factory, cfg.kwargs, {"num_classes": num_classes, "in_channels": in_channels},
                            section, cfg.model)
    return cfg.model, dict(kwargs), [str(p) for p in search]


def check_student_target(
    recipe: Recipe, num_classes: int, in_channels: int, example_input: torch.Tensor
) -> None:
    """Derive the student from the untrained architecture (one pruning step, no
    calibration, as ``qtemperate plan`` does) and fail now if the target cannot be met.

    Widths depend on the per-group pruning ratio only, not on the weights, so this
    answers for the trained teacher too.

    Raises:
        BadInput: ``student.target_size_ratio`` or ``student.prune_ratio`` is unreachable.
    """
    s = recipe.student
    if s.target_size_ratio is None and s.prune_ratio is None:
        return
    saved = rng_state()  # a check must not change what the run draws next (the teacher's init)
    try:
        teacher = build_recipe_model(recipe, "teacher", num_classes, in_channels, "cpu").eval()
        derive_student(recipe, teacher, num_classes, in_channels, example_input.cpu(), iterative_steps=1)
    except ValueError as exc:  # the planner's and the pruner's "not reachable"
        msg = str(exc)
        field = "student.target_size_ratio" if s.target_size_ratio is not None else "student.prune_ratio"
        raise BadInput(msg if msg.startswith("student.") else f"{field}: {msg}") from None
    finally:
        set_rng_state(saved)
