"""Checks that run before any training: files exist, shapes and class counts agree.

Schema problems are caught by :mod:`qtemperate.recipe`; this module checks the
world the recipe points at (data folders, checkpoints, the teacher's class count),
so a bad run fails in a second with one line naming the field or file, and never
after an hour of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtemperate.recipe import Recipe, RecipeError

__all__ = ["DatasetInfo", "dataset_info", "preflight"]


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts about a dataset that are known without reading it."""

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]


_KNOWN = {
    "fashion_mnist": DatasetInfo(10, 1, (28, 28)),
    "digits": DatasetInfo(10, 1, (8, 8)),
    "cifar10": DatasetInfo(10, 3, (32, 32)),
    "cifar100": DatasetInfo(100, 3, (32, 32)),
    "imagenet": DatasetInfo(1000, 3, (224, 224)),
}


def dataset_info(name: str, kwargs: dict[str, Any] | None = None) -> DatasetInfo:
    """Classes, channels and image size of a dataset, from its name and kwargs alone.

    ``synthetic`` and ``imagenet`` take ``num_classes`` / ``in_channels`` /
    ``image_size`` from the recipe's ``data.kwargs`` when given.
    """
    kw = kwargs or {}
    if name == "synthetic":
        from qtemperate.data import SYNTHETIC_DEFAULTS

        base = DatasetInfo(
            SYNTHETIC_DEFAULTS["num_classes"],
            SYNTHETIC_DEFAULTS["in_channels"],
            tuple(SYNTHETIC_DEFAULTS["image_size"]),  # type: ignore[arg-type]
        )
    elif name in _KNOWN:
        base = _KNOWN[name]
    else:
        raise RecipeError(f"data.name: unknown dataset {name!r}")
    size = kw.get("image_size", base.image_size)
    if isinstance(size, int):
        size = (size, size)
    return DatasetInfo(
        int(kw.get("num_classes", base.num_classes)),
        int(kw.get("in_channels", base.in_channels)),
        (int(size[0]), int(size[1])),
    )


def _classifier_outputs(state: dict[str, torch.Tensor]) -> int | None:
    """Output width of the last 2-D weight in a state dict (the classifier)."""
    last = None
    for key, val in state.items():
        if key.endswith("weight") and isinstance(val, torch.Tensor) and val.dim() == 2:
            last = int(val.shape[0])
    return last


def preflight(recipe: Recipe, check_data: bool = True) -> DatasetInfo:
    """Check what the recipe points at; raise :class:`RecipeError` naming the problem.

    Checks: the data folder/files exist (no downloads), the teacher checkpoint
    exists and loads, its classifier width equals the dataset's class count, an
    explicit ``num_classes`` in teacher/student kwargs agrees with the data, and
    model names resolve.
    """
    from qtemperate.models import MODELS

    info = dataset_info(recipe.data.name, recipe.data.kwargs)
    if check_data:
        from qtemperate.data import check_data_available

        try:
            check_data_available(recipe.data.name, recipe.data.root)
        except (FileNotFoundError, ImportError) as exc:
            raise RecipeError(f"data: {exc}") from None
    for section in ("teacher", "student"):
        cfg = getattr(recipe, section)
        n = cfg.kwargs.get("num_classes")
        if n is not None and int(n) != info.num_classes:
            raise RecipeError(
                f"{section}.kwargs.num_classes: {n} but data {recipe.data.name!r} has "
                f"{info.num_classes} classes"
            )
        name = cfg.model
        if name is not None and name not in MODELS and ":" not in name and "." not in name:
            raise RecipeError(f"{section}.model: unknown model {name!r}; known: {', '.join(MODELS.keys())}")
    ckpt = recipe.teacher.checkpoint
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise RecipeError(f"teacher.checkpoint: file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # corrupt or foreign file: name it, don't trace back
            raise RecipeError(f"teacher.checkpoint: cannot load {path} ({exc.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise RecipeError(f"teacher.checkpoint: {path} does not hold a state dict")
        width = _classifier_outputs(state)
        if width is not None and width != info.num_classes:
            raise RecipeError(
                f"teacher.checkpoint: classifier has {width} outputs but data "
                f"{recipe.data.name!r} has {info.num_classes} classes ({path})"
            )
    return info
