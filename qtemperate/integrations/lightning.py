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

    L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd], gradient_clip_val=5.0).fit(LitStudent(...), loader)

What it does, hook by hook:

* ``setup``: when the first stage is quantized, the student (``pl_module.<student_attr>``)
  is quantized before Lightning builds the optimizer (so ``configure_optimizers`` sees
  the quantized parameters).
* ``on_fit_start``: the teacher goes to the module's device, in eval mode with every
  parameter frozen (it is not part of the module: Lightning never trains it, never
  switches it to train mode, never saves it); ``Trainer(max_epochs)`` must equal the
  stages' epochs. A fit with quantized stages and no ``Trainer(gradient_clip_val=...)``
  gets a :class:`~qtemperate.errors.QtemperateWarning`: quantization-aware updates with
  SGD momentum can blow up right after the student is quantized (the recipe trainer
  clips the gradient norm to ``optimizer.grad_clip`` = 5 by default; pass the same).
* ``on_train_epoch_start``: the joint scheduler steps to the epoch with the latest
  validation loss (``trainer.callback_metrics[val_loss_key]``, what
  ``self.log("val_loss", ...)`` in ``validation_step`` records; the callback keeps the
  last one it saw, so a resumed fit has it before its first validation). At a stage boundary
  the student is quantized (first quantized stage: the module attribute is replaced
  and Lightning's optimizers and LR schedulers are rebuilt by ``configure_optimizers``)
  or its bits are lowered in place (:func:`~qtemperate.quantization.set_bit_width`).
* ``on_train_batch_start``: with ``step_per_update`` (default), an epoch-driven
  schedule moves within the epoch (``step(epoch + batch_idx / batches)``: the Temperate
  cosine decays per update); with ``freeze_act_ranges_at``, the activation ranges are
  frozen once the stage has done that fraction of its updates (thawed at the next stage).
* ``on_before_backward``: a NaN/Inf loss stops the fit at the update it appears in,
  before its backward pass and optimizer step, with
  :class:`~qtemperate.training.guards.TrainingDiverged` (one line naming the step,
  epoch, batch, stage and temperature; ``on_validation_end`` stops it the same way on a
  non-finite validation loss). Reading the loss is a host sync per update, as the
  per-update logging below already is.
* ``on_before_optimizer_step``: a ``gradient_norm`` stage reads the student's gradient
  norm and moves T for the next update.
* ``on_train_batch_end``: the loss parts (``kd_loss``, ``kd_T6`` ...), the current
  temperatures (``T``, ``T_scale6`` ...) and bits are logged through
  ``pl_module.log`` under ``log_prefix`` (every ``log_every_n_steps`` updates, as
  Lightning logs), so they reach whatever logger the Trainer has (CSV, TensorBoard,
  W&B via ``WandbLogger``); ``on_train_epoch_end`` logs the epoch's last temperature
  and bits once per epoch (``epoch_T``, ``epoch_weight_bits``, ``epoch_act_bits``).
* ``state_dict`` / ``load_state_dict``: everything the schedule reads travels in
  Lightning checkpoints: every stage's temperature schedule (its temperature, phase,
  plateau counter and previous validation loss), the last scheduler state (so a fit
  resumed mid-epoch trains on with the same temperatures without an epoch start), the
  stage, its bits, the last validation loss and whether the activation ranges were
  frozen. ``trainer.fit(module, ..., ckpt_path=...)`` resumes from any checkpoint, one
  saved mid-epoch (``ModelCheckpoint(every_n_train_steps=...)``, with a data loader
  Lightning can resume) inside a quantized stage too: Lightning loads the model's
  weights before any callback state, so when the checkpoint's student was quantized the
  callback quantizes the fresh student first (at the saved bits, from a hook on the
  module's ``load_state_dict``; :meth:`TemperateDistillation.prepare_resume` does the
  same by hand).

