"""One distillation epoch: the student learns from the teacher's softened logits.

Per step: the per-update temperature of a schedule stepped within epochs (joint
scheduler with ``updates_per_epoch``), teacher logits (cached or live),
``parts = TemperateLoss(student(x), t, y)``, backward, gradient clipping, the
per-update temperature of a schedule that moves with the gradient norm, optimizer
step. Multi-output models: ``y`` may be a dict of targets and the parts carry one KD
term per distilled head. Loss parts stay tensors and are read back (a host
sync on a GPU) only every ``log_every`` steps and at the end of the epoch, where a
NaN/Inf stops the run before the epoch's evaluation and checkpoint. In a data-parallel
run the student is DDP-wrapped and the values read back are averaged over ranks (the
global batch's loss), so every rank logs, and stops on, the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qtemperate.heads import as_float, targets_to
from qtemperate.joint_scheduler import JointScheduler, StageState
from qtemperate.losses import TemperateLoss
from qtemperate.training import distributed
from qtemperate.training.checkpointing import Progress
from qtemperate.training.console import Console
from qtemperate.training.guards import check_finite
from qtemperate.training.lr_schedule import lr_at, set_lr
from qtemperate.training.memory_format import to_format, wants_channels_last
from qtemperate.training.precision import ComputePolicy
from qtemperate.training.teacher import TeacherLogits

__all__ = ["Distiller", "LrPlan", "freeze_step", "stable_names"]


@dataclass(frozen=True)
class LrPlan:
    """The learning-rate schedule of one stage, in global optimizer steps."""

    first_step: int
    steps: int
    peak: float
    kind: str

    def at(self, global_step: int) -> float:
        return lr_at(global_step - self.first_step, self.steps, self.peak, self.kind)


def freeze_step(fraction: float | None, plan: LrPlan) -> int | None:
    """The global step from which a stage's activation ranges are frozen.

    ``first + ceil(fraction * steps)`` for the stage's ``plan`` (``None``: never).
    """
    if fraction is None:
        return None
    return plan.first_step + math.ceil(fraction * plan.steps)


def _ranges_frozen(model: nn.Module) -> bool:
    from qtemperate.quantization.freeze import activation_ranges_frozen

    return bool(activation_ranges_frozen(model))


def stable_names(parts: dict[str, Any], state: StageState, scheduler: JointScheduler) -> dict[str, Any]:
    """Name each scale's KD part by its *reference* temperature (``kd_T6``).

    The loss names parts by the current T (``kd_T7.13``), which moves every epoch;
    charts need names that stay put. The current T of each scale is logged beside it
    as ``T_scale{ref}``. A multi-output model's parts ``kd_{head}_T{now}`` become
    ``kd_{head}_T{ref}`` with ``T_{head}_scale{ref}`` beside them, the reference being
    the head's ``head_temperatures`` (or the shared set for a head without them).
    """
    heads = [k[3:] for k in parts
             if k.startswith("kd_") and any(o.startswith(f"{k}_T") for o in parts)]
    moving = {f"kd_{h}_T" for h in heads}
    out = {k: v for k, v in parts.items()
           if not k.startswith("kd_T") and not any(k.startswith(p) for p in moving)}
    if not heads:
        for ref, now in zip(scheduler.base_temperatures, state.temperatures):
            part = parts.get(f"kd_T{now:g}")
            if part is not None:
                out[f"kd_T{ref:g}"] = part
            out[f"T_scale{ref:g}"] = now
        return out
    for head in heads:
        refs = scheduler.head_reference.get(head, scheduler.base_temperatures)
        nows = state.head_temperatures.get(head, state.temperatures)
        for ref, now in zip(refs, nows):
            part = parts.get(f"kd_{head}_T{now:g}")
            if part is not None:
                out[f"kd_{head}_T{ref:g}"] = part
            out[f"T_{head}_scale{ref:g}"] = now
    return out


@dataclass
class Distiller:
    """What stays fixed over the epochs of one stage, and :meth:`train_epoch`.

    Attributes:
        student: The model being trained.
        teacher: Source of the teacher's logits.
        loss_fn: The Temperate loss (its temperatures are set per epoch / update).
        scheduler: The joint scheduler (already stepped to the epoch).
        optimizer: The stage's optimizer.
        device: Where batches go.
        grad_clip: Max gradient norm (``inf``: no clipping, the norm is still measured).
        log_every: Read loss parts back and log every this many steps.
        policy: Autocast and batch placement of the student (default: fp32 on ``device``).
        freeze_ranges_at: Global step from which the student's learned activation ranges
            are frozen (:func:`~qtemperate.quantization.freeze_activation_ranges`; the
            stage's ``freeze_act_ranges_at``), ``None``: never. In a data-parallel run
            the wrapper is rebuilt at the freeze (:attr:`student` is the new one).
    """

    student: nn.Module
    teacher: TeacherLogits
    loss_fn: TemperateLoss
    scheduler: JointScheduler
    optimizer: torch.optim.Optimizer
    device: torch.device
    grad_clip: float
    log_every: int
    policy: ComputePolicy | None = None
    freeze_ranges_at: int | None = None

    def _freeze_ranges(self, step: int, console: Console) -> None:
        """Freeze the activation ranges from ``step`` on (a no-op once they are frozen)."""
        from qtemperate.quantization.freeze import freeze_activation_ranges

        try:
            changed = freeze_activation_ranges(self.student)
        except ValueError as exc:
            console.say(f"freeze_act_ranges_at: nothing frozen: {exc}")
            self.freeze_ranges_at = None
            return
        if changed:
            self.student = distributed.rewrap(self.student, self.device)
            console.say(f"activation ranges frozen from step {step} ({changed} quantizers; freeze_act_ranges_at)")

    def train_epoch(
        self,
        loader: Any,
        epoch: int,
        progress: Progress,
        lr: LrPlan,
        log: Callable[[dict[str, Any], int], None],
        console: Console,
    ) -> dict[str, float]:
        """Train one epoch; return the mean of every logged loss part.

        Args:
            loader: Yields ``(x, y, index)``.
            epoch: Global epoch (for messages and logs).
            progress: Its ``global_step`` advances by one per step.
            lr: The stage's learning-rate plan.
            log: ``log(metrics, step_in_student_steps)``.
            console: Progress bar and messages.
        """
        sched = self.scheduler
        state = sched.state
        assert state is not None, "step the scheduler to the epoch first"
        self.student.train()
        sums: dict[str, Any] = {}
        n = 0
        where = f"epoch {epoch} ({state.stage_name})"
        bar = console.bar(loader, desc=f"epoch {epoch + 1}/{sched.total_epochs} {state.stage_name}")
        within_epoch = sched.moves_per_update and not sched.wants_grad_norm
        policy = self.policy or ComputePolicy(self.device)
        # NHWC convolutions are faster on a CPU (memory_format); the layout is restored below.
        # Not under DDP: its gradient buckets are views of the parameters as they were wrapped.
        cl = (self.device.type == "cpu" and distributed.world_size() == 1
              and any(isinstance(m, nn.Conv2d) for m in self.student.modules()))
        if cl:
            self.student.to(memory_format=torch.channels_last)
        frozen = self.freeze_ranges_at is None or _ranges_frozen(self.student)
        for x, y, idx in bar:
            if self.freeze_ranges_at is not None and not frozen and progress.global_step >= self.freeze_ranges_at:
                self._freeze_ranges(progress.global_step, console)
                frozen = True
            x, y = policy.to_device(x), targets_to(y, self.device)
            x = to_format(x, cl and wants_channels_last(x))
            if within_epoch:  # T of this update's position in the epoch, before its forward
                state = sched.step_update(progress.global_step)
                self.loss_fn.follow(state)
            t_out = self.teacher(x, idx)
            rate = lr.at(progress.global_step)
            set_lr(self.optimizer, rate)
            with policy.autocast():
                s_out = self.student(x)
            parts = self.loss_fn(as_float(s_out), t_out, y)
            self.optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
            if sched.wants_grad_norm:
                state = sched.step_update(progress.global_step, float(gnorm))
                self.loss_fn.follow(state)
            self.optimizer.step()
            progress.global_step += 1
            n += 1
            named = stable_names({k: v.detach() for k, v in parts.items()}, state, sched)
            for k, v in named.items():
                sums[k] = sums[k] + v if k in sums else v
            if progress.global_step % self.log_every == 0:
                reduced = distributed.mean_over_ranks({k: v for k, v in named.items() if torch.is_tensor(v)})
                vals = {k: reduced.get(k, float(v)) for k, v in named.items()}
                check_finite(vals["loss"], where)
                if console.enabled:
                    bar.set_postfix(loss=f"{vals['loss']:.3f}", T=f"{state.temperature:.2f}",
                                    bits=f"W{state.weight_bits}A{state.act_bits}")
                log(
                    {
                        **{f"train/{k}": v for k, v in vals.items()},
                        "train/lr": rate,
                        "train/T": state.temperature,
                        "train/weight_bits": state.weight_bits,
                        "train/act_bits": state.act_bits,
                        "train/grad_norm": float(gnorm),
                        "epoch": epoch,
                    },
                    progress.global_step,
                )
        if cl:
            self.student.to(memory_format=torch.contiguous_format)
        means = distributed.mean_over_ranks({k: float(v) / max(n, 1) for k, v in sums.items()})
        check_finite(means.get("loss", 0.0), where)
        return means
