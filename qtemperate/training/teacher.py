"""The teacher: built for the data, loaded from a checkpoint or trained here, its logits cached.

A run's teacher comes from, in this order: the run folder's own ``teacher.pt`` when
resuming (the teacher a run trained is never retrained), the recipe's
``teacher.checkpoint``, or training from scratch (:func:`train_teacher`: cross-entropy,
the recipe's optimizer, cosine learning rate over all teacher steps). Whatever it came
from is saved as ``teacher.pt`` (state dict, model name, kwargs and the number of
training steps, so the student's metric steps continue after the teacher's).

When the training data is not augmented the teacher's logits are computed once
(:func:`cache_teacher_logits`) and looked up by sample index during distillation.
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
from qtemperate.training.architecture import build_for_data
from qtemperate.training.console import Console
from qtemperate.training.evaluate import evaluate
from qtemperate.training.guards import check_finite
from qtemperate.training.lr_schedule import lr_at, set_lr
from qtemperate.training.memory_format import channels_last, to_format, wants_channels_last
from qtemperate.training.optimizer import build_optimizer
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
) -> int:
    """Train ``model`` with cross-entropy for ``epochs`` epochs; return the steps taken.

    The learning rate follows :func:`~qtemperate.training.lr_schedule.lr_at` over all
    ``epochs · len(loaders.train)`` steps. After every epoch the test accuracy and loss
    are logged (``teacher/acc``, ``teacher/test_loss``) and printed.
    """
    console = console or Console(False)
    seed_all(seed)
    opt = build_optimizer(model, optimizer, lr)
    total = epochs * len(loaders.train)
    step = 0
    model.train()
    cl = wants_channels_last(loaders.example_input.to(device))  # NHWC: faster CPU convolutions
    for epoch in range(epochs):
        loaders.set_epoch(TEACHER_EPOCH_OFFSET + epoch)
        bar = console.bar(loaders.train, desc=f"teacher {epoch + 1}/{epochs}")
        if cl:
            model.to(memory_format=torch.channels_last)
        for x, y, _ in bar:
            x, y = to_format(x.to(device), cl), y.to(device)
            set_lr(opt, lr_at(step, total, lr, optimizer.schedule))
            loss = F.cross_entropy(model(x), y)
            check_finite(loss.detach(), "teacher")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if console.enabled:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.to(memory_format=torch.contiguous_format)
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
    saved_path = run_dir / TEACHER_FILE
    if resume and saved_path.is_file():
        saved = load_checkpoint(saved_path, device)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), int(saved.get("steps", 0))
    steps = 0
    if t.checkpoint is not None:
        load_teacher_weights(model, t.checkpoint, device)
    else:
        assert t.train is not None  # the recipe guarantees a checkpoint or training
        steps = train_teacher(
            model, loaders, t.train.epochs, t.train.lr, recipe.optimizer, device,
            seed=recipe.seed, logger=logger, console=console,
        )
    kwargs = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels, **t.kwargs}
    save_atomic({"state_dict": model.state_dict(), "model": t.model, "kwargs": kwargs, "steps": steps}, saved_path)
    return model.eval(), steps


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
def cache_teacher_logits(teacher: nn.Module, loaders: RunLoaders, device: torch.device) -> torch.Tensor:
    """Teacher logits of every training sample, in index order (``loaders.plain``)."""
    teacher.eval()
    cl = wants_channels_last(loaders.example_input.to(device))
    with channels_last(teacher, cl):
        return torch.cat([teacher(to_format(batch[0].to(device), cl)).float() for batch in loaders.plain])


class TeacherLogits:
    """The teacher's logits for a batch: looked up in the cache, or computed now.

    Args:
        teacher: The teacher model (kept in eval mode; never updated).
        cache: Logits of every training sample by index, or ``None``.
    """

    def __init__(self, teacher: nn.Module, cache: torch.Tensor | None) -> None:
        self.teacher = teacher
        self.cache = cache

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> Any:
        if self.cache is not None:
            return self.cache[index.to(self.cache.device)]
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(x)
