"""Checks that run before any training: files exist, shapes and class counts agree.

Schema problems are caught by :mod:`qtemperate.recipe`; this module checks the
world the recipe points at (data folders, checkpoints, the teacher's class count),
so a bad run fails in a second with one line naming the field or file, and never
after an hour of training.

The models are built as a run builds them (import paths resolved from the recipe's
folder and the working directory, each factory given only the keyword arguments it
takes) and each runs one forward pass of a batch shaped like the data
(:func:`qtemperate.training.architecture.check_model`): a bad import path, a missing
factory, an incompatible signature or a model that does not fit the data is reported
here, by ``validate --check-files`` and by ``run`` before its run folder exists.
Checkpoints are read as data only
(:func:`qtemperate.checkpoint.load_checkpoint`): nothing in a file runs.

:func:`check_bundle` checks the data once it is loaded (labels inside the class
range) and :func:`degenerate_settings` lists settings that work but are unlikely to
be meant (a batch larger than the dataset, a handful of images, 2-bit stages): the
run prints them as warnings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qtemperate.checkpoint import (
    STATE_DICT_HINT,
    check_state_dict,
    load_checkpoint,
    state_dict_from,
)
from qtemperate.data import DataBundle, DatasetOptionError, check_data_available
from qtemperate.data import DatasetInfo as DatasetInfo
from qtemperate.data import dataset_info as _dataset_info
from qtemperate.errors import BadInput, CheckpointError, DataFormatError
from qtemperate.recipe import Recipe, RecipeError

__all__ = [
    "DatasetInfo",
    "ProtocolWarning",
    "check_bundle",
    "check_models",
    "check_validation_split",
    "dataset_info",
    "degenerate_settings",
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
    folder/files exist (no downloads), the teacher checkpoint exists and loads as data
    (a pickled model is refused, saying how to save a state dict), its classifier
    width equals the dataset's class count (as the dataset states it for these
    options, e.g. 20 for cifar100 ``label_mode: coarse``), every key and shape of it
    fits ``teacher.model`` built for the data, an explicit ``num_classes`` in
    teacher/student kwargs agrees with the data, and the models build and fit the data
    (:func:`check_models`).

    Returns:
        The dataset's facts.
    """
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
    check_models(recipe, info)
    ckpt = recipe.teacher.checkpoint
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise RecipeError(f"teacher.checkpoint: file not found: {path}")
        what = "teacher.checkpoint"
        try:
            state = state_dict_from(load_checkpoint(path, what=what, hint=STATE_DICT_HINT), path, what)
        except CheckpointError as exc:  # already names the field; a recipe error like the others
            raise RecipeError(str(exc)) from None
        width = _classifier_outputs(state)
        if width is not None and width != info.num_classes:
            raise RecipeError(
                f"teacher.checkpoint: classifier has {width} outputs but data "
                f"{recipe.data.name!r} has {info.num_classes} classes ({path})"
            )
        _check_teacher_fits(recipe, info, state, path)
    return info


