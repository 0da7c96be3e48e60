"""The teacher: built for the data, loaded from a checkpoint or trained here, its logits cached.

A run's teacher comes from, in this order: the run folder's own ``teacher.pt`` when
resuming (the teacher a run trained is never retrained), the recipe's
``teacher.checkpoint``, or training from scratch (:func:`train_teacher`: cross-entropy,
the recipe's optimizer, cosine learning rate over all teacher steps). Training writes
``teacher_training.pt`` after every epoch (weights, optimizer, RNG), so a run killed
while its teacher trains resumes at the next teacher epoch. Whatever the teacher came
from is saved as ``teacher.pt`` (state dict, model name, kwargs, the number of
training steps, so the student's metric steps continue after the teacher's, and the
length of ``metrics.jsonl``), which supersedes ``teacher_training.pt``.

Checkpoints are read as data only: a ``teacher.checkpoint`` holding a whole pickled
model is refused with a message saying how to save its state dict instead.

When the training data is not augmented the teacher's logits are computed once
(:func:`cache_teacher_logits`) and looked up by sample index during distillation; a
multi-output teacher's heads are cached per head (a dict of tensors).

A multi-output teacher (a recipe with a ``task`` section) is trained with the task loss
of each head (:class:`~qtemperate.heads.Task`) and scored on its accuracy head.

In a data-parallel run (:mod:`~qtemperate.training.distributed`) the teacher trains
under DDP on every rank, rank 0's weights are broadcast at the end and rank 0 alone
writes ``teacher.pt`` (and reads it on resume, broadcasting what it read); the logit
cache is computed in shards and gathered, identical on every rank. The recipe's
``precision.teacher`` sets the autocast of its training and of its logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate._faults import fault_point
from qtemperate.checkpoint import (
    STATE_DICT_HINT,
    check_state_dict,
    load_checkpoint,
    save_atomic,
    state_dict_from,
)
from qtemperate.data import DataBundle, RunLoaders
from qtemperate.errors import CheckpointError
from qtemperate.heads import Task, as_float, targets_to
from qtemperate.recipe import OptimizerConfig, Recipe
from qtemperate.run_dir import metrics_size
from qtemperate.tracking import MetricLogger
from qtemperate.training import distributed
from qtemperate.training.architecture import build_recipe_model
from qtemperate.training.console import Console
from qtemperate.training.evaluate import evaluate
from qtemperate.training.guards import check_finite
from qtemperate.training.lr_schedule import lr_at, set_lr
from qtemperate.training.memory_format import channels_last, to_format, wants_channels_last
from qtemperate.training.optimizer import build_optimizer
from qtemperate.training.precision import ComputePolicy, policy_for
from qtemperate.training.seed import rng_state, seed_all, set_rng_state

__all__ = [
    "TEACHER_EPOCH_OFFSET",
    "TEACHER_FILE",
    "TEACHER_TRAINING_FILE",
    "TeacherLogits",
    "cache_teacher_logits",
    "load_saved_teacher",
    "load_teacher_training",
    "load_teacher_weights",
    "prepare_teacher",
    "should_cache_logits",
    "train_teacher",
]

TEACHER_FILE = "teacher.pt"
TEACHER_TRAINING_FILE = "teacher_training.pt"
TEACHER_EPOCH_OFFSET = 10_000
"""Teacher epochs draw data order ``(seed, 10_000 + epoch)``: never the student's."""


def load_teacher_weights(
    model: nn.Module, path: str | Path, device: torch.device | str = "cpu", what: str = "teacher.checkpoint"
) -> None:
    """Load a state dict (or ``{"state_dict": ...}``) from ``path`` into ``model``.

    Raises:
        CheckpointError: the file is not data (e.g. a whole pickled model), or holds no state dict.
        BadInput: a key or shape does not fit ``model`` (named in the message).
    """
    state = state_dict_from(load_checkpoint(path, device, what=what, hint=STATE_DICT_HINT), path, what)
    check_state_dict(model, state, f"{what}: {path}")
    model.load_state_dict(state)


