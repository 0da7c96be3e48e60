"""The compression pipeline: teacher → student → QAT in bit-width stages with Temperate KD.

:meth:`Trainer.run` reads top to bottom as the pipeline; each step is a part of
:mod:`qtemperate.training` (or :mod:`qtemperate.export`) with its own tests:

1. data and loaders (:mod:`qtemperate.data`; no downloads);
2. the teacher, loaded or trained here, its logits cached when the data is fixed
   (:mod:`~qtemperate.training.teacher`);
3. the student, pruned to the size target with BatchNorm statistics re-estimated
   (:mod:`~qtemperate.training.student`, shared with ``qtemperate plan``);
4. the stages: at each stage boundary the student is quantized or switched down in
   place (:mod:`~qtemperate.training.stages`); every epoch the
   :class:`~qtemperate.joint_scheduler.JointScheduler` sets the temperature(s) and
   weights of :class:`~qtemperate.losses.TemperateLoss`, one epoch of distillation
   runs (:mod:`~qtemperate.training.loop`), the student is evaluated and an atomic
   checkpoint holds everything exact resumption needs
   (:mod:`~qtemperate.training.checkpointing`);
5. at the end: ``student.pt``, the ONNX files verified and timed
   (:func:`~qtemperate.export.check.export_and_check`, shared with
   ``qtemperate export``), and ``summary.json``.

Metrics go through :mod:`qtemperate.tracking`; this module never imports wandb.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.checkpoint import load_checkpoint, save_atomic, save_student
from qtemperate.data import DataBundle, RunLoaders, build_datasets, build_run_loaders
from qtemperate.export.targets import resolve_target
from qtemperate.joint_scheduler import JointScheduler, StageState
from qtemperate.losses import TemperateLoss
from qtemperate.quantization.targets import state_dict_target
from qtemperate.recipe import Recipe
from qtemperate.size import SizeReport, model_size
from qtemperate.tracking import MetricLogger, build_loggers
from qtemperate.training.checkpointing import (
    CHECKPOINT,
    Progress,
    TrainingCheckpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from qtemperate.training.console import Console
from qtemperate.training.device import resolve_device
from qtemperate.training.evaluate import evaluate
from qtemperate.training.guards import TrainingDiverged, TrainingInterrupted
from qtemperate.training.loop import Distiller, LrPlan
from qtemperate.training.optimizer import build_optimizer
from qtemperate.training.seed import seed_all
from qtemperate.training.stages import enter_stage
from qtemperate.training.student import STUDENT_ARCH_FILE, derive_student
from qtemperate.training.teacher import (
    TeacherLogits,
    cache_teacher_logits,
    prepare_teacher,
    should_cache_logits,
)

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "evaluate", "resolve_device"]

SUMMARY = "summary.json"
CALIBRATION_BATCHES = 20
"""Batches of training data used for BatchNorm re-estimation after pruning."""


class Trainer:
    """Run a recipe end to end (see the module docstring).

    Args:
        recipe: A validated recipe.
        run_dir: Output folder (``runs/<name>`` by default).
        resume: Continue from ``run_dir/checkpoint.pt``.
        loggers: Override the recipe's loggers (tests pass local ones).
        progress: Show progress bars and one line per epoch.
        stop_after_epochs: Raise :class:`TrainingInterrupted` after that many global
            epochs have been checkpointed (simulates a killed run).
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        resume: bool = False,
        loggers: MetricLogger | None = None,
        progress: bool = True,
        stop_after_epochs: int | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else recipe.output_dir / recipe.name
        self.resume = resume
        self.console = Console(progress)
        self.stop_after_epochs = stop_after_epochs
        self.device = resolve_device(recipe.device)
        self._logger = loggers
        self.teacher_logits_cached = False
        self.step_offset = 0  # student steps are logged after the teacher's: one increasing step

    # -- the run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the recipe; return the summary (also in ``summary.json``)."""
        r = self.recipe
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.run_dir / CHECKPOINT
        ckpt = load_training_checkpoint(ckpt_path) if self.resume and ckpt_path.is_file() else None
        if self.resume and ckpt is None and (self.run_dir / SUMMARY).is_file():
            return json.loads((self.run_dir / SUMMARY).read_text())
        (self.run_dir / "recipe.yaml").write_text(
            f"# Resolved recipe. Re-run: qtemperate run {self.run_dir / 'recipe.yaml'}\n" + r.to_yaml()
        )
        logger = self._logger or build_loggers(
            list(r.tracking.loggers), self.run_dir, project=r.tracking.project, group=r.group,
            name=self.run_dir.name, mode=r.tracking.mode, tags=list(r.tracking.tags),
            config=r.model_dump(mode="json"), resume=self.resume,
        )
        try:
            return self._pipeline(ckpt, logger, t_start)
        finally:
            logger.finish()

    def _pipeline(self, ckpt: TrainingCheckpoint | None, logger: MetricLogger, t_start: float) -> dict[str, Any]:
        r, device, say = self.recipe, self.device, self.console.say
        seed_all(r.seed)
        target = resolve_target(r.export.target, "export.target")  # sets the QAT ranges: before training
        if ckpt is not None:  # resumed (maybe on another CPU class): keep the target it was trained for
            target = state_dict_target(ckpt.model, target)
        say(f"deployment target: {target} (export.target: {r.export.target})")
        d = r.data
        bundle = build_datasets(
            d.name, root=d.root, val_fraction=d.val_fraction, limit_train=d.limit_train,
            limit_test=d.limit_test, seed=r.seed, augment=d.augment, **d.kwargs,
        )
        loaders = build_run_loaders(bundle, d.batch_size, d.eval_batch_size, d.num_workers, r.seed)
        example = loaders.example_input.to(device)
        logger.log_config(r.model_dump(mode="json"))

        # 1. The teacher.
        teacher, self.step_offset = prepare_teacher(
            r, bundle, loaders, self.run_dir, self.resume, device, logger, self.console)
        teacher_acc, _ = evaluate(teacher, loaders.test, device)
        t_size = model_size(teacher, example)

        # 2. The student architecture (restored on resume: pruning is not repeated).
        arch, plan = self._student_arch(ckpt, teacher, bundle, loaders, example, t_size)

        # 3. Teacher logits: cached once when the data is fixed.
        cache, why = should_cache_logits(r.distillation.cache_teacher_logits, bundle.augmented)
        self.teacher_logits_cached = cache
        say(f"teacher logits cached: {'yes' if cache else 'no'} ({why})")
        logger.log({"teacher_logits_cached": int(cache)}, self.step_offset)
        teacher_out = TeacherLogits(teacher, cache_teacher_logits(teacher, loaders, device) if cache else None)

        # 4. The stages, epoch by epoch.
        sched = JointScheduler.from_recipe(r)
        loss_fn = TemperateLoss(kd_weight=r.distillation.kd_weight,
                                temperatures=tuple(r.distillation.temperatures), weights=r.distillation.weights)
        prog = Progress()
        student: nn.Module = copy.deepcopy(arch).to(device)
        quantized_now = False
        opt: torch.optim.Optimizer | None = None
        stage_idx = -1
        if ckpt is not None:  # the student as it was after the checkpoint's epoch
            prog, stage_idx = ckpt.progress, ckpt.stage_index
            sched.load_state_dict(ckpt.scheduler)
            stage = sched.stages[stage_idx]
            student = enter_stage(student, stage, False, r.student, device, calibration=None, target=target)
            quantized_now = stage.quantized
            student.load_state_dict(ckpt.model)
            opt = build_optimizer(student, r.optimizer, stage.lr or r.optimizer.lr)
            opt.load_state_dict(ckpt.optimizer)
            ckpt.restore_rng()

        bounds = sched.stage_bounds()
        steps_per_epoch = len(loaders.train)
        clip = r.optimizer.grad_clip if r.optimizer.grad_clip is not None else float("inf")
        for epoch in range(prog.epoch + 1, sched.total_epochs):
            idx = sched.stage_index(epoch)
            stage = sched.stages[idx]
            if idx != stage_idx:
                student = enter_stage(student, stage, quantized_now, r.student, device, loaders.calib, target)
                quantized_now = quantized_now or stage.quantized
                stage_idx = idx
                opt = build_optimizer(student, r.optimizer, stage.lr or r.optimizer.lr)
                acc0, prog.val_loss = evaluate(student, loaders.val_or_test, device)  # T reacts to the model as it now is
                logger.log({"stage/index": idx, "stage/start_acc": acc0, "stage/start_val_loss": prog.val_loss,
                            "stage/weight_bits": stage.weight_bits, "stage/act_bits": stage.act_bits},
                           self.step_offset + prog.global_step)
            assert opt is not None
            st = sched.step(epoch, prog.val_loss)
            loss_fn.set_temperatures(st.temperatures, st.weights)
            first, last = bounds[stage_idx]
            loaders.set_epoch(epoch)
            distiller = Distiller(student, teacher_out, loss_fn, sched, opt, device, clip, r.tracking.log_every)
            means = distiller.train_epoch(
                loaders.train, epoch, prog,
                LrPlan(first * steps_per_epoch, (last - first) * steps_per_epoch,
                       stage.lr or r.optimizer.lr, r.optimizer.schedule),
                lambda metrics, step: logger.log(metrics, self.step_offset + step), self.console,
            )
            st = sched.state or st
            acc, test_loss = evaluate(student, loaders.test, device)
            val_loss = test_loss if loaders.val is None else evaluate(student, loaders.val, device)[1]
            prog.val_loss, prog.epoch = val_loss, epoch
            self._record_epoch(prog, st, means, acc, test_loss, val_loss, logger)
            if epoch == last - 1:
                prog.stages.append(self._stage_record(st, stage.epochs, acc, student))
            prog.elapsed_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            save_training_checkpoint(self.run_dir / CHECKPOINT, prog, sched, stage_idx, student, opt)
            if self.stop_after_epochs is not None and self.stop_after_epochs <= epoch + 1 < sched.total_epochs:
                raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epochs)")

        # 5. The result: student file, ONNX checks, summary.
        student.eval()
        student_acc, _ = evaluate(student, loaders.test, device)
        final = sched.stages[-1]
        save_student(self.run_dir / "student.pt", arch, student, final.weight_bits, final.act_bits,
                     r.student.first_last_bits, r.student.per_channel,
                     extra={"recipe": r.name, "student_acc": student_acc})
        s_size = model_size(student, example)
        export = self._export(student, teacher, bundle, arch)
        prog.elapsed_s += time.perf_counter() - t_start
        summary = self._summary(teacher_acc, student_acc, t_size, s_size, plan, prog, export)
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
        logger.log_summary(summary)
        cols = ["name", "weight_bits", "act_bits", "epochs", "final_T", "accuracy", "bytes"]
        logger.log_table("stages", cols, [[s[c] for c in cols] for s in prog.stages])
        logger.log_artifact(self.run_dir / "student.pt", name=f"{r.name}-student", type="model")
        return summary

    # -- named steps ------------------------------------------------------------------
    def _student_arch(
        self, ckpt: TrainingCheckpoint | None, teacher: nn.Module, bundle: DataBundle,
        loaders: RunLoaders, example: torch.Tensor, t_size: SizeReport,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The pruned float student: restored on resume, else derived and saved."""
        path = self.run_dir / STUDENT_ARCH_FILE
        if ckpt is not None and path.is_file():
            saved = load_checkpoint(path, self.device)
            return saved["arch"], saved["plan"]
        calibration = []
        for i, batch in enumerate(loaders.calib):
            if i >= CALIBRATION_BATCHES:
                break
            calibration.append(batch)
        arch, report = derive_student(
            self.recipe, teacher, bundle.num_classes, bundle.in_channels, example, self.device,
            calibration=calibration, teacher_size=t_size,
        )
        plan = {"prune_ratio": None} if report is None else report.to_dict()
        save_atomic({"arch": arch, "plan": plan}, path)
        return arch, plan

    def _record_epoch(
        self, prog: Progress, st: StageState, means: dict[str, float], acc: float,
        test_loss: float, val_loss: float, logger: MetricLogger,
    ) -> None:
        """Append the epoch to the history, print one line and log it."""
        epoch = st.epoch
        prog.history.append({
            "epoch": epoch, "stage": st.stage_name, "weight_bits": st.weight_bits, "act_bits": st.act_bits,
            "T": st.temperature, "temperatures": list(st.temperatures), "weights": list(st.weights),
            "phase": st.phase, "test_acc": acc, "test_loss": test_loss, "val_loss": val_loss,
            **{f"train_{k}": v for k, v in means.items()},
        })
        total = self.recipe.total_epochs
        self.console.say(
            f"epoch {epoch + 1}/{total} [{st.stage_name} W{st.weight_bits}A{st.act_bits}, "
            f"T={st.temperature:.2f} ({st.phase})]: train loss {means.get('loss', float('nan')):.4f}, "
            f"test acc {acc:.4f}"
        )
        logger.log({"test/acc": acc, "test/loss": test_loss, "val/loss": val_loss, "epoch": epoch,
                    "T": st.temperature, "weight_bits": st.weight_bits, "act_bits": st.act_bits},
                   self.step_offset + prog.global_step)

    @staticmethod
    def _stage_record(st: StageState, epochs: int, acc: float, student: nn.Module) -> dict[str, Any]:
        """``summary.json``'s record of a finished stage."""
        size = model_size(student)
        return {
            "name": st.stage_name, "weight_bits": st.weight_bits, "act_bits": st.act_bits, "epochs": epochs,
            "final_T": st.temperature, "final_temperatures": list(st.temperatures), "accuracy": acc,
            "bytes": float(size.quantized_bytes if st.quantized else size.float_bytes),
        }

    def _export(self, student: nn.Module, teacher: nn.Module, bundle: DataBundle, arch: nn.Module) -> dict[str, Any]:
        """``student.onnx`` (its int8 twin, QONNX file, ``teacher.onnx``) verified and timed."""
        e = self.recipe.export
        from qtemperate.export.check import export_and_check, target_facts

        if not e.onnx:
            return {"onnx_latency_ms": None, "int8_onnx_latency_ms": None,
                    "export_target_requested": e.target, **target_facts(student)}
        n = min(e.verify_samples, len(bundle.test))
        inputs = torch.stack([bundle.test[i][0] for i in range(n)])
        return {"export_target_requested": e.target, **export_and_check(
            student, self.run_dir, inputs, teacher=teacher, benchmark=e.benchmark, batch_sizes=e.batch_sizes,
            iters=e.benchmark_iters, float_student=arch, openvino=e.openvino, qonnx=e.qonnx)}

    def _summary(
        self, teacher_acc: float, student_acc: float, t_size: SizeReport, s_size: SizeReport,
        plan: dict[str, Any], prog: Progress, export: dict[str, Any],
    ) -> dict[str, Any]:
        r = self.recipe
        student_bytes = float(s_size.quantized_bytes)
        return {
            "recipe": r.name,
            "group": r.group,
            "teacher_acc": teacher_acc,
            "student_acc": student_acc,
            "acc_drop": teacher_acc - student_acc,
            "teacher_float_bytes": float(t_size.float_bytes),
            "student_bytes": student_bytes,
            "compression_ratio": student_bytes / float(t_size.float_bytes),
            "params": int(s_size.params),
            "macs": s_size.macs,
            "teacher_params": int(t_size.params),
            "teacher_macs": t_size.macs,
            "prune_ratio": plan.get("prune_ratio"),
            "stages": prog.stages,
            "teacher_logits_cached": self.teacher_logits_cached,
            **export,
            "wall_time_s": prog.elapsed_s,
        }