def check_models(recipe: Recipe, info: DatasetInfo) -> None:
    """Build the teacher (and ``student.model``) as a run would and check they fit.

    Each model runs one forward pass of a batch shaped like the data; the outputs must
    match the class count, or, with a ``task`` section, hold the scored head and every
    head the recipe names (``task.losses``, ``distillation.head_temperatures`` /
    ``head_weights``); a student with its own architecture must have the teacher's
    heads with the same shapes where they are distilled. Pruning a multi-output model
    is refused (the pruner would prune its output heads).

    Raises:
        RecipeError: naming the field (``teacher.model``, ``student.kwargs.depth``,
            ``task.accuracy_head``, ``distillation.head_weights`` ...).
    """
    from qtemperate.heads import Task
    from qtemperate.training.architecture import build_recipe_model, check_model

    task = Task.from_recipe(recipe)
    data = repr(recipe.data.name)
    teacher = build_recipe_model(recipe, "teacher", info.num_classes, info.in_channels)
    t_out = check_model(teacher, info, task, "teacher", data)
    if not task.multi_head:
        if recipe.student.model is not None:
            check_model(build_recipe_model(recipe, "student", info.num_classes, info.in_channels),
                        info, task, "student", data)
        return
    d = recipe.distillation
    heads = ", ".join(t_out)
    for key in ("head_temperatures", "head_weights"):
        for head in getattr(d, key) or {}:
            if head not in t_out:
                raise RecipeError(f"distillation.{key}.{head}: {head!r} is not a head of teacher.model ({heads})")
    weights = d.head_weights or {}
    distilled = [h for h in t_out if weights.get(h, 1.0) > 0]
    if not distilled:
        raise RecipeError("distillation.head_weights: every head has weight 0, so nothing is distilled")
    s = recipe.student
    if s.model is None or s.prune_ratio is not None or s.target_size_ratio is not None:
        raise RecipeError(
            "student: pruning a multi-output model is not supported (the pruner keeps only the last "
            "layer's outputs and would prune output heads); give the student its own architecture "
            "(student.model) without prune_ratio / target_size_ratio"
        )
    s_out = check_model(build_recipe_model(recipe, "student", info.num_classes, info.in_channels),
                        info, task, "student", data)
    if set(s_out) != set(t_out):
        raise RecipeError(f"student.model: heads ({', '.join(s_out)}) differ from the teacher's ({heads})")
    for head in distilled:
        if s_out[head].shape != t_out[head].shape:
            raise RecipeError(
                f"student.model: head {head!r} has shape {tuple(s_out[head].shape)} but the teacher's has "
                f"{tuple(t_out[head].shape)}; a distilled head needs the same shape "
                f"(or give it distillation.head_weights.{head}: 0)"
            )
def _check_teacher_fits(recipe: Recipe, info: DatasetInfo, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every key and shape of the teacher checkpoint fits ``teacher.model`` for this data."""
    from qtemperate.training.architecture import build_recipe_model

    t = recipe.teacher
    model = build_recipe_model(recipe, "teacher", info.num_classes, info.in_channels)
    try:
        check_state_dict(model, state, f"teacher.checkpoint: {path}")
    except BadInput as exc:
        raise RecipeError(f"{exc} (teacher.model {t.model!r}, kwargs {dict(t.kwargs)})") from None


SMALL_PER_CLASS = 10
"""Fewer training images per class than this is "a handful": the run warns."""


def degenerate_settings(recipe: Recipe, train_size: int | None = None) -> list[str]:
    """Settings that run but are unlikely to be meant, one message each.

    Args:
        recipe: The recipe.
        train_size: Training samples, once the data is loaded (``None``: recipe-only checks).
    """
    out = []
    for i, st in enumerate(recipe.stages):
        if st.quantized and min(st.weight_bits, st.act_bits) <= 2:
            out.append(
                f"stages.{i}: W{st.weight_bits}A{st.act_bits}: 2-bit stages rarely keep a useful "
                "accuracy; expect a large drop"
            )
    if train_size is not None:
        b = recipe.data.batch_size
        if b > train_size:
            out.append(f"data.batch_size {b} is larger than the {train_size} training samples: "
                       "one partial batch per epoch")
        info = dataset_info(recipe.data.name, recipe.data.kwargs)
        if train_size < SMALL_PER_CLASS * info.num_classes:
            out.append(f"only {train_size} training samples for {info.num_classes} classes: "
                       "accuracy figures will mostly be noise")
    return out


def check_bundle(recipe: Recipe, bundle: DataBundle) -> list[str]:
    """Check loaded data; return the :func:`degenerate_settings` warnings.

    Raises:
        DataFormatError: labels outside ``0..num_classes-1`` in a split (named).
    """
    from qtemperate.data import dataset_targets

    for split, ds in (("train", bundle.train), ("test", bundle.test), ("validation", bundle.val)):
        if ds is None:
            continue
        try:
            y = dataset_targets(ds)
        except TypeError:  # a lazy dataset without a label list: not checkable without reading it all
            continue
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= bundle.num_classes):
            bad = y[(y < 0) | (y >= bundle.num_classes)]
            raise DataFormatError(
                f"data: {split} labels include {int(bad[0])} ({bad.numel()} samples) but dataset "
                f"{recipe.data.name!r} has {bundle.num_classes} classes (0..{bundle.num_classes - 1})"
            )
    return degenerate_settings(recipe, len(bundle.train))
