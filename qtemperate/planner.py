"""Size planning: pick the pruning ratio that meets a true-bytes target.

The recipe asks for ``target_size_ratio`` = student bytes / teacher float bytes,
counted at the *final* stage's bit widths. Bytes after quantization are not a fixed
multiple of the parameter count (first/last layers stay at 8 bits, per-channel
scales and float biases add a little), so the planner measures rather than
guesses: it reads the candidate student's bytes at the final bits
(:class:`~qtemperate.quant_layout.QuantLayout`: exactly ``model_size(quantize(...))``,
counted from the pruned widths without building the quantized model) and shrinks the
pruning ratio until the target is met.

Starting point: ``r0 = target_bytes / bytes(quantize(teacher))`` — bytes are close to
linear in the parameter count — then ``r ← r · target / bytes · 0.98`` until
``bytes ≤ target`` (a few rounds at most). Every round prunes the same teacher with one
:class:`~qtemperate.pruning.ChannelPruner`, so all ratio searches share one dependency graph.
"""

from __future__ import annotations

import copy
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qtemperate.bits import FLOAT_BITS
from qtemperate.pruning import ChannelPruner, UnreachableTarget, _check_counts, _importance_factory
from qtemperate.quant_layout import QuantLayout, quant_layout
from qtemperate.recipe import Recipe
from qtemperate.size import SizeReport, model_size

__all__ = ["PlanReport", "StagePlan", "plan_recipe", "plan_stages", "plan_student"]

# The layout plan_student read from the teacher, for plan_stages of the student it returned
# (a pruned copy has the teacher's layers and names).
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, QuantLayout] = weakref.WeakKeyDictionary()


@dataclass
class StagePlan:
    """Size of the student at one stage's bit widths."""

    name: str
    weight_bits: int
    act_bits: int
    params: int
    macs: int | None
    bytes: float
    compression_ratio: float


@dataclass
class PlanReport:
    """What the planner chose and what it costs, stage by stage."""

    teacher_params: int
    teacher_macs: int | None
    teacher_float_bytes: float
    prune_ratio: float | None
    target_size_ratio: float | None
    student_params: int
    student_macs: int | None
    student_bytes: float
    compression_ratio: float
    stages: list[StagePlan] = field(default_factory=list)
    rounds: int = 0
    seconds: float = 0.0
    prune_report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantized_bytes(
    model: nn.Module, weight_bits: int, act_bits: int, first_last_bits: int, per_channel: bool,
    layout: QuantLayout | None = None,
) -> float:
    """``model_size(quantize(model, ...)).quantized_bytes``, from ``layout`` when there is one."""
    if layout is not None:
        return float(layout.size(model, weight_bits, act_bits, first_last_bits, per_channel).quantized_bytes)
    from qtemperate.quantization import quantize  # a model quant_layout() does not cover

    q = quantize(model, weight_bits, act_bits, first_last_bits=first_last_bits, per_channel=per_channel)
    return float(model_size(q).quantized_bytes)


def _search_bytes(
    do_prune: Callable[[float], tuple[nn.Module, dict[str, Any] | None]],
    student_bytes: Callable[[nn.Module], float],
    teacher: nn.Module,
    target: float,
    max_rounds: int,
) -> tuple[nn.Module, dict[str, Any] | None, float, int, float]:
    """Shrink the kept-parameter ratio until the student's bytes meet ``target``.

    ``r0 = 0.99 · target / bytes(teacher at the final bits)``, then
    ``r ← 0.98 · r · target / bytes`` until ``bytes ≤ target`` or ``max_rounds``.

    Returns:
        ``(student, prune report, bytes, rounds, ratio)``; the caller checks the target.
    """
    full = student_bytes(teacher)
    ratio = 1.0 if full <= target else min(1.0, target / full * 0.99)
    student, rep = do_prune(ratio)
    sbytes = student_bytes(student) if ratio < 0.999 else full
    rounds = 1
    while sbytes > target and rounds < max_rounds:
        ratio = ratio * target / sbytes * 0.98
        student, rep = do_prune(ratio)
        sbytes = student_bytes(student)
        rounds += 1
    return student, rep, sbytes, rounds, ratio


