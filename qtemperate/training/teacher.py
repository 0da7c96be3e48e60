"""The teacher: built for the data, loaded from a checkpoint or trained here, its logits cached.

A run's teacher comes from, in this order: the run folder's own ``teacher.pt`` when
resuming (the teacher a run trained is never retrained), the recipe's
``teacher.checkpoint``, or training from scratch (:func:`train_teacher`: cross-entropy,
the recipe's optimizer, cosine learning rate over all teacher steps). Whatever it came
from is saved as ``teacher.pt`` (state dict, model name, kwargs and the number of
training steps, so the student's metric steps continue after the teacher's).

When the training data is not augmented the teacher's logits are computed once
(:func:`cache_teacher_logits`) and looked up by sample index during distillation.

In a data-parallel run (:mod:`~qtemperate.training.distributed`) the teacher trains
under DDP on every rank, rank 0's weights are broadcast at the end and rank 0 alone
writes ``teacher.pt`` (and reads it on resume, broadcasting what it read); the logit
cache is computed in shards and gathered, identical on every rank. The recipe's
``precision.teacher`` sets the autocast of its training and of its logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtemperate.checkpoint import load_checkpoint, save_atomic
from qtemperate.data import DataBundle, RunLoaders
from qtemperate.recipe import OptimizerConfig, Recipe
from qtemperate.tracking import MetricLogger
from qtemperate.training import distributed
from qtemperate.training.architecture import build_for_data
from qtemperate.training.console import Console
from qtemperate.training.evaluate import evaluate
from qtemperate.training.guards import check_finite
from qtemperate.training.lr_schedule import lr_at, set_lr
from qtemperate.training.optimizer import build_optimizer
from qtemperate.training.precision import ComputePolicy, policy_for
from qtemperate.training.seed import seed_all

__all__ = [
    "TEACHER_EPOCH_OFFSET",
    "TEACHER_FILE",
    "TeacherLogits",
    "cache_teacher_logits",
    "load_teacher_weights",
    "prepare_teacher",
    "should_cache_logits",
    "train_teacher",
]

TEACHER_FILE = "teacher.pt"
TEACHER_EPOCH_OFFSET = 10_000
"""Teacher epochs draw data order ``(seed, 10_000 + epoch)``: never the student's."""


def load_teacher_weights(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load a state dict (or ``{"state_dict": ...}``) from ``path`` into ``model``."""
    state = load_checkpoint(path, device)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model.load_state_dict(state)


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
    policy: ComputePolicy | None = None,
) -> int:
    """Train ``model`` with cross-entropy for ``epochs`` epochs; return the steps taken.

    The learning rate follows :func:`~qtemperate.training.lr_schedule.lr_at` over all
    ``epochs · len(loaders.train)`` steps. After every epoch the test accuracy and loss
    are logged (``teacher/acc``, ``teacher/test_loss``) and printed. ``model`` may be
    DDP-wrapped (:func:`~qtemperate.training.distributed.wrap`); ``policy`` sets the
    autocast and batch placement (default: fp32 on ``device``).
    """
    console = console or Console(False)
    policy = policy or ComputePolicy(device)
    seed_all(seed)
    opt = build_optimizer(model, optimizer, lr)
    total = epochs * len(loaders.train)
    step = 0
    model.train()
    for epoch in range(epochs):
        loaders.set_epoch(TEACHER_EPOCH_OFFSET + epoch)
        bar = console.bar(loaders.train, desc=f"teacher {epoch + 1}/{epochs}")
        for x, y, _ in bar:
            x, y = policy.to_device(x), y.to(device, non_blocking=device.type == "cuda")
            set_lr(opt, lr_at(step, total, lr, optimizer.schedule))
            with policy.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            check_finite(loss.detach(), "teacher")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if console.enabled:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc, test_loss = evaluate(model, loaders.test, device)
        if logger is not None:
            logger.log({"teacher/epoch": epoch, "teacher/acc": acc, "teacher/test_loss": test_loss}, step)
        console.say(f"teacher epoch {epoch + 1}/{epochs}: test acc {acc:.4f}, loss {test_loss:.4f}")
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
) -> tuple[nn.Module, int]:
    """The run's teacher (see the module docstring) in eval mode, and its training steps."""
    t = recipe.teacher
    model = build_for_data(t.model, t.kwargs, bundle.num_classes, bundle.in_channels, device)
    policy = policy_for(recipe.precision.teacher, device)
    saved_path = run_dir / TEACHER_FILE
    saved = distributed.from_main(
        lambda: load_checkpoint(saved_path, "cpu") if resume and saved_path.is_file() else None)
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        return policy.prepare(model).eval(), int(saved.get("steps", 0))
    steps = 0
    if t.checkpoint is not None:
        load_teacher_weights(model, t.checkpoint, device)
    else:
        assert t.train is not None  # the recipe guarantees a checkpoint or training
        steps = train_teacher(
            distributed.wrap(policy.prepare(model), device, recipe.distributed.sync_batchnorm),
            loaders, t.train.epochs, t.train.lr, recipe.optimizer, device,
            seed=recipe.seed, logger=logger, console=console, policy=policy,
        )
        model = distributed.unwrap(model)
    distributed.sync_module_(model)  # rank 0's weights (BN buffers last updated per rank)
    kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, **t.kwargs}
    if distributed.is_main():
        save_atomic({"state_dict": model.state_dict(), "model": t.model, "kwargs": kwargs, "steps": steps},
                    saved_path)
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


@torch.no_grad()
def cache_teacher_logits(
    teacher: nn.Module, loaders: RunLoaders, device: torch.device, policy: ComputePolicy | None = None
) -> torch.Tensor:
    """Teacher logits of every training sample, in index order (``loaders.plain``).

    In a data-parallel run ``loaders.plain`` reads this rank's contiguous shard; the
    shards are gathered, so every rank returns the whole table.
    """
    policy = policy or ComputePolicy(device)
    teacher.eval()
    parts = []
    for batch in loaders.plain:
        with policy.autocast():
            parts.append(teacher(policy.to_device(batch[0])).float())
    if not parts:  # an empty shard (fewer samples than processes): shape from one input
        parts.append(teacher(policy.to_device(loaders.example_input)).float()[:0])
    local = torch.cat(parts)
    return distributed.gather_shards(local, len(loaders.plain.dataset))  # type: ignore[arg-type]


class TeacherLogits:
    """The teacher's logits for a batch: looked up in the cache, or computed now.

    Args:
        teacher: The teacher model (kept in eval mode; never updated).
        cache: Logits of every training sample by index, or ``None``.
        policy: Autocast of the live teacher (default fp32); logits are returned in fp32.
    """

    def __init__(self, teacher: nn.Module, cache: torch.Tensor | None, policy: ComputePolicy | None = None) -> None:
        self.teacher = teacher
        self.cache = cache
        self.policy = policy

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> Any:
        if self.cache is not None:
            return self.cache[index.to(self.cache.device)]
        self.teacher.eval()
        with torch.no_grad():
            if self.policy is None:
                return self.teacher(x)
            with self.policy.autocast():
                return self.teacher(x).float()
