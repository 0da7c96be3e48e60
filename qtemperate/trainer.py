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

The run folder is owned for the whole run (:mod:`qtemperate.run_dir`: an OS lock; a
resumed recipe must match the record), every file is written atomically, and a
resumed run reads everything it continues from (:mod:`~qtemperate.training.resume`)
before it writes anything.

Under torchrun every process runs this pipeline; :mod:`~qtemperate.training.distributed`
decides who writes (rank 0) and what is shared (broadcasts, DDP), and is the identity
in a single process.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate._faults import fault_point
from qtemperate.arch_spec import describe_architecture
from qtemperate.atomic import write_json_atomic
from qtemperate.checkpoint import save_atomic, save_student
from qtemperate.data import DataBundle, RunLoaders, build_datasets, build_run_loaders
from qtemperate.errors import CheckpointError, DataFormatError, QtemperateWarning
from qtemperate.export.targets import resolve_target
from qtemperate.heads import Task
from qtemperate.joint_scheduler import JointScheduler, StageState
from qtemperate.losses import TemperateLoss
from qtemperate.preflight import ProtocolWarning, check_bundle, check_validation_split
from qtemperate.quantization.report import quantization_summary
from qtemperate.quantization.targets import state_dict_target
from qtemperate.recipe import Recipe, RecipeError
from qtemperate.run_dir import check_resume_compatible, claim_run_dir, metrics_size
from qtemperate.schedule_switches import ModelFacts, resolve_switches, write_temperature_table
from qtemperate.size import SizeReport, model_size
from qtemperate.tracking import MetricLogger, MultiLogger, build_loggers
from qtemperate.tracking.tradeoff import log_run_results, run_facts, run_tags
from qtemperate.training import distributed
from qtemperate.training.checkpointing import (
    CHECKPOINT,
    Progress,
    save_training_checkpoint,
)
from qtemperate.training.console import Console
from qtemperate.training.device import resolve_device
from qtemperate.training.evaluate import evaluate
from qtemperate.training.guards import TrainingDiverged, TrainingInterrupted
from qtemperate.training.loop import Distiller, LrPlan, freeze_step
from qtemperate.training.optimizer import build_optimizer
from qtemperate.training.precision import policy_for
from qtemperate.training.resume import STUDENT_ARCH_FORMAT, SUMMARY, ResumeState, load_resume_state
from qtemperate.training.seed import phase_seed, seed_all
from qtemperate.training.stages import enter_stage
from qtemperate.training.student import (
    STUDENT_ARCH_FILE,
    check_student_target,
    derive_student,
    student_source,
)
from qtemperate.training.teacher import (
    TeacherLogits,
    cache_teacher_logits,
    prepare_teacher,
    should_cache_logits,
)

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "evaluate", "resolve_device"]

CALIBRATION_BATCHES = 20
"""Batches of training data used for BatchNorm re-estimation after pruning."""


