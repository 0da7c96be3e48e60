"""The compression pipeline: teacher → prune → QAT in bit-width stages with Temperate KD.

:class:`Trainer` runs one :class:`~qtemperate.recipe.Recipe` top to bottom:

1. data (no downloads) and the teacher (loaded from a checkpoint, or trained here);
2. the student: pruned from the teacher to the size target (or its own
   architecture), with BatchNorm statistics re-estimated on a few batches;
3. the stages: at each stage boundary the student is quantized (float → W8A8) or
   switched down in place (W8A8 → W4A4); every epoch the
   :class:`~qtemperate.joint_scheduler.JointScheduler` sets the temperature(s) and
   loss weights of :class:`~qtemperate.losses.TemperateLoss`;
4. after every epoch: evaluation, metrics, and an atomic checkpoint holding all
   that exact resumption needs (model, optimizer, scheduler, RNG states, stage);
5. at the end: ``student.pt``, ``student.onnx`` (verified and timed in
   onnxruntime) and ``summary.json``.

Metrics go through :mod:`qtemperate.tracking`; this module never imports wandb.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qtemperate.checkpoint import load_checkpoint, save_atomic, save_student
from qtemperate.data import DataBundle, EpochSeededSampler, build_datasets
from qtemperate.joint_scheduler import (
    BitDropCoupling,
    BitStage,
    JointScheduler,
    NoCoupling,
    StageState,
)
from qtemperate.losses import TemperateLoss
from qtemperate.models import build_model
from qtemperate.planner import plan_student
from qtemperate.quantization import quantize, set_bit_width
from qtemperate.recipe import Recipe
from qtemperate.size import SizeReport, model_size
from qtemperate.tracking import MetricLogger, WandbLogger, build_loggers

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "evaluate", "resolve_device"]

CHECKPOINT = "checkpoint.pt"
TEACHER = "teacher.pt"
STUDENT_ARCH = "student_arch.pt"
WANDB_ID = "wandb_run_id.txt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after_epochs`` (tests simulate a killed run with it)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but CUDA is not available")
    return torch.device(name)


class _Indexed(Dataset):
    """Wraps a dataset so each item also carries its index (for cached teacher logits)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.base[i]
        return x, y, i


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1), loss_sum / max(total, 1)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _lr_at(step: int, total: int, peak: float, kind: str) -> float:
    """Cosine decay ``peak · (1 + cos(π · step / total)) / 2`` (or constant)."""
    if kind == "constant" or total <= 1:
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@dataclass
class _Progress:
    """Everything besides tensors that a checkpoint carries."""

    epoch: int = -1  # last completed global epoch
    global_step: int = 0
    val_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


