"""Temperate distillation, its temperature schedule and the bit-width stages in Lightning.

:class:`TemperateDistillation` is a ``lightning.pytorch`` callback. Give it the teacher
and the stages; your ``LightningModule`` keeps its own network, optimizer, data and
logger, and its ``training_step`` asks the callback for the loss::

    kd = TemperateDistillation(teacher, [BitStage("float", 1), BitStage("w8a8", 1, 8, 8),
                                         BitStage("w4a4", 1, 4, 4)],
                               temperatures=(6.0, 3.0, 1.0), student_attr="net")

    class LitStudent(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return kd.distill(self.net(x), x, y)["loss"]

    L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd]).fit(LitStudent(...), loader)

What it does, hook by hook:

* ``setup``: when the first stage is quantized, the student (``pl_module.<student_attr>``)
  is quantized before Lightning builds the optimizer (so ``configure_optimizers`` sees
  the quantized parameters).
* ``on_fit_start``: the teacher goes to the module's device, in eval mode with every
  parameter frozen (it is not part of the module: Lightning never trains it, never
  switches it to train mode, never saves it); ``Trainer(max_epochs)`` must equal the
  stages' epochs.
* ``on_train_epoch_start``: the joint scheduler steps to the epoch with the latest
  validation loss (``trainer.callback_metrics[val_loss_key]``, what
  ``self.log("val_loss", ...)`` in ``validation_step`` records). At a stage boundary
  the student is quantized (first quantized stage: the module attribute is replaced
  and Lightning's optimizers and LR schedulers are rebuilt by ``configure_optimizers``)
  or its bits are lowered in place (:func:`~qtemperate.quantization.set_bit_width`).
* ``on_train_batch_start``: with ``step_per_update`` (default), an epoch-driven
  schedule moves within the epoch (``step(epoch + batch_idx / batches)``: the Temperate
  cosine decays per update); with ``freeze_act_ranges_at``, the activation ranges are
  frozen once the stage has done that fraction of its updates (thawed at the next stage).
* ``on_before_optimizer_step``: a ``gradient_norm`` stage reads the student's gradient
  norm and moves T for the next update.
* ``on_train_batch_end``: the loss parts (``kd_loss``, ``kd_T6`` ...), the current
  temperatures (``T``, ``T_scale6`` ...) and bits are logged through
  ``pl_module.log`` under ``log_prefix`` (every ``log_every_n_steps`` updates, as
  Lightning logs), so they reach whatever logger the Trainer has (CSV, TensorBoard,
  W&B via ``WandbLogger``); ``on_train_epoch_end`` logs the epoch's last temperature
  and bits once per epoch (``epoch_T``, ``epoch_weight_bits``, ``epoch_act_bits``).
* ``state_dict`` / ``load_state_dict``: the scheduler's state and the stage travel in
  Lightning checkpoints. Resuming a fit whose student was already quantized: call
  :meth:`TemperateDistillation.prepare_resume` before ``trainer.fit(ckpt_path=...)``
  (Lightning loads the model's weights before any callback state, so the student must
  be quantized first).

Mid-fit quantization replaces a submodule and the optimizers: use a single-device
strategy for it, or start with a quantized stage (quantized in ``setup``, before any
wrapping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "qtemperate.integrations.lightning needs Lightning: pip install 'qtemperate[lightning]'"
    ) from exc

from qtemperate.heads import Task
from qtemperate.joint_scheduler import BitStage, JointScheduler, StageState
from qtemperate.losses import TemperateLoss
from qtemperate.quantization import (
    activation_ranges_frozen,
    freeze_activation_ranges,
    get_quant_config,
    is_quantized,
    quantize,
    set_bit_width,
)
from qtemperate.training.loop import stable_names

__all__ = ["TemperateDistillation"]


class TemperateDistillation(pl.Callback):
    """Add Temperate distillation and bit-width stages to a ``LightningModule``.

    Args:
        teacher: The trained teacher (frozen and kept in eval mode here).
        stages: The bit-width stages (or give ``scheduler``).
        scheduler: A ready :class:`~qtemperate.joint_scheduler.JointScheduler`
            (instead of ``stages`` and the temperature arguments).
        temperatures: Multi-scale reference temperatures of the scheduler and loss.
        weights: Their weights (``None``: uniform).
        head_temperatures: Per-head reference temperatures (multi-output models).
        head_weights: Per-head KD weights (multi-output models).
        task: Per-head task losses and the scored head (multi-output models).
        kd_weight: Weight of the KD term in ``[0, 1]``.
        student_attr: The module attribute that holds the student network (the part
            that is quantized).
        calibration: Batches (``x`` or ``(x, ...)``) for activation-range calibration at
            quantization; ``None``: Brevitas initialises ranges from the first training
            forward passes.
        calibration_batches: How many of them to use.
        first_last_bits: Weight bits of the first and last layers when quantized.
        per_channel: Per-channel weight scales.
        step_per_update: Move epoch-driven schedules within epochs (per batch).
        val_loss_key: The logged metric that drives the adaptive schedule.
        log_prefix: Prefix of the logged keys.
        freeze_act_ranges_at: Fraction ``f`` of each quantized stage's updates after which
            the student's learned activation ranges stop training
            (:func:`~qtemperate.quantization.freeze_activation_ranges`; from update
            ``ceil(f * updates)`` of the stage on, thawed when the next stage starts), as a
            recipe's ``stages[i].freeze_act_ranges_at``; ``None``: never. Single-device fits.

    Raises:
        ValueError: neither or both of ``stages`` and ``scheduler``; ``freeze_act_ranges_at``
            outside ``[0, 1)``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        stages: Sequence[BitStage] | None = None,
        *,
        scheduler: JointScheduler | None = None,
        temperatures: Sequence[float] = (4.0,),
        weights: Sequence[float] | None = None,
        head_temperatures: Mapping[str, float | Sequence[float]] | None = None,
        head_weights: Mapping[str, float] | None = None,
        task: Task | None = None,
        kd_weight: float = 0.9,
        student_attr: str = "model",
        calibration: Iterable[Any] | None = None,
        calibration_batches: int = 8,
        first_last_bits: int = 8,
        per_channel: bool = True,
        step_per_update: bool = True,
        val_loss_key: str = "val_loss",
        log_prefix: str = "temperate/",
        freeze_act_ranges_at: float | None = None,
    ) -> None:
        super().__init__()
        if (stages is None) == (scheduler is None):
            raise ValueError("give the bit-width stages or a JointScheduler (exactly one)")
        if freeze_act_ranges_at is not None and not 0 <= freeze_act_ranges_at < 1:
            raise ValueError(f"freeze_act_ranges_at must be in [0, 1), got {freeze_act_ranges_at}")
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher
        self.scheduler = scheduler if scheduler is not None else JointScheduler(
            stages, temperatures, weights, head_temperatures=head_temperatures  # type: ignore[arg-type]
        )
        temps = self.scheduler.base_temperatures
        self.loss_fn = TemperateLoss(
            kd_weight, temps, self.scheduler.base_weights,
            head_temperatures=dict(self.scheduler.head_reference) or None, head_weights=head_weights,
            task_head=(task.accuracy_head if task is not None and task.multi_head else "logits"), task=task,
        )
        self.student_attr = student_attr
        self.calibration = calibration
        self.calibration_batches = calibration_batches
        self.first_last_bits = first_last_bits
        self.per_channel = per_channel
        self.step_per_update = step_per_update
        self.val_loss_key = val_loss_key
        self.log_prefix = log_prefix
        self.freeze_act_ranges_at = freeze_act_ranges_at
        self._frozen_in = -1  # the stage whose activation ranges were frozen (-1: none)
        self.state: StageState | None = None
        self.stage_index = -1  # the stage the student is in (-1: none entered yet)
        self._parts: dict[str, Tensor] = {}

    # -- what a training_step calls ------------------------------------------------
    @property
    def total_epochs(self) -> int:
        """Epochs of all stages: the Trainer's ``max_epochs``."""
        return self.scheduler.total_epochs

    def distill(self, student_out: Any, inputs: Any, targets: Any) -> dict[str, Tensor]:
        """The Temperate loss of a batch (its parts; ``["loss"]`` is what to return).

        The teacher's output for ``inputs`` is computed here, in eval mode without
        gradients. The parts are kept for logging at the end of the batch.
        """
        if self.state is None:
            raise RuntimeError("TemperateDistillation.distill() is called during Trainer.fit with the callback")
        self.teacher.eval()
        with torch.no_grad():
            t_out = self.teacher(inputs)
        parts = self.loss_fn(student_out, t_out, targets)
        self._parts = {k: v.detach() for k, v in parts.items()}
        return parts

    # -- hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._student(pl_module)  # fail early on a wrong attribute name
        first = self.scheduler.stages[0]
        if first.quantized and self.stage_index < 0 and not is_quantized(self._student(pl_module)):
            self._quantize(pl_module, first)
            self.stage_index = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs != self.total_epochs:
            raise ValueError(
                f"Trainer(max_epochs={trainer.max_epochs}) but the stages last {self.total_epochs} epochs; "
                "use max_epochs=kd.total_epochs"
            )
        if self.freeze_act_ranges_at is not None and trainer.world_size > 1:
            raise ValueError("freeze_act_ranges_at changes which parameters get gradients during fit, "
                             "which a distributed wrapper does not allow; use it in single-device fits")
        self.teacher.to(pl_module.device).eval()
        self.teacher.requires_grad_(False)
        teacher_params = {id(p) for p in self.teacher.parameters()}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if any(id(p) in teacher_params for p in group["params"]):
                    raise ValueError("the optimizer holds teacher parameters; the teacher must stay frozen")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        val = trainer.callback_metrics.get(self.val_loss_key)
        val_loss = None if val is None else float(val)
        idx = self.scheduler.stage_index(epoch)
        if idx != self.stage_index:
            self._enter_stage(trainer, pl_module, idx)
        try:
            self.state = self.scheduler.step(epoch, val_loss)
        except ValueError as exc:
            if val_loss is None and "val_loss" in str(exc):
                raise ValueError(
                    f"{exc}: log {self.val_loss_key!r} in validation_step (self.log({self.val_loss_key!r}, "
                    "loss)) and give the Trainer validation data, or pass val_loss_key=, or use a "
                    "schedule without an adaptive phase"
                ) from exc
            raise
        self.loss_fn.follow(self.state)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        self._maybe_freeze(trainer, pl_module, batch_idx, batches)
        if not self.step_per_update or batch_idx == 0 or not math.isfinite(batches) or batches <= 0:
            return
        if self.scheduler.schedule(self.stage_index).fractional_epochs:
            self.state = self.scheduler.step(trainer.current_epoch + batch_idx / batches)
            self.loss_fn.follow(self.state)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.scheduler.wants_grad_norm:
            return
        grads = [p.grad.detach() for p in self._student(pl_module).parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
        self.state = self.scheduler.step_update(trainer.global_step, float(norm))
        self.loss_fn.follow(self.state)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        st = self.state
        if st is None:
            return
        named = stable_names(dict(self._parts), st, self.scheduler) if self._parts else {}
        metrics = {f"{self.log_prefix}{k}": float(v) for k, v in named.items()}
        metrics.update({
            f"{self.log_prefix}T": st.temperature,
            f"{self.log_prefix}weight_bits": float(st.weight_bits),
            f"{self.log_prefix}act_bits": float(st.act_bits),
            f"{self.log_prefix}stage": float(st.stage_index),
        })
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        st = self.state
        if st is None:
            return
        p = self.log_prefix
        pl_module.log_dict({f"{p}epoch_T": st.temperature, f"{p}epoch_weight_bits": float(st.weight_bits),
                            f"{p}epoch_act_bits": float(st.act_bits)}, on_step=False, on_epoch=True)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st = self.scheduler.stages[self.stage_index] if self.stage_index >= 0 else None
        return {
            "scheduler": self.scheduler.state_dict(),
            "stage_index": self.stage_index,
            "bits": None if st is None or not st.quantized else [st.weight_bits, st.act_bits],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.stage_index = int(state_dict["stage_index"])

    def prepare_resume(self, pl_module: pl.LightningModule, ckpt_path: str | Path) -> None:
        """Put the student in the precision a checkpoint was saved at, before ``fit(ckpt_path=...)``.

        Reads this callback's state from the Lightning checkpoint; when the student was
        quantized then, quantizes it now (same settings) at the saved bits, so
        Lightning can load the quantized weights into it.
        """
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        mine = ckpt.get("callbacks", {}).get(self.state_key)
        if mine is None:
            raise ValueError(f"{ckpt_path}: no {type(self).__name__} state in this checkpoint")
        if mine.get("bits") is not None and not is_quantized(self._student(pl_module)):
            w, a = mine["bits"]
            self._quantize(pl_module, BitStage("resume", 1, w, a), calibrate=False)
        self.stage_index = int(mine["stage_index"])

    # -- stages ----------------------------------------------------------------------
    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.student_attr, None)
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"the LightningModule has no network at .{self.student_attr}; pass "
                "student_attr='<the attribute holding the student>'"
            )
        return net

    def _quantize(self, pl_module: pl.LightningModule, stage: BitStage, calibrate: bool = True) -> None:
        use = self.calibration if calibrate and self.calibration_batches > 0 else None
        q = quantize(
            self._student(pl_module), stage.weight_bits, stage.act_bits, self.first_last_bits,
            self.per_channel, calibration_loader=use, calibration_batches=max(self.calibration_batches, 1),
        )
        setattr(pl_module, self.student_attr, q)

    def _maybe_freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int,
                      batches: float) -> None:
        """Freeze the activation ranges once the stage has done ``freeze_act_ranges_at`` of its updates."""
        idx = self.stage_index
        if self.freeze_act_ranges_at is None or idx < 0 or self._frozen_in == idx:
            return
        stage = self.scheduler.stages[idx]
        if not stage.quantized:
            return
        local = trainer.current_epoch - self.scheduler.stage_bounds()[idx][0]
        if math.isfinite(batches) and batches > 0:  # updates done so far / the stage's updates
            done = (local * batches + batch_idx) >= math.ceil(self.freeze_act_ranges_at * stage.epochs * batches)
        else:
            done = local >= math.ceil(self.freeze_act_ranges_at * stage.epochs)
        if done:
            freeze_activation_ranges(self._student(pl_module))
            self._frozen_in = idx

    def _enter_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> None:
        stage = self.scheduler.stages[idx]
        self.stage_index = idx
        if not stage.quantized:
            return
        net = self._student(pl_module)
        if is_quantized(net):
            if self._frozen_in >= 0 and activation_ranges_frozen(net):  # frozen late in the last stage
                freeze_activation_ranges(net, frozen=False)
            self._frozen_in = -1
            cfg = get_quant_config(net)
            if (cfg.weight_bits, cfg.act_bits) != (stage.weight_bits, stage.act_bits):
                set_bit_width(net, stage.weight_bits, stage.act_bits)
            return
        if trainer.world_size > 1:
            raise ValueError(
                f"stage {stage.name!r} quantizes the student during fit, which replaces modules inside "
                "a distributed wrapper; start with a quantized stage (quantized before fit) instead"
            )
        self._quantize(pl_module, stage)
        self._student(pl_module).to(pl_module.device)
        trainer.strategy.setup_optimizers(trainer)  # the quantized student has new parameters