@dataclass
class _RunData:
    bundle: DataBundle
    loaders: RunLoaders
    example: torch.Tensor


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
        tracking_mode: Override ``tracking.mode`` (the CLI's ``--offline``).
        allow_changes: Recipe fields that may differ from the record on resume
            (:data:`qtemperate.run_dir.SAFE_ON_RESUME`).
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        resume: bool = False,
        loggers: MetricLogger | None = None,
        progress: bool = True,
        stop_after_epochs: int | None = None,
        tracking_mode: str | None = None,
        allow_changes: Sequence[str] = (),
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else recipe.output_dir / recipe.name
        self.resume = resume
        self.console = Console(progress and distributed.is_main())
        self.stop_after_epochs = stop_after_epochs
        self.device = resolve_device(recipe.device)
        self._logger = loggers
        self.tracking_mode = tracking_mode
        self.allow_changes = tuple(allow_changes)
        self.teacher_logits_cached = False
        self.step_offset = 0  # student steps are logged after the teacher's: one increasing step

    # -- the run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the recipe; return the summary (also in ``summary.json``).

        Everything a failure could be found in (the record, the resume files, the data,
        the size target) is checked before the first write; a fresh folder this call
        created is removed again when that fails.

        Under torchrun this joins the process group first (and leaves it at the end);
        rank 0 alone owns, reads and writes the run folder and broadcasts what it read;
        a failure on any rank stops every rank with the same line
        (:func:`~qtemperate.training.distributed.on_failure`).
        """
        d = self.recipe.distributed
        distributed.check_recipe(self.recipe, distributed.world_size(), self.device)
        owned = distributed.init_process_group(d.backend, self.device, d.timeout_s)
        try:
            return self._run()
        except BaseException as exc:
            distributed.on_failure(exc)  # raises PeerFailed when another rank failed first
            raise
        finally:
            if owned:
                distributed.shutdown()

    def _run(self) -> dict[str, Any]:
        r = self.recipe
        t_start = time.perf_counter()
        main = distributed.is_main()  # rank 0 alone reads and writes the run folder
        with claim_run_dir(self.run_dir, resume=self.resume) if main else contextlib.nullcontext() as folder:
            state = ResumeState()
            if self.resume:
                if main:
                    for key, old, new in check_resume_compatible(self.run_dir, r, self.allow_changes):
                        self.console.say(f"resume: {key} changed ({old} -> {new}), allowed")
                state = distributed.from_main(lambda: load_resume_state(self.run_dir, "cpu"))
                if state.summary is not None:
                    self.console.say(f"{self.run_dir}: the run already finished")
                    return state.summary
                self.console.say(f"resuming {self.run_dir} {state.start}")
            data = self._data()
            if state.teacher is None and state.student_arch is None and r.teacher.checkpoint is None and main:
                # The teacher will train: check now that the student it leads to can exist.
                check_student_target(r, data.bundle.num_classes, data.bundle.in_channels, data.example)
            if main:
                folder.begin(r, state.metrics_bytes if self.resume else None)
            distributed.barrier()
            mode = self.tracking_mode or r.tracking.mode
            logger = MultiLogger([]) if not main else self._logger or build_loggers(
                list(r.tracking.loggers), self.run_dir, project=r.tracking.project, group=r.group,
                name=self.run_dir.name, mode=mode, tags=run_tags(r),
                config=r.model_dump(mode="json"), resume=self.resume, job_type="train",
            )
            try:
                return self._pipeline(state, data, logger, t_start)
            finally:
                logger.finish()

    def _data(self) -> _RunData:
        """Datasets and loaders (this rank's shard under torchrun); bad data (a malformed
        file, labels outside the classes) is bad input, found here before anything is written."""
        r, d = self.recipe, self.recipe.data
        seed_all(r.seed)
        try:
            bundle = build_datasets(
                d.name, root=d.root, val_fraction=d.val_fraction, limit_train=d.limit_train,
                limit_test=d.limit_test, seed=r.seed, augment=d.augment, **d.kwargs,
            )
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, DataFormatError):
                raise
            raise DataFormatError(f"data: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
        notes = check_bundle(r, bundle)
        protocol = check_validation_split(r, len(bundle.val or ()), len(bundle.train))  # type: ignore[arg-type]
        if distributed.is_main():  # every rank holds the same data: one warning, not N
            for message in notes:
                warnings.warn(message, QtemperateWarning, stacklevel=2)
            for line in protocol:
                warnings.warn(line, ProtocolWarning, stacklevel=2)
        try:
            loaders = build_run_loaders(bundle, d.batch_size, d.eval_batch_size, d.num_workers, r.seed,
                                        distributed.rank(), distributed.world_size(),
                                        pin_memory=self.device.type == "cuda")
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        return _RunData(bundle, loaders, loaders.example_input.to(self.device))

    def _pipeline(self, state: ResumeState, data: _RunData, logger: MetricLogger, t_start: float) -> dict[str, Any]:
        r, device, say = self.recipe, self.device, self.console.say
        main = distributed.is_main()  # rank 0 alone writes files
        bundle, loaders, example = data.bundle, data.loaders, data.example
        ckpt = state.checkpoint
        # The deployment target sets the QAT ranges: resolved before training, by rank 0
        # (every rank trains for its CPU class); a resumed run keeps the one it trained for.
        target = distributed.from_main(lambda: resolve_target(r.export.target, "export.target"))
        if ckpt is not None:
            target = state_dict_target(ckpt.model, target)
        say(f"deployment target: {target} (export.target: {r.export.target})")
        task = Task.from_recipe(r)  # which output is scored, each head's task loss
        logger.log_config(r.model_dump(mode="json"))
        world = distributed.world_size()
        if world > 1:
            say(f"data parallel: {world} processes ({torch.distributed.get_backend()}), global batch "
                f"{r.data.batch_size} = {world} x {r.data.batch_size // world}")
            logger.log({"data/processes": world, "data/global_batch": r.data.batch_size}, 0)

        # 1. The teacher.
        teacher, self.step_offset = prepare_teacher(
            r, bundle, loaders, self.run_dir, self.resume, device, logger, self.console,
            saved=state.teacher, training=state.teacher_training)
        teacher_acc, _ = evaluate(teacher, loaders.test, device, task)
        t_size = model_size(teacher, example)

        # 2. The student architecture (restored on resume: pruning is not repeated).
        # Each phase starts from its own seed, so a run resumed at a phase boundary
        # draws what an uninterrupted run draws there.
        seed_all(phase_seed(r.seed, "student"))
        arch, plan = self._student_arch(state, teacher, bundle, loaders, example, t_size)
        # The switches that need it (base_temperature: auto, hardware), resolved into plain stages.
        switches = resolve_switches(r, ModelFacts(bundle.num_classes, int(t_size.params),
                                                  int(model_size(arch).params), tuple(bundle.class_counts)),
                                    say if main else lambda _msg: None)
        if main:
            write_temperature_table(switches, self.run_dir)
        logger.log_config({"resolved_switches": switches.config()})
        if ckpt is None:
            seed_all(phase_seed(r.seed, "stages"))

        # 3. Teacher logits: cached once when the data is fixed.
        cache, why = should_cache_logits(r.distillation.cache_teacher_logits, bundle.augmented)
        self.teacher_logits_cached = cache
        say(f"teacher logits cached: {'yes' if cache else 'no'} ({why})")
        if ckpt is None:  # logged before the first checkpoint: a resumed run has it already
            logger.log({"teacher/logits_cached": int(cache)}, self.step_offset)  # summary: teacher_logits_cached
        t_policy = policy_for(r.precision.teacher, device)
        say(f"precision: teacher {t_policy.name}, float stage {policy_for(r.precision.float_stage, device).name}, "
            f"QAT {policy_for(r.precision.qat, device, quantized=True).name} (evaluation fp32)")
        teacher_out = TeacherLogits(
            teacher, cache_teacher_logits(teacher, loaders, device, t_policy) if cache else None, t_policy)

        # 4. The stages, epoch by epoch.
        sched = JointScheduler.from_recipe(switches.recipe)
        loss_fn = TemperateLoss.from_recipe(switches.recipe)
        prog = Progress()
        student: nn.Module = copy.deepcopy(arch).to(device)
        quantized_now = False
        opt: torch.optim.Optimizer | None = None
        trained: nn.Module | None = None  # the student as this process trains it (DDP under torchrun)
        stage_idx = -1
        if ckpt is not None:  # the student as it was after the checkpoint's epoch
            prog, stage_idx = ckpt.progress, ckpt.stage_index
            sched.load_state_dict(ckpt.scheduler)
            stage = sched.stages[stage_idx]
            student = enter_stage(student, stage, False, r.student, device, calibration=None, target=target)
            quantized_now = stage.quantized
            try:
                student.load_state_dict(ckpt.model)
                opt = build_optimizer(student, r.optimizer, stage.lr or r.optimizer.lr)
                opt.load_state_dict(ckpt.optimizer)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{self.run_dir / CHECKPOINT}: does not fit the run's student "
                                      f"({type(exc).__name__})") from None
            ckpt.restore_rng()

        bounds = sched.stage_bounds()
        steps_per_epoch = len(loaders.train)
        clip = r.optimizer.grad_clip if r.optimizer.grad_clip is not None else float("inf")
        for epoch in range(prog.epoch + 1, sched.total_epochs):
            idx = sched.stage_index(epoch)
            stage = sched.stages[idx]
            if idx != stage_idx:
                student = enter_stage(distributed.unwrap(student), stage, quantized_now, r.student, device,
                                      loaders.calib, report_dir=self.run_dir if main else None,
                                      say=say if main else None, target=target)
                fault_point("stage_switch")
                agreed = distributed.sync_module_(student)
                quantized_now = quantized_now or stage.quantized
                stage_idx = idx
                trained = None
                opt = build_optimizer(student, r.optimizer, stage.lr or r.optimizer.lr)
                acc0, prog.val_loss = evaluate(student, loaders.val_or_test, device, task)  # T reacts to the model as it now is
                logger.log({"stage/index": idx, "stage/start_acc": acc0, "stage/start_val_loss": prog.val_loss,
                            "stage/weight_bits": stage.weight_bits, "stage/act_bits": stage.act_bits,
                            "stage/ranks_agreed": int(agreed)},
                           self.step_offset + prog.global_step)
            s_policy = policy_for(r.precision.qat if stage.quantized else r.precision.float_stage, device,
                                  quantized=stage.quantized)
            if trained is None:
                trained = distributed.wrap(s_policy.prepare(student), device, r.distributed.sync_batchnorm)
            assert opt is not None
            st = sched.step(epoch, prog.val_loss)
            loss_fn.follow(st)
            first, last = bounds[stage_idx]
            loaders.set_epoch(epoch)
            lr_plan = LrPlan(first * steps_per_epoch, (last - first) * steps_per_epoch,
                             stage.lr or r.optimizer.lr, r.optimizer.schedule)
            freeze_at = freeze_step(switches.recipe.stages[stage_idx].freeze_act_ranges_at, lr_plan)
            distiller = Distiller(trained, teacher_out, loss_fn, sched, opt, device, clip, r.tracking.log_every,
                                  s_policy, freeze_at)
            means = distiller.train_epoch(
                loaders.train, epoch, prog, lr_plan,
                lambda metrics, step: logger.log(metrics, self.step_offset + step), self.console,
            )
            trained = distiller.student  # rebuilt when a freeze changed what DDP must reduce
            st = sched.state or st
            acc, test_loss = evaluate(student, loaders.test, device, task)
            val_loss = test_loss if loaders.val is None else evaluate(student, loaders.val, device, task)[1]
            prog.val_loss, prog.epoch = val_loss, epoch
            self._record_epoch(prog, st, means, acc, test_loss, val_loss, logger)
            if epoch == last - 1:
                prog.stages.append(self._stage_record(st, stage.epochs, acc, student))
                if freeze_at is not None and freeze_at < last * steps_per_epoch:  # reached in the stage
                    prog.stages[-1]["act_ranges_frozen_from_step"] = freeze_at
            prog.elapsed_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            prog.metrics_bytes = metrics_size(self.run_dir) if main else None
            if main:
                save_training_checkpoint(self.run_dir / CHECKPOINT, prog, sched, stage_idx, student, opt)
            if self.stop_after_epochs is not None and self.stop_after_epochs <= epoch + 1 < sched.total_epochs:
                raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epochs)")

        # 5. The result: student file, ONNX checks, summary (rank 0 writes; the others wait).
        student = distributed.unwrap(student).eval()
        student_acc, _ = evaluate(student, loaders.test, device, task)
        final = sched.stages[-1]
        if main:
            arch_model, arch_kwargs, arch_path = student_source(r, bundle.num_classes, bundle.in_channels)
            save_student(self.run_dir / "student.pt", arch, student, final.weight_bits, final.act_bits,
                         r.student.first_last_bits, r.student.per_channel,
                         extra={"recipe": r.name, "student_acc": student_acc},
                         arch_model=arch_model, arch_kwargs=arch_kwargs, arch_search_path=arch_path)
        s_size = model_size(student, example)
        export = self._export(student, teacher, bundle, arch) if main else {}
        prog.elapsed_s += time.perf_counter() - t_start
        summary = {**self._summary(teacher_acc, student_acc, t_size, s_size, plan, prog, export),
                   **run_facts(r, bundle, teacher), **switches.summary(),
                   **quantization_summary(distributed.unwrap(student))}  # float leftovers, real act bits
        if main:
            write_json_atomic(self.run_dir / SUMMARY, summary)
            # Flat W&B summary, stages and tradeoff tables, student.pt and *.onnx artifacts, schedule figure.
            log_run_results(logger, self.run_dir, r, summary, prog.history, switches.recipe)
        summary = distributed.broadcast_object(summary)
        return summary

    # -- named steps ------------------------------------------------------------------
    def _student_arch(
        self, state: ResumeState, teacher: nn.Module, bundle: DataBundle,
        loaders: RunLoaders, example: torch.Tensor, t_size: SizeReport,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The pruned float student: restored on resume, else derived and saved as data."""
        def on_main() -> tuple[nn.Module, dict[str, Any]]:
            arch, plan = self._derive_arch(state, teacher, bundle, loaders, example, t_size)
            return arch.cpu(), plan  # pickled to the other ranks: tensors travel on the CPU

        return distributed.from_main(on_main)  # rank 0 prunes (or reads the saved one) and broadcasts

    def _derive_arch(
        self, state: ResumeState, teacher: nn.Module, bundle: DataBundle,
        loaders: RunLoaders, example: torch.Tensor, t_size: SizeReport,
    ) -> tuple[nn.Module, dict[str, Any]]:
        path = self.run_dir / STUDENT_ARCH_FILE
        if state.student_arch is not None:
            return state.student_arch
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
        name, kwargs, search = student_source(self.recipe, bundle.num_classes, bundle.in_channels)
        spec = describe_architecture(arch, name, kwargs, search_path=search)
        save_atomic({"format": STUDENT_ARCH_FORMAT, "arch": spec.to_dict(), "state_dict": arch.state_dict(),
                     "plan": plan}, path)
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
        task = Task.from_recipe(self.recipe)  # top-1 agreement on the scored head of a multi-output model
        return {"export_target_requested": e.target, **export_and_check(
            student, self.run_dir, inputs, teacher=teacher, benchmark=e.benchmark, batch_sizes=e.batch_sizes,
            iters=e.benchmark_iters, float_student=arch, openvino=e.openvino, qonnx=e.qonnx,
            classification_outputs=[task.accuracy_head] if task.accuracy_head else None)}

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