class Trainer:
    """Run a recipe end to end (see the module docstring).

    Args:
        recipe: A validated recipe.
        run_dir: Output folder (``runs/<name>`` by default).
        resume: Continue from ``run_dir/checkpoint.pt``.
        loggers: Override the recipe's loggers (tests pass local ones).
        progress: Show tqdm bars.
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
        self.progress = progress
        self.stop_after_epochs = stop_after_epochs
        self.device = resolve_device(recipe.device)
        self._logger = loggers
        self.teacher_logits_cached = False
        # Student steps are logged after the teacher's so W&B sees one increasing step.
        self.step_offset = 0

    # -- setup ----------------------------------------------------------------------
    def _make_logger(self) -> MetricLogger:
        if self._logger is not None:
            return self._logger
        tr = self.recipe.tracking
        # A resumed run continues the same W&B run (same id) instead of starting a new one.
        id_file = self.run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if self.resume and id_file.is_file() else None
        logger = build_loggers(
            list(tr.loggers),
            self.run_dir,
            project=tr.project,
            group=self.recipe.group,
            name=self.run_dir.name,
            mode=tr.mode,
            tags=list(tr.tags),
            config=self.recipe.model_dump(mode="json"),
            run_id=run_id,
            resume="allow" if run_id else None,
        )
        wandb_logger = logger.get(WandbLogger)
        if wandb_logger is not None and getattr(wandb_logger, "run_id", None):
            id_file.write_text(str(wandb_logger.run_id))
        return logger

    def _loaders(self, bundle: DataBundle) -> None:
        d = self.recipe.data
        self.train_set = _Indexed(bundle.train)
        self.sampler = EpochSeededSampler(len(self.train_set), self.recipe.seed)
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=d.batch_size,
            sampler=self.sampler,
            num_workers=d.num_workers,
            drop_last=len(self.train_set) > d.batch_size,
        )
        self.eval_loader = DataLoader(bundle.test, batch_size=d.eval_batch_size, shuffle=False)
        # The temperature reacts to the validation split when there is one, else to test.
        self.val_loader = (
            DataLoader(bundle.val, batch_size=d.eval_batch_size, shuffle=False)
            if bundle.val is not None else self.eval_loader
        )
        self._augmented_train = bundle.train if hasattr(bundle.train, "set_epoch") else None
        # Calibration and BN re-estimation: a fixed, unshuffled, unaugmented slice.
        self.calib_loader = DataLoader(bundle.train_plain, batch_size=d.batch_size, shuffle=False)
        x0 = bundle.test[0][0]
        self.example_input = x0.unsqueeze(0).to(self.device)

    def _teacher(self, bundle: DataBundle, logger: MetricLogger) -> nn.Module:
        t = self.recipe.teacher
        kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, **t.kwargs}
        model = build_model(t.model, **kwargs).to(self.device)
        cached = self.run_dir / TEACHER
        if self.resume and cached.is_file():  # a resumed run keeps the teacher it trained
            saved = load_checkpoint(cached, self.device)
            model.load_state_dict(saved["state_dict"])
            self.step_offset = int(saved.get("steps", 0))
            return model
        if t.checkpoint is not None:
            state = load_checkpoint(t.checkpoint, self.device)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        else:
            assert t.train is not None
            self._train_teacher(model, t.train.epochs, t.train.lr, logger)
        save_atomic(
            {"state_dict": model.state_dict(), "model": t.model, "kwargs": kwargs, "steps": self.step_offset},
            cached,
        )
        return model

    def _train_teacher(self, model: nn.Module, epochs: int, lr: float, logger: MetricLogger) -> None:
        _seed_all(self.recipe.seed)
        opt = self._optimizer(model, lr)
        total = epochs * len(self.train_loader)
        step = 0
        model.train()
        for epoch in range(epochs):
            self._set_epoch(10_000 + epoch)
            bar = tqdm(self.train_loader, desc=f"teacher {epoch + 1}/{epochs}", disable=not self.progress, leave=False)
            for x, y, _ in bar:
                x, y = x.to(self.device), y.to(self.device)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, lr, self.recipe.optimizer.schedule)
                loss = F.cross_entropy(model(x), y)
                self._check_finite(loss.detach(), "teacher")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
            acc, vloss = evaluate(model, self.eval_loader, self.device)
            logger.log({"teacher/epoch": epoch, "teacher/acc": acc, "teacher/test_loss": vloss}, step)
            self._say(f"teacher epoch {epoch + 1}/{epochs}: test acc {acc:.4f}, loss {vloss:.4f}")
        self.step_offset = step

    def _say(self, line: str) -> None:
        """One human-readable line per epoch (above the progress bars)."""
        if self.progress:
            tqdm.write(line)

    def _set_epoch(self, epoch: int) -> None:
        """Data order and augmentation are pure functions of (seed, epoch): exact resume."""
        self.sampler.set_epoch(epoch)
        if self._augmented_train is not None:
            self._augmented_train.set_epoch(epoch)

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        o = self.recipe.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(
            params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
            nesterov=o.nesterov and o.momentum > 0,
        )

    def _scheduler(self) -> JointScheduler:
        r = self.recipe
        stages = []
        for st in r.stages:
            tc = st.temperature.model_dump(exclude={"schedule"})
            kwargs = {k: v for k, v in tc.items() if v is not None}
            if st.temperature.schedule != "lookup_table":
                kwargs.pop("table", None)
            if st.temperature.schedule != "temperate":
                for k in ("alpha", "beta", "warmup", "adapt_until", "patience", "plateau_tol"):
                    kwargs.pop(k, None)
            stages.append(
                BitStage(st.label, st.epochs, st.weight_bits, st.act_bits, st.lr,
                         st.temperature.schedule, kwargs)
            )
        dist = r.distillation
        coupling = (
            NoCoupling() if dist.coupling == "none"
            else BitDropCoupling(step=dist.temperature_step_per_halving, shift=dist.weight_shift)
        )
        return JointScheduler(stages, dist.temperatures, dist.weights, coupling)

    def _cache_teacher_logits(self, teacher: nn.Module, bundle: DataBundle, logger: MetricLogger) -> torch.Tensor | None:
        mode = self.recipe.distillation.cache_teacher_logits
        can = not bundle.augmented
        self.teacher_logits_cached = mode == "on" or (mode == "auto" and can)
        if mode == "on" and not can:
            raise ValueError("distillation.cache_teacher_logits: on, but data.augment is true")
        why = "fixed data, computed once" if self.teacher_logits_cached else (
            "augmented data: teacher runs every step" if not can else "disabled by the recipe")
        self._say(f"teacher logits cached: {'yes' if self.teacher_logits_cached else 'no'} ({why})")
        logger.log({"teacher_logits_cached": int(self.teacher_logits_cached)}, self.step_offset)
        if not self.teacher_logits_cached:
            return None
        teacher.eval()
        loader = DataLoader(bundle.train_plain, batch_size=self.recipe.data.eval_batch_size, shuffle=False)
        with torch.no_grad():
            return torch.cat([teacher(x.to(self.device)).float() for x, _ in loader])

    # -- stages -----------------------------------------------------------------------
    def _enter_stage(self, student: nn.Module, arch: nn.Module, st: BitStage, quantized_now: bool, calibrate: bool) -> nn.Module:
        """Quantize on the first quantized stage, switch bits in place afterwards."""
        s = self.recipe.student
        if not st.quantized:
            return student
        if not quantized_now:
            loader = self.calib_loader if (calibrate and s.calibration_batches > 0) else None
            # On resume the weights come from the checkpoint: quantize the bare
            # architecture without calibration, then load the state dict.
            return quantize(
                student if calibrate else arch,
                weight_bits=st.weight_bits, act_bits=st.act_bits,
                first_last_bits=s.first_last_bits, per_channel=s.per_channel,
                calibration_loader=loader, calibration_batches=max(s.calibration_batches, 1),
            ).to(self.device)
        set_bit_width(student, st.weight_bits, st.act_bits)
        return student

    @staticmethod
    def _stable_names(vals: dict[str, Any], st: StageState, sched: JointScheduler) -> dict[str, Any]:
        """Log each scale's KD part under its *reference* temperature (``kd_T6``).

        The loss names parts by the current T (``kd_T7.13``), which moves every
        epoch; W&B charts need names that stay put. The current T of each scale is
        logged beside it as ``T_scale{ref}``.
        """
        out = {k: v for k, v in vals.items() if not k.startswith("kd_T")}
        for ref, now in zip(sched.base_temperatures, st.temperatures):
            part = vals.get(f"kd_T{now:g}")
            if part is not None:
                out[f"kd_T{ref:g}"] = part
            out[f"T_scale{ref:g}"] = now
        return out

    @staticmethod
    def _check_finite(loss: float | torch.Tensor, where: str) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{where}: loss is {value} (NaN/Inf); stopping. The last good checkpoint is "
                "kept; lower the learning rate or raise the temperature and run again with --resume."
            )

    def _train_epoch(
        self,
        epoch: int,
        student: nn.Module,
        teacher: nn.Module,
        teacher_logits: torch.Tensor | None,
        loss_fn: TemperateLoss,
        sched: JointScheduler,
        opt: torch.optim.Optimizer,
        prog: _Progress,
        stage_step0: int,
        stage_steps: int,
        peak_lr: float,
        logger: MetricLogger,
    ) -> dict[str, float]:
        st = sched.state
        assert st is not None
        o = self.recipe.optimizer
        self._set_epoch(epoch)
        student.train()
        teacher.eval()
        # Loss parts stay tensors and are read back (a host sync on a GPU) only every
        # `log_every` steps and at the end of the epoch. A NaN/Inf is caught there,
        # before the epoch's evaluation and checkpoint, so the last good checkpoint stays.
        sums: dict[str, Any] = {}
        n = 0
        every = self.recipe.tracking.log_every
        grad_driven = sched.stages[st.stage_index].schedule == "gradient_norm"
        clip = o.grad_clip if o.grad_clip is not None else float("inf")
        where = f"epoch {epoch} ({st.stage_name})"
        bar = tqdm(
            self.train_loader, disable=not self.progress, leave=False,
            desc=f"epoch {epoch + 1}/{sched.total_epochs} {st.stage_name}",
        )
        for x, y, idx in bar:
            x, y = x.to(self.device), y.to(self.device)
            if teacher_logits is not None:
                t_out = teacher_logits[idx.to(teacher_logits.device)]
            else:
                with torch.no_grad():
                    t_out = teacher(x)
            lr = _lr_at(prog.global_step - stage_step0, stage_steps, peak_lr, o.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            parts = loss_fn(student(x), t_out, y)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
            if grad_driven:
                st = sched.observe_grad_norm(float(gnorm))
                loss_fn.set_temperatures(st.temperatures, st.weights)
            opt.step()
            prog.global_step += 1
            n += 1
            named = self._stable_names({k: v.detach() for k, v in parts.items()}, st, sched)
            for k, v in named.items():
                sums[k] = sums[k] + v if k in sums else v
            if prog.global_step % every == 0:
                vals = {k: float(v) for k, v in named.items()}
                self._check_finite(vals["loss"], where)
                bar.set_postfix(loss=f"{vals['loss']:.3f}", T=f"{st.temperature:.2f}", bits=f"W{st.weight_bits}A{st.act_bits}")
                logger.log(
                    {
                        **{f"train/{k}": v for k, v in vals.items()},
                        "train/lr": lr,
                        "train/T": st.temperature,
                        "train/weight_bits": st.weight_bits,
                        "train/act_bits": st.act_bits,
                        "train/grad_norm": float(gnorm),
                        "epoch": epoch,
                    },
                    self.step_offset + prog.global_step,
                )
        means = {k: float(v) / max(n, 1) for k, v in sums.items()}
        self._check_finite(means.get("loss", 0.0), where)
        return means

    # -- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the recipe; return the summary (also in ``summary.json``)."""
        r = self.recipe
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.run_dir / CHECKPOINT
        ckpt = load_checkpoint(ckpt_path) if self.resume and ckpt_path.is_file() else None
        if self.resume and ckpt is None and (self.run_dir / "summary.json").is_file():
            return json.loads((self.run_dir / "summary.json").read_text())
        (self.run_dir / "recipe.yaml").write_text(
            f"# Resolved recipe. Re-run: qtemperate run {self.run_dir / 'recipe.yaml'}\n" + r.to_yaml()
        )
        logger = self._make_logger()
        try:
            summary = self._run(ckpt, logger, t_start)
        finally:
            logger.finish()
        return summary

    def _run(self, ckpt: dict[str, Any] | None, logger: MetricLogger, t_start: float) -> dict[str, Any]:
        r = self.recipe
        _seed_all(r.seed)
        bundle = build_datasets(
            r.data.name, root=r.data.root, val_fraction=r.data.val_fraction,
            limit_train=r.data.limit_train, limit_test=r.data.limit_test, seed=r.seed,
            augment=r.data.augment, **r.data.kwargs,
        )
        self._loaders(bundle)
        logger.log_config(r.model_dump(mode="json"))

        teacher = self._teacher(bundle, logger)
        teacher.eval()
        teacher_acc, _ = evaluate(teacher, self.eval_loader, self.device)
        t_size = model_size(teacher, self.example_input)

        arch_path = self.run_dir / STUDENT_ARCH
        if ckpt is not None and arch_path.is_file():
            saved = load_checkpoint(arch_path, self.device)
            arch, plan = saved["arch"], saved["plan"]
        else:
            arch, plan = self._build_student(teacher, bundle, t_size)
            save_atomic({"arch": arch, "plan": plan}, arch_path)
        teacher_logits = self._cache_teacher_logits(teacher, bundle, logger)

        sched = self._scheduler()
        loss_fn = TemperateLoss(
            kd_weight=r.distillation.kd_weight,
            temperatures=tuple(r.distillation.temperatures),
            weights=r.distillation.weights,
        )
        prog = _Progress()
        student: nn.Module = _deepcopy(arch).to(self.device)
        quantized_now = False
        opt: torch.optim.Optimizer | None = None
        stage_idx = -1
        if ckpt is not None:
            prog = _Progress(**ckpt["progress"])
            sched.load_state_dict(ckpt["scheduler"])
            stage_idx = ckpt["stage_index"]
            st = sched.stages[stage_idx]
            student = self._enter_stage(student, arch, st, False, calibrate=False)
            quantized_now = st.quantized
            student.load_state_dict(ckpt["model"])
            opt = self._optimizer(student, st.lr or r.optimizer.lr)
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])

        bounds = sched.stage_bounds()
        steps_per_epoch = len(self.train_loader)
        for epoch in range(prog.epoch + 1, sched.total_epochs):
            idx = sched.stage_index(epoch)
            bstage = sched.stages[idx]
            if idx != stage_idx:
                student = self._enter_stage(student, arch, bstage, quantized_now, calibrate=True)
                quantized_now = quantized_now or bstage.quantized
                stage_idx = idx
                opt = self._optimizer(student, bstage.lr or r.optimizer.lr)
                acc0, loss0 = evaluate(student, self.val_loader, self.device)
                # The stage's adaptive phase reacts to the model as it now is.
                prog.val_loss = loss0
                logger.log({"stage/index": idx, "stage/start_acc": acc0, "stage/start_val_loss": loss0,
                            "stage/weight_bits": bstage.weight_bits, "stage/act_bits": bstage.act_bits},
                           self.step_offset + prog.global_step)
            st = sched.step(epoch, prog.val_loss)
            assert opt is not None
            loss_fn.set_temperatures(st.temperatures, st.weights)
            first, last = bounds[stage_idx]
            means = self._train_epoch(
                epoch, student, teacher, teacher_logits, loss_fn, sched, opt, prog,
                stage_step0=first * steps_per_epoch, stage_steps=(last - first) * steps_per_epoch,
                peak_lr=bstage.lr or r.optimizer.lr, logger=logger,
            )
            acc, tloss = evaluate(student, self.eval_loader, self.device)
            vloss = tloss if self.val_loader is self.eval_loader else evaluate(student, self.val_loader, self.device)[1]
            prog.val_loss = vloss
            prog.epoch = epoch
            record = {
                "epoch": epoch, "stage": st.stage_name, "weight_bits": st.weight_bits,
                "act_bits": st.act_bits, "T": st.temperature, "temperatures": list(st.temperatures),
                "weights": list(st.weights), "phase": st.phase, "test_acc": acc, "test_loss": tloss, "val_loss": vloss,
                **{f"train_{k}": v for k, v in means.items()},
            }
            prog.history.append(record)
            self._say(
                f"epoch {epoch + 1}/{sched.total_epochs} [{st.stage_name} W{st.weight_bits}A{st.act_bits}, "
                f"T={st.temperature:.2f} ({st.phase})]: train loss {means.get('loss', float('nan')):.4f}, "
                f"test acc {acc:.4f}"
            )
            logger.log({"test/acc": acc, "test/loss": tloss, "val/loss": vloss, "epoch": epoch, "T": st.temperature,
                        "weight_bits": st.weight_bits, "act_bits": st.act_bits},
                       self.step_offset + prog.global_step)
            if epoch == last - 1:
                size = model_size(student)
                prog.stages.append({
                    "name": st.stage_name, "weight_bits": st.weight_bits, "act_bits": st.act_bits,
                    "epochs": bstage.epochs, "final_T": st.temperature, "final_temperatures": list(st.temperatures),
                    "accuracy": acc, "bytes": float(size.quantized_bytes if st.quantized else size.float_bytes),
                })
            prog.elapsed_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            save_atomic(
                {"progress": prog.__dict__, "scheduler": sched.state_dict(), "stage_index": stage_idx,
                 "model": student.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state()},
                self.run_dir / CHECKPOINT,
            )
            if self.stop_after_epochs is not None and epoch + 1 >= self.stop_after_epochs and epoch + 1 < sched.total_epochs:
                raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epochs)")

        final = sched.stages[-1]
        student.eval()
        student_acc, _ = evaluate(student, self.eval_loader, self.device)
        save_student(self.run_dir / "student.pt", arch, student, final.weight_bits, final.act_bits,
                     r.student.first_last_bits, r.student.per_channel,
                     extra={"recipe": r.name, "student_acc": student_acc})
        s_size = model_size(student, self.example_input)
        export = self._export(student, teacher, bundle)
        prog.elapsed_s += time.perf_counter() - t_start
        student_bytes = float(s_size.quantized_bytes)
        summary: dict[str, Any] = {
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
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.log_summary(summary)
        cols = ["name", "weight_bits", "act_bits", "epochs", "final_T", "accuracy", "bytes"]
        logger.log_table("stages", cols, [[s[c] for c in cols] for s in prog.stages])
        logger.log_artifact(self.run_dir / "student.pt", name=f"{r.name}-student", type="model")
        return summary

    def _build_student(
        self, teacher: nn.Module, bundle: DataBundle, teacher_size: SizeReport
    ) -> tuple[nn.Module, dict[str, Any]]:
        r = self.recipe
        s = r.student
        final = r.final_stage
        if s.model is None:
            base = teacher
        else:
            kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, **s.kwargs}
            base = build_model(s.model, **kwargs).to(self.device)
        if s.model is not None and s.target_size_ratio is None and s.prune_ratio is None:
            return base, {"prune_ratio": None}
        arch, report = plan_student(
            base, self.example_input, final.weight_bits, final.act_bits,
            first_last_bits=s.first_last_bits, per_channel=s.per_channel,
            target_size_ratio=s.target_size_ratio if s.model is None else None,
            prune_ratio=s.prune_ratio,
            importance=s.importance, iterative_steps=s.iterative_steps,
            max_layer_ratio=s.max_layer_ratio,
            calibration_loader=_take(self.calib_loader, 20),
            round_to=s.round_to,
            # The teacher's size (and its MACs) is already measured by the caller.
            teacher_size=teacher_size if s.model is None else None,
        )
        return arch, report.to_dict()

    def _export(self, student: nn.Module, teacher: nn.Module, bundle: DataBundle) -> dict[str, Any]:
        """Export ``student.onnx``, verify it against PyTorch and time it in onnxruntime.

        onnxruntime has integer convolution kernels for 8 bits only: a W4A4 graph
        (packed int4 weights, smallest file) runs its convolutions in float. So for a
        sub-8-bit student the same pruned architecture is also exported at W8A8
        (``student_int8.onnx``) and timed as ``int8_onnx_latency_ms`` — the latency of
        the student on an int8 CPU backend — beside the float teacher's.
        """
        e = self.recipe.export
        if not e.onnx:
            return {"onnx_latency_ms": None, "int8_onnx_latency_ms": None}
        from qtemperate.export import benchmark_onnx, export_onnx, verify_onnx

        def bench(path: Path) -> dict[str, float]:
            lat = benchmark_onnx(path, batch_sizes=tuple(e.batch_sizes), iters=e.benchmark_iters)
            return {str(k): v for k, v in lat.items()}

        ex = self.example_input.cpu()
        student_cpu = student.to("cpu").eval()
        path = export_onnx(student_cpu, self.run_dir / "student.onnx", ex)
        n = min(e.verify_samples, len(bundle.test))
        inputs = torch.stack([bundle.test[i][0] for i in range(n)])
        rep = verify_onnx(path, student_cpu, inputs)
        out: dict[str, Any] = {
            "onnx_path": str(path),
            "onnx_bytes": Path(path).stat().st_size,
            "onnx_top1_agreement": rep.top1_agreement,
            "onnx_max_abs_diff": rep.max_abs_diff,
            "onnx_latency_ms": None,
            "int8_onnx_latency_ms": None,
        }
        if e.benchmark:
            out["onnx_latency_ms"] = bench(path)
            final = self.recipe.final_stage
            if final.quantized and min(final.weight_bits, final.act_bits) < 8:
                twin = _deepcopy(student_cpu)
                set_bit_width(twin, 8, 8)
                out["int8_onnx_latency_ms"] = bench(export_onnx(twin, self.run_dir / "student_int8.onnx", ex))
            elif final.quantized:
                out["int8_onnx_latency_ms"] = out["onnx_latency_ms"]
            tpath = export_onnx(teacher.to("cpu").eval(), self.run_dir / "teacher.onnx", ex)
            out["teacher_onnx_latency_ms"] = bench(tpath)
        student.to(self.device)
        teacher.to(self.device)
        return out


def _deepcopy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _take(loader: DataLoader, n: int) -> list[Any]:
    """The first ``n`` batches of ``loader`` as a list (reusable, unlike an iterator)."""
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append(b)
    return out