def plan_student(
    teacher: nn.Module,
    example_input: torch.Tensor,
    weight_bits: int,
    act_bits: int,
    first_last_bits: int = 8,
    per_channel: bool = True,
    target_size_ratio: float | None = None,
    prune_ratio: float | None = None,
    importance: str = "l2",
    iterative_steps: int = 8,
    max_layer_ratio: float = 0.9,
    calibration_loader: Iterable[Any] | None = None,
    max_rounds: int = 4,
    round_to: int | None = None,
    teacher_size: SizeReport | None = None,
) -> tuple[nn.Module, PlanReport]:
    """Derive a student from ``teacher`` by pruning to a bytes or parameter target.

    Args:
        teacher: Float teacher (not modified).
        example_input: One input batch for tracing and MAC counting.
        weight_bits: Final stage weight bits (32 = float student).
        act_bits: Final stage activation bits.
        target_size_ratio: Student bytes at the final bits / teacher float bytes.
        prune_ratio: Alternatively, the fraction of parameters to keep.
        round_to: Keep pruned channel counts multiples of this (see :func:`prune`).
        teacher_size: The teacher's :class:`~qtemperate.size.SizeReport` when the
            caller has it already (MAC counting a large model is not free).

    Returns:
        The pruned float student and a :class:`PlanReport` (stages left empty; see
        :func:`plan_stages`).
    """
    if target_size_ratio is not None and prune_ratio is not None:
        raise ValueError("give target_size_ratio or prune_ratio, not both")
    t0 = time.perf_counter()
    t_size = teacher_size if teacher_size is not None else model_size(teacher, example_input)
    teacher_bytes = float(t_size.float_bytes)
    quantized = weight_bits != FLOAT_BITS

    layout = quant_layout(teacher) if quantized else None  # pruning keeps layers and names

    def student_bytes(m: nn.Module) -> float:
        if not quantized:
            return float(model_size(m).float_bytes)
        return _quantized_bytes(m, weight_bits, act_bits, first_last_bits, per_channel, layout)

    # Parameter targets do not depend on the input size, and DepGraph only needs
    # shapes: trace large images at 64 px (ResNet-50's pruning is ~10x cheaper).
    h, w = example_input.shape[-2:]
    prune_input = (
        torch.nn.functional.interpolate(example_input, size=(64, 64)) if min(h, w) > 64 else example_input
    )

    _check_counts(iterative_steps, max_layer_ratio, 1, round_to)
    _importance_factory(importance)
    pruner: ChannelPruner | None = None  # built on the first prune, reused by every round

    def do_prune(ratio: float) -> tuple[nn.Module, dict[str, Any] | None]:
        nonlocal pruner
        if ratio >= 0.999:
            return copy.deepcopy(teacher), None
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"target_params_ratio must be in (0, 1], got {ratio!r}")
        with warnings.catch_warnings():
            # A coarse channel grid may miss the params ratio; the planner checks the
            # bytes itself and adjusts, so the pruner's warning is noise here.
            warnings.filterwarnings("ignore", message="pruning reached")
            if pruner is None:
                pruner = ChannelPruner(teacher, prune_input, "params", max_layer_ratio, round_to)
            pruned, rep = pruner.prune(ratio, importance, iterative_steps, calibration_loader)
        return pruned, rep.to_dict()

    if target_size_ratio is None:
        student, rep = do_prune(prune_ratio if prune_ratio is not None else 1.0)
        sbytes, rounds, chosen = student_bytes(student), 0, prune_ratio
    else:
        try:
            student, rep, sbytes, rounds, chosen = _search_bytes(
                do_prune, student_bytes, teacher, target_size_ratio * teacher_bytes, max_rounds
            )
        except UnreachableTarget as exc:
            raise ValueError(
                f"student.target_size_ratio={target_size_ratio} not reachable: pruning with "
                f"max_layer_ratio={max_layer_ratio} keeps at least {exc.smallest:.4f} of the "
                "parameters (raise max_layer_ratio or lower the final bit width)"
            ) from None
        if sbytes > target_size_ratio * teacher_bytes:
            raise ValueError(
                f"student.target_size_ratio={target_size_ratio} not reachable: best "
                f"{sbytes / teacher_bytes:.4f} after {rounds} rounds (raise max_layer_ratio "
                "or lower the final bit width)"
            )
    if layout is not None:
        _LAYOUTS[student] = layout
    s_size = model_size(student, example_input)
    if rep is not None:
        chosen = float(rep["params_ratio"])  # what pruning achieved, not what was asked
    report = PlanReport(
        teacher_params=int(t_size.params),
        teacher_macs=t_size.macs,
        teacher_float_bytes=teacher_bytes,
        prune_ratio=chosen,
        target_size_ratio=target_size_ratio,
        student_params=int(s_size.params),
        student_macs=s_size.macs,
        student_bytes=sbytes,
        compression_ratio=sbytes / teacher_bytes,
        rounds=rounds,
        seconds=time.perf_counter() - t0,
        prune_report=rep,
    )
    return student, report