Mid-fit quantization replaces a submodule and the optimizers: use a single-device
strategy for it, or start with a quantized stage (quantized in ``setup``, before any
wrapping).
"""

from __future__ import annotations

import functools
import math
import pickle
import warnings
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

from qtemperate.errors import QtemperateWarning
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
from qtemperate.recipe import OptimizerConfig
from qtemperate.training.guards import check_finite
from qtemperate.training.loop import stable_names

__all__ = ["TemperateDistillation"]

# The gradient-norm bound the recipe trainer clips to by default (``optimizer.grad_clip``).
_GRAD_CLIP = OptimizerConfig.model_fields["grad_clip"].default
_CHANGE = (
    f"Lower the learning rate, raise the temperature or clip gradients (Trainer(gradient_clip_val={_GRAD_CLIP:g}))"
)


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
        self._val_loss: float | None = None  # the last validation loss seen (saved: a resumed
        # fit has no callback_metrics until its first validation)
        self._val_epoch: int | None = None  # the epoch whose validation gave it
        self._batch_idx = 0  # the batch of the current update (named when the loss diverges)
        self._parts: dict[str, Tensor] = {}
        self._load_hook: Any = None  # the student-quantizing hook on the module's load_state_dict

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
        # Lightning loads a checkpoint's weights before any callback state: this hook
        # quantizes a float student first when the checkpoint's was quantized.
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(
            functools.partial(self._before_weights_load, trainer)
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs != self.total_epochs:
            raise ValueError(
                f"Trainer(max_epochs={trainer.max_epochs}) but the stages last {self.total_epochs} epochs; "
                "use max_epochs=kd.total_epochs"
            )
        if self.freeze_act_ranges_at is not None and trainer.world_size > 1:
            raise ValueError("freeze_act_ranges_at changes which parameters get gradients during fit, "
                             "which a distributed wrapper does not allow; use it in single-device fits")
        if not trainer.gradient_clip_val and pl_module.automatic_optimization and any(
            st.quantized for st in self.scheduler.stages
        ):
            warnings.warn(
                "TemperateDistillation: the Trainer clips no gradients; quantization-aware updates "
                "(SGD with momentum most of all) can diverge to NaN right after the student is "
                f"quantized: pass Trainer(gradient_clip_val={_GRAD_CLIP:g}), the gradient-norm bound "
                "the recipe trainer uses (optimizer.grad_clip)",
                QtemperateWarning,
                stacklevel=2,
            )
        self.teacher.to(pl_module.device).eval()
        self.teacher.requires_grad_(False)
        teacher_params = {id(p) for p in self.teacher.parameters()}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if any(id(p) in teacher_params for p in group["params"]):
                    raise ValueError("the optimizer holds teacher parameters; the teacher must stay frozen")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume everything is restored (weights, optimizers, this state): give the
        # student the frozen activation ranges it had when the checkpoint was written. Done
        # here, after configure_optimizers, because the fit built its optimizer before the
        # ranges froze.
        net = self._student(pl_module)
        if self._frozen_in >= 0 and self._frozen_in == self.stage_index and is_quantized(net):
            freeze_activation_ranges(net)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._latest_val_loss(trainer) is not None:
            self._val_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_epoch(trainer, pl_module)

    def _start_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, resumed: bool = False) -> None:
        """Enter the epoch's stage and step the scheduler to it with the last validation loss."""
        epoch = trainer.current_epoch
        self._batch_idx = 0
        val_loss = self._latest_val_loss(trainer)
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
        if resumed and self.state.phase == "adaptive" and self._val_epoch != epoch - 1:
            seen = "none" if self._val_epoch is None else f"epoch {self._val_epoch}'s"
            warnings.warn(
                f"TemperateDistillation: resumed at epoch {epoch} from a checkpoint written after the last "
                f"update of epoch {epoch - 1} and before its validation, which Lightning does not run on "
                f"resume: the adaptive temperature step of epoch {epoch} read {seen} {self.val_loss_key!r}, "
                f"the uninterrupted fit epoch {epoch - 1}'s; resume from a checkpoint written after "
                "validation (ModelCheckpoint's default) or before an epoch's last update to continue exactly",
                QtemperateWarning,
                stacklevel=2,
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.state is None or self.state.epoch != trainer.current_epoch:
            # Resumed from a checkpoint written after an epoch's last update: Lightning goes on
            # with the next epoch without on_train_epoch_start (nor the last epoch's validation).
            self._start_epoch(trainer, pl_module, resumed=True)
        batches = trainer.num_training_batches
        self._batch_idx = batch_idx
        self._maybe_freeze(trainer, pl_module, batch_idx, batches)
        if not self.step_per_update or batch_idx == 0 or not math.isfinite(batches) or batches <= 0:
            return
        if self.scheduler.schedule(self.stage_index).fractional_epochs:
            self.state = self.scheduler.step(trainer.current_epoch + batch_idx / batches)
            self.loss_fn.follow(self.state)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        check_finite(loss.detach(), self._where(trainer, "update at"),
                     f"stopping the fit before its backward pass and optimizer step. {_CHANGE}")

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
        """What a resumed fit needs to go on as if never stopped (plain Python types).

        ``scheduler``: every stage's schedule state and the last
        :class:`~qtemperate.joint_scheduler.StageState`; ``stage_index`` and ``bits``: the
        student's stage and precision; ``val_loss``: the last validation loss (the next
        adaptive step reads it) and ``val_loss_epoch``, the epoch it was measured after;
        ``frozen_in``: the stage whose activation ranges are frozen (-1: none).
        """
        st = self.scheduler.stages[self.stage_index] if self.stage_index >= 0 else None
        return {
            "scheduler": self.scheduler.state_dict(),
            "stage_index": self.stage_index,
            "bits": None if st is None or not st.quantized else [st.weight_bits, st.act_bits],
            "val_loss": self._val_loss,
            "val_loss_epoch": self._val_epoch,
            "frozen_in": self._frozen_in,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint written before ``val_loss`` and
        ``frozen_in`` were saved loads with none and nothing frozen)."""
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.stage_index = int(state_dict["stage_index"])
        val = state_dict.get("val_loss")
        self._val_loss = None if val is None else float(val)
        val_epoch = state_dict.get("val_loss_epoch")
        self._val_epoch = None if val_epoch is None else int(val_epoch)
        self._frozen_in = int(state_dict.get("frozen_in", -1))
        # A fit resumed mid-epoch gets no on_train_epoch_start: train on with the saved state.
        self.state = self.scheduler.state
        if self.state is not None:
            self.loss_fn.follow(self.state)

    def prepare_resume(self, pl_module: pl.LightningModule, ckpt_path: str | Path, weights_only: bool = True) -> None:
        """Put the student in the precision a checkpoint was saved at, before ``fit(ckpt_path=...)``.

        Reads this callback's state from the Lightning checkpoint; when the student was
        quantized then, quantizes it now (same settings) at the saved bits, so
        Lightning can load the quantized weights into it. ``trainer.fit(...,
        ckpt_path=...)`` does this by itself (a hook on the module's ``load_state_dict``);
        call it by hand to load the weights yourself, or for a checkpoint that needs
        ``trainer.fit(..., weights_only=False)``.

        Args:
            pl_module: The module to resume (its student is quantized in place of the attribute).
            ckpt_path: The Lightning checkpoint.
            weights_only: Load it as ``torch.load(weights_only=...)`` (``True``: tensors and
                plain Python types only, as torch and Lightning load local files by default;
                this callback's state is such). Pass ``False`` only for a file you trust.

        Raises:
            ValueError: the checkpoint holds no state of this callback, or objects
                ``weights_only=True`` refuses.
        """
        try:  # mmap: the weights are not read into memory a second time
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only, mmap=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{ckpt_path}: holds objects torch.load(weights_only=True) refuses; if you trust the file, "
                f"call kd.prepare_resume(module, {str(ckpt_path)!r}, weights_only=False) before trainer.fit"
            ) from exc
        mine = ckpt.get("callbacks", {}).get(self.state_key)
        if mine is None:
            raise ValueError(f"{ckpt_path}: no {type(self).__name__} state in this checkpoint")
        if mine.get("bits") is not None and not is_quantized(self._student(pl_module)):
            w, a = mine["bits"]
            self._quantize(pl_module, BitStage("resume", 1, w, a), calibrate=False)
        self.stage_index = int(mine["stage_index"])

    def _before_weights_load(self, trainer: pl.Trainer, module: nn.Module, state_dict: Mapping[str, Any],
                             prefix: str, *_: Any) -> None:
        """``load_state_dict`` pre-hook of the LightningModule (runs before its children load).

        When Lightning restores a checkpoint (``trainer.ckpt_path``) whose student has
        keys the float student lacks, the checkpoint's student was quantized: quantize
        this one at the saved bits first (:meth:`prepare_resume`), so the weights fit.
        """
        net = getattr(module, self.student_attr, None)
        if trainer.ckpt_path is None or not isinstance(net, nn.Module) or is_quantized(net):
            return
        head = f"{prefix}{self.student_attr}."
        own = net.state_dict().keys()
        if all(k[len(head):] in own for k in state_dict if k.startswith(head)):
            return  # saved while the student was float
        self.prepare_resume(module, trainer.ckpt_path)  # type: ignore[arg-type]

    def _latest_val_loss(self, trainer: pl.Trainer) -> float | None:
        """The logged validation loss (kept: a resumed fit has no metrics before validating)."""
        val = trainer.callback_metrics.get(self.val_loss_key)
        if val is not None:
            where = self._where(trainer, f"{self.val_loss_key!r} of the validation after")
            check_finite(val, where, f"stopping the fit. {_CHANGE}")
            self._val_loss = float(val)
        return self._val_loss

    def _where(self, trainer: pl.Trainer, what: str) -> str:
        """``"<what> step 13 (epoch 3, batch 1) of stage 'w4a4' (W4A4), T=3.52"``."""
        st = self.state
        if st is None:
            stage = "before the first stage"
        else:
            bits = f"W{st.weight_bits}A{st.act_bits}" if st.quantized else "float"
            stage = f"of stage {st.stage_name!r} ({bits}), T={st.temperature:.4g}"
        return f"{what} step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}) {stage}"

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