def load_saved_teacher(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a run's ``teacher.pt`` (as data) and check its fields.

    Raises:
        CheckpointError: unreadable, unsafe, or not a teacher record.
    """
    saved = load_checkpoint(path, device)
    if not isinstance(saved, dict) or not {"state_dict", "model", "kwargs"} <= set(saved):
        raise CheckpointError(f"{path}: not a qtemperate teacher record (state_dict, model, kwargs)")
    state_dict_from(saved, path)
    return saved


def load_teacher_training(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read ``teacher_training.pt`` (the per-epoch teacher checkpoint) and check its fields.

    Raises:
        CheckpointError: unreadable, unsafe, or not a teacher training checkpoint.
    """
    saved = load_checkpoint(path, device)
    keys = {"state_dict", "optimizer", "epoch", "epochs", "step", "rng"}
    if not isinstance(saved, dict) or not keys <= set(saved):
        raise CheckpointError(f"{path}: not a qtemperate teacher training checkpoint")
    return saved


def train_teacher(
    model: nn.Module,
    loaders: RunLoaders,
    epochs: int,
    lr: float,
    optimizer: OptimizerConfig,
    device: torch.device,
    seed: int = 0,
    logger: MetricLogger | None = None,
    console: Console | None = None,
    task: Task | None = None,
    policy: ComputePolicy | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    resume_from: dict[str, Any] | None = None,
    metrics_bytes: Callable[[], int | None] | None = None,
) -> int:
    """Train ``model`` with cross-entropy (or ``task``'s per-head task loss) for ``epochs``
    epochs; return the steps taken.

    The learning rate follows :func:`~qtemperate.training.lr_schedule.lr_at` over all
    ``epochs · len(loaders.train)`` steps. After every epoch the test accuracy and loss
    are logged (``teacher/acc``, ``teacher/test_loss``) and printed. ``model`` may be
    DDP-wrapped (:func:`~qtemperate.training.distributed.wrap`); ``policy`` sets the
    autocast and batch placement (default: fp32 on ``device``).

    Args:
        checkpoint_path: Write a checkpoint there after every epoch (atomically; rank 0
            of a data-parallel run).
        resume_from: A checkpoint :func:`load_teacher_training` read: training
            continues after its epoch, exactly as if it had not stopped.
        metrics_bytes: Returns the length of ``metrics.jsonl``, stored in each checkpoint.
    """
    console = console or Console(False)
    task = task or Task()
    policy = policy or ComputePolicy(device)
    seed_all(seed)
    opt = build_optimizer(model, optimizer, lr)
    total = epochs * len(loaders.train)
    step, first = 0, 0
    if resume_from is not None:
        distributed.unwrap_ddp(model).load_state_dict(resume_from["state_dict"])
        opt.load_state_dict(resume_from["optimizer"])
        step, first = int(resume_from["step"]), int(resume_from["epoch"]) + 1
        set_rng_state(resume_from["rng"])
    model.train()
    # NHWC: faster CPU convolutions. Not under DDP (its buckets view the wrapped parameters).
    cl = distributed.world_size() == 1 and wants_channels_last(loaders.example_input.to(device))
    for epoch in range(first, epochs):
        loaders.set_epoch(TEACHER_EPOCH_OFFSET + epoch)
        bar = console.bar(loaders.train, desc=f"teacher {epoch + 1}/{epochs}")
        if cl:
            model.to(memory_format=torch.channels_last)
        for x, y, _ in bar:
            x, y = to_format(policy.to_device(x), cl), targets_to(y, device)
            set_lr(opt, lr_at(step, total, lr, optimizer.schedule))
            with policy.autocast():
                out = model(x)
            loss = task.loss(as_float(out), y)[0]
            check_finite(loss.detach(), "teacher")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            fault_point("teacher_step")
            if console.enabled:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.to(memory_format=torch.contiguous_format)
        acc, test_loss = evaluate(model, loaders.test, device, task)
        if logger is not None:
            logger.log({"teacher/epoch": epoch, "teacher/acc": acc, "teacher/test_loss": test_loss}, step)
        console.say(f"teacher epoch {epoch + 1}/{epochs}: test acc {acc:.4f}, loss {test_loss:.4f}")
        if checkpoint_path is not None and distributed.is_main():
            save_atomic(
                {"state_dict": distributed.unwrap_ddp(model).state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                 "epochs": epochs, "step": step, "rng": rng_state(),
                 "metrics_bytes": metrics_bytes() if metrics_bytes is not None else None},
                checkpoint_path,
            )
    return step


def prepare_teacher(
    recipe: Recipe,
    bundle: DataBundle,
    loaders: RunLoaders,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    logger: MetricLogger | None = None,
    console: Console | None = None,
    *,
    saved: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """The run's teacher (see the module docstring) in eval mode, and its training steps.

    Args:
        resume: Reuse the run folder's ``teacher.pt`` / ``teacher_training.pt``.
        saved: ``teacher.pt`` already read by the caller (:func:`load_saved_teacher`).
        training: ``teacher_training.pt`` already read (:func:`load_teacher_training`).
    """
    t = recipe.teacher
    model = build_recipe_model(recipe, "teacher", bundle.num_classes, bundle.in_channels, device)
    policy = policy_for(recipe.precision.teacher, device)
    saved_path, training_path = run_dir / TEACHER_FILE, run_dir / TEACHER_TRAINING_FILE
    if resume and saved is None:  # rank 0 reads, every rank gets what it read
        saved = distributed.from_main(
            lambda: load_saved_teacher(saved_path, "cpu") if saved_path.is_file() else None)
    if resume and saved is not None:
        state = state_dict_from(saved, saved_path)
        check_state_dict(model, state, str(saved_path))
        model.load_state_dict(state)
        if distributed.is_main():
            training_path.unlink(missing_ok=True)  # left by a kill between the two writes
        return policy.prepare(model).eval(), int(saved.get("steps", 0))
    steps = 0
    if t.checkpoint is not None:
        load_teacher_weights(model, t.checkpoint, device)
    else:
        assert t.train is not None  # the recipe guarantees a checkpoint or training
        if resume and training is None:  # rank 0 reads, every rank gets what it read
            training = distributed.from_main(
                lambda: load_teacher_training(training_path, "cpu") if training_path.is_file() else None)
        if training is not None:
            console = console or Console(False)
            console.say(f"teacher: resuming after epoch {int(training['epoch']) + 1}/{t.train.epochs}")
        steps = train_teacher(
            distributed.wrap(policy.prepare(model), device, recipe.distributed.sync_batchnorm),
            loaders, t.train.epochs, t.train.lr, recipe.optimizer, device,
            seed=recipe.seed, logger=logger, console=console, task=Task.from_recipe(recipe), policy=policy,
            checkpoint_path=training_path, resume_from=training if resume else None,
            metrics_bytes=lambda: metrics_size(run_dir),
        )
        model = distributed.unwrap(model)
    distributed.sync_module_(model)  # rank 0's weights (BN buffers last updated per rank)
    kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, **t.kwargs}
    if distributed.is_main():
        save_atomic({"state_dict": model.state_dict(), "model": t.model, "kwargs": kwargs, "steps": steps,
                     "metrics_bytes": metrics_size(run_dir)}, saved_path)
        training_path.unlink(missing_ok=True)  # teacher.pt supersedes it
    return policy.prepare(model).eval(), steps


def should_cache_logits(mode: str, augmented: bool) -> tuple[bool, str]:
    """Whether to cache teacher logits (``auto``/``on``/``off``) and why, for the log.

    Raises:
        ValueError: ``on`` with augmented data (a cached logit would belong to another crop).
    """
    if mode == "on" and augmented:
        raise ValueError("distillation.cache_teacher_logits: on, but data.augment is true")
    cache = mode == "on" or (mode == "auto" and not augmented)
    if cache:
        return True, "fixed data, computed once"
    return False, "augmented data: teacher runs every step" if augmented else "disabled by the recipe"


TeacherOutputs = torch.Tensor | dict[str, torch.Tensor]
"""The teacher's output for a batch: logits, or a dict of heads for a multi-output model."""


@torch.no_grad()
def cache_teacher_logits(
    teacher: nn.Module, loaders: RunLoaders, device: torch.device, policy: ComputePolicy | None = None
) -> TeacherOutputs:
    """Teacher logits of every training sample, in index order (``loaders.plain``).

    A multi-output teacher gives a dict of heads, each cached as one tensor (row ``i``
    of every head belongs to training index ``i``). In a data-parallel run
    ``loaders.plain`` reads this rank's contiguous shard; the shards are gathered, so
    every rank returns the whole table.
    """
    policy = policy or ComputePolicy(device)
    teacher.eval()
    n = len(loaders.plain.dataset)  # type: ignore[arg-type]
    outs = []
    cl = distributed.world_size() == 1 and wants_channels_last(loaders.example_input.to(device))
    with channels_last(teacher, cl):
        for batch in loaders.plain:
            with policy.autocast():
                outs.append(as_float(teacher(to_format(policy.to_device(batch[0]), cl))))
    if not outs:  # an empty shard (fewer samples than processes): shapes from one input
        one = as_float(teacher(policy.to_device(loaders.example_input)))
        outs.append({h: v[:0] for h, v in one.items()} if isinstance(one, Mapping) else one[:0])
    if isinstance(outs[0], Mapping):
        return {head: distributed.gather_shards(torch.cat([o[head] for o in outs]), n) for head in outs[0]}
    return distributed.gather_shards(torch.cat(outs), n)


class TeacherLogits:
    """The teacher's logits for a batch: looked up in the cache, or computed now.

    Args:
        teacher: The teacher model (kept in eval mode; never updated).
        cache: Logits of every training sample by index (a dict of them per head for a
            multi-output teacher), or ``None``.
        policy: Autocast of the live teacher (default fp32); logits are returned in fp32.
    """

    def __init__(self, teacher: nn.Module, cache: TeacherOutputs | None, policy: ComputePolicy | None = None) -> None:
        self.teacher = teacher
        self.cache = cache
        self.policy = policy

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> Any:
        if isinstance(self.cache, Mapping):
            return {head: rows[index.to(rows.device)] for head, rows in self.cache.items()}
        if self.cache is not None:
            return self.cache[index.to(self.cache.device)]
        self.teacher.eval()
        with torch.no_grad():
            if self.policy is None:
                return self.teacher(x)
            with self.policy.autocast():
                return as_float(self.teacher(x))
