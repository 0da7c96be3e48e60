"""Checks that run before any training: files exist, shapes and class counts agree.

Schema problems are caught by :mod:`qtemperate.recipe`; this module checks the
world the recipe points at (data folders, checkpoints, the teacher's class count),
so a bad run fails in a second with one line naming the field or file, and never
after an hour of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qtemperate.data import DatasetInfo as DatasetInfo
from qtemperate.data import DatasetOptionError, check_data_available
from qtemperate.data import dataset_info as _dataset_info
from qtemperate.recipe import Recipe, RecipeError

__all__ = [
    "DatasetInfo",
    "ProtocolWarning",
    "check_validation_split",
    "dataset_info",
    "preflight",
    "validation_warnings",
]


class ProtocolWarning(UserWarning):
    """A recipe that lets the test split drive training decisions (``val_fraction: 0``)."""


def validation_warnings(recipe: Recipe) -> list[str]:
    """Warnings about the validation protocol of a recipe (empty when it is sound).

    The test split is for the reported accuracy only; the loss that drives the
    adaptive temperature and its plateau trigger comes from a validation split
    carved from the training data (``data.val_fraction``, 0.1 by default). With
    ``val_fraction: 0`` and a stage whose schedule reads that loss, the temperatures
    follow the test loss: one warning says so, naming the stages.
    """
    from qtemperate.schedule_switches import reads_validation_loss

    if recipe.data.val_fraction > 0:
        return []
    stages = reads_validation_loss(recipe)
    if not stages:
        return []
    return [
        f"data.val_fraction is 0: the temperatures of stage(s) {', '.join(stages)} (adaptive phase, "
        "plateau trigger) will follow the TEST loss; set data.val_fraction > 0 (default 0.1) to "
        "carve a validation split from the training data"
    ]


def check_validation_split(recipe: Recipe, val_samples: int, train_samples: int) -> list[str]:
    """Check the built splits against the protocol; return :func:`validation_warnings`.

    Raises:
        RecipeError: ``data.val_fraction`` > 0 held out no sample (too little data per
            class), so the schedule would read an empty split.
    """
    f = recipe.data.val_fraction
    if f > 0 and val_samples == 0:
        raise RecipeError(
            f"data.val_fraction: {f} of {train_samples} training samples holds out no sample "
            "(rounded per class); raise it or use more data"
        )
    return validation_warnings(recipe)


def dataset_info(name: str, kwargs: dict[str, Any] | None = None) -> DatasetInfo:
    """Classes, channels and image size of a recipe's dataset, without reading data.

    The facts come from the dataset's registration (:func:`qtemperate.data.dataset_info`,
    e.g. cifar100 with ``label_mode: coarse`` has 20 classes); this wrapper only turns
    its errors into :class:`RecipeError` naming the recipe field.

    Raises:
        RecipeError: ``data.name`` for an unknown dataset, ``data.kwargs.<option>`` for
            an option the builder does not take (listing the accepted ones) or a bad
            option value, ``data`` for any other problem with the options.
    """
    try:
        return _dataset_info(name, kwargs)
    except KeyError as exc:
        raise RecipeError(f"data.name: {exc.args[0]}") from None
    except DatasetOptionError as exc:
        raise RecipeError(f"data.kwargs.{exc.option}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"data: {exc}") from None


def _classifier_outputs(state: dict[str, torch.Tensor]) -> int | None:
    """Output width of the last 2-D weight in a state dict (the classifier)."""
    last = None
    for key, val in state.items():
        if key.endswith("weight") and isinstance(val, torch.Tensor) and val.dim() == 2:
            last = int(val.shape[0])
    return last


def preflight(recipe: Recipe, check_data: bool = True) -> DatasetInfo:
    """Check what the recipe points at; raise :class:`RecipeError` naming the problem.

    Checks: ``data.kwargs`` are options the dataset's builder takes, the data
    folder/files exist (no downloads), the teacher checkpoint exists and loads, its
    classifier width equals the dataset's class count (as the dataset states it for
    these options, e.g. 20 for cifar100 ``label_mode: coarse``), an explicit
    ``num_classes`` in teacher/student kwargs agrees with the data, and model names
    resolve.

    Returns:
        The dataset's facts.
    """
    from qtemperate.models import MODELS

    info = dataset_info(recipe.data.name, recipe.data.kwargs)
    if check_data:
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