def plan_stages(
    student: nn.Module,
    example_input: torch.Tensor,
    stages: Sequence[tuple[str, int, int]],
    teacher_float_bytes: float,
    first_last_bits: int = 8,
    per_channel: bool = True,
    student_size: SizeReport | None = None,
) -> list[StagePlan]:
    """Params, MACs and true bytes of ``student`` at each ``(name, w_bits, a_bits)``.

    Bytes are those of ``quantize(student, w_bits, a_bits, ...)``, read from the
    student's :class:`~qtemperate.quant_layout.QuantLayout` (for a model it does not
    cover: quantized once at the first quantized stage and switched down in place, the
    path training takes). ``student_size``: the float student's size report with MACs,
    when the caller has it.
    """
    fsize = student_size if student_size is not None else model_size(student, example_input)
    layout = _LAYOUTS.get(student) or quant_layout(student)
    out: list[StagePlan] = []
    q: nn.Module | None = None
    for name, wb, ab in stages:
        if wb == FLOAT_BITS:
            nbytes = float(fsize.float_bytes)
        elif layout is not None:
            nbytes = float(layout.size(student, wb, ab, first_last_bits, per_channel).quantized_bytes)
        else:
            from qtemperate.quantization import quantize, set_bit_width

            if q is None:
                q = quantize(student, wb, ab, first_last_bits=first_last_bits, per_channel=per_channel)
            else:
                set_bit_width(q, wb, ab)
            nbytes = float(model_size(q).quantized_bytes)
        out.append(
            StagePlan(
                name=name,
                weight_bits=wb,
                act_bits=ab,
                params=int(fsize.params),
                macs=fsize.macs,
                bytes=nbytes,
                compression_ratio=nbytes / teacher_float_bytes,
            )
        )
    return out


def plan_recipe(recipe: Recipe) -> dict[str, Any]:
    """Dry run of a recipe: no data, no training, no checkpoint needed.

    Builds the teacher architecture (input shape and class count from the dataset
    name), derives the student exactly as a run would (same planner, no BatchNorm
    re-estimation), quantizes it through the stages and reports per stage params,
    MACs, bytes and ``compression_ratio`` (student bytes / teacher float bytes), and
    the schedule per epoch without validation feedback (``schedule``: rows of
    :func:`~qtemperate.schedule_switches.no_feedback_path`; ``switches``: what
    ``base_temperature: auto`` and ``hardware`` resolved to, class counts not read).
    """
    from qtemperate.preflight import dataset_info
    from qtemperate.training.architecture import build_recipe_model
    from qtemperate.training.student import derive_student

    t0 = time.perf_counter()
    info = dataset_info(recipe.data.name, recipe.data.kwargs)
    teacher = build_recipe_model(recipe, "teacher", info.num_classes, info.in_channels).eval()
    example = torch.randn(1, info.in_channels, *info.image_size)
    s = recipe.student
    t_size = model_size(teacher, example)
    teacher_bytes = float(t_size.float_bytes)
    # Widths depend only on the per-group ratio, not on how many steps reach it, so the
    # dry run prunes in one step: same sizes, a fraction of the time.
    student, report = derive_student(
        recipe, teacher, info.num_classes, info.in_channels, example, iterative_steps=1, teacher_size=t_size,
    )
    student.eval()
    s_size = None
    if report is not None:  # plan_student counted the student's params and MACs already
        nbytes = 4 * report.student_params
        s_size = SizeReport(float_bytes=nbytes, quantized_bytes=float(nbytes), compression_ratio=1.0,
                            params=report.student_params, macs=report.student_macs)
    # The schedule as planned: switches resolved (a dry run reads no class counts) and the
    # no-feedback path of every stage (no validation loss before training).
    from qtemperate.joint_scheduler import JointScheduler
    from qtemperate.schedule_switches import ModelFacts, no_feedback_path, resolve_switches

    switches = resolve_switches(
        recipe, ModelFacts(info.num_classes, int(t_size.params),
                           int(s_size.params if s_size is not None else model_size(student).params))
    )
    sched = JointScheduler.from_recipe(switches.recipe)
    stages = plan_stages(
        student, example, [(st.label, st.weight_bits, st.act_bits) for st in recipe.stages],
        teacher_bytes, first_last_bits=s.first_last_bits, per_channel=s.per_channel, student_size=s_size,
    )
    return {
        "recipe": recipe.name,
        "teacher": {"model": recipe.teacher.model, "params": int(t_size.params), "macs": t_size.macs},
        "teacher_float_bytes": teacher_bytes,
        "prune_ratio": None if report is None else report.prune_ratio,
        "target_size_ratio": s.target_size_ratio,
        "params": stages[-1].params,
        "macs": stages[-1].macs,
        "student_bytes": stages[-1].bytes,
        "compression_ratio": stages[-1].compression_ratio,
        "stages": [asdict(st) for st in stages],
        "switches": switches.notes,
        "reference_temperatures": list(sched.base_temperatures),
        "schedule": no_feedback_path(sched),
        "seconds": time.perf_counter() - t0,
    }
