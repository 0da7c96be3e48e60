"""A dataset with targets beyond the class label, and the synthetic detection blobs.

:class:`NamedTargetsDataset` is an in-memory dataset whose samples are
``(x, {"labels": y, "boxes": b, ...})``: the class labels stay its second tensor (so
class-balanced limits, stratified splits and class counts work unchanged) and every
further tensor is a target with a name. Collated, a batch's targets are a dict of
tensors, which :class:`qtemperate.heads.Task` reads by name.

``synthetic_detection`` draws one object per image whose class and box are known
exactly: class ``c`` is a shape (0: filled square, 1: hollow frame, 2: plus sign,
3: diagonal cross, 4: checkerboard; ``num_classes`` ≤ 5) of seeded random size and
position on a noisy background; the box target is ``(cx, cy, w, h)`` of the shape's
bounding box in units of the image size (in ``[0, 1]``). A toy detector (class and box
heads) learns both in seconds on a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from qtemperate.data.datasets import DATASETS, DatasetInfo, DatasetSpec, RawSplits, _pair

__all__ = ["DETECTION_DEFAULTS", "DETECTION_SHAPES", "NamedTargetsDataset", "draw_shape"]

DETECTION_SHAPES = ("square", "frame", "plus", "cross", "checker")
"""The shape of each class of ``synthetic_detection``, in class order."""

DETECTION_DEFAULTS: dict[str, Any] = {
    "num_classes": 3,
    "image_size": 24,
    "n_train": 512,
    "n_test": 128,
    "noise": 0.2,
    "min_size": 6,
    "max_size": 14,
}
"""Default options of ``synthetic_detection``."""


class NamedTargetsDataset(TensorDataset):
    """``TensorDataset(x, labels, *more)`` whose items are ``(x, {name: tensor})``.

    Args:
        names: One name per tensor after ``x``; the first must be ``"labels"`` (the
            class labels, read by splits and class counts).
        *tensors: ``x`` then the targets, all with the same first dimension.

    Raises:
        ValueError: mismatched names, or a first target not called ``labels``.
    """

    def __init__(self, names: Sequence[str], *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        names = tuple(names)
        if len(names) != len(tensors) - 1 or not names or names[0] != "labels":
            raise ValueError(f"names must be 'labels' then one name per further target, got {names}")
        self.target_names = names

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        x, *targets = (t[index] for t in self.tensors)
        return x, dict(zip(self.target_names, targets))

    def with_tensors(self, *tensors: torch.Tensor) -> NamedTargetsDataset:
        """The same kind of dataset over other tensors (subsets, normalisation)."""
        return NamedTargetsDataset(self.target_names, *tensors)


def draw_shape(kind: int, h: int, w: int) -> torch.Tensor:
    """A ``(h, w)`` mask of shape ``kind`` filling its box (see the module docstring)."""
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(1, w)
    if kind == 0:  # filled square
        return torch.ones(h, w)
    if kind == 1:  # frame, 2 px thick
        inner = (ys >= 2) & (ys < h - 2) & (xs >= 2) & (xs < w - 2)
        return (~inner).float()
    if kind == 2:  # plus sign
        return (((ys - (h - 1) / 2).abs() <= 1) | ((xs - (w - 1) / 2).abs() <= 1)).float()
    if kind == 3:  # diagonal cross
        u, v = ys / max(h - 1, 1), xs / max(w - 1, 1)
        return (((u - v).abs() <= 0.12) | ((u + v - 1).abs() <= 0.12)).float()
    if kind == 4:  # checkerboard of 2-px cells
        return (((ys // 2) + (xs // 2)) % 2 == 0).float()
    raise ValueError(f"unknown shape {kind}; there are {len(DETECTION_SHAPES)}")


def _detection_info(
    num_classes: int = DETECTION_DEFAULTS["num_classes"],
    image_size: int | Sequence[int] = DETECTION_DEFAULTS["image_size"],
    **_: Any,
) -> DatasetInfo:
    return DatasetInfo(int(num_classes), 1, _pair(image_size), targets=("labels", "boxes"))


def _build_detection(
    root: str | os.PathLike[str] | None,
    seed: int,
    num_classes: int = DETECTION_DEFAULTS["num_classes"],
    image_size: int | Sequence[int] = DETECTION_DEFAULTS["image_size"],
    n_train: int = DETECTION_DEFAULTS["n_train"],
    n_test: int = DETECTION_DEFAULTS["n_test"],
    noise: float = DETECTION_DEFAULTS["noise"],
    min_size: int = DETECTION_DEFAULTS["min_size"],
    max_size: int = DETECTION_DEFAULTS["max_size"],
) -> RawSplits:
    """One shape per image on noise; targets ``labels`` and ``boxes`` (see the module docstring)."""
    hh, ww = _pair(image_size)
    if not 2 <= num_classes <= len(DETECTION_SHAPES):
        raise ValueError(f"synthetic_detection: num_classes must be 2..{len(DETECTION_SHAPES)}, got {num_classes}")
    if not 3 <= min_size <= max_size <= min(hh, ww):
        raise ValueError(f"synthetic_detection: need 3 <= min_size <= max_size <= image size, got "
                         f"{min_size}, {max_size} for {hh}x{ww}")
    if n_train < 1 or n_test < 1:
        raise ValueError("synthetic_detection: n_train and n_test must be >= 1")
    gen = torch.Generator().manual_seed(seed)

    def sample(n: int) -> NamedTargetsDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        x = noise * torch.randn(n, 1, hh, ww, generator=gen)
        boxes = torch.empty(n, 4)
        for i in range(n):
            bh, bw = (int(v) for v in torch.randint(min_size, max_size + 1, (2,), generator=gen))
            top = int(torch.randint(0, hh - bh + 1, (1,), generator=gen))
            left = int(torch.randint(0, ww - bw + 1, (1,), generator=gen))
            x[i, 0, top:top + bh, left:left + bw] += draw_shape(int(labels[i]), bh, bw)
            boxes[i] = torch.tensor([(left + bw / 2) / ww, (top + bh / 2) / hh, bw / ww, bh / hh])
        return NamedTargetsDataset(("labels", "boxes"), x, labels.long(), boxes)

    train, test = sample(n_train), sample(n_test)
    return RawSplits(train, test, num_classes, 1, (hh, ww), (0.0,), (1.0,), scale=None)


DATASETS.register(
    "synthetic_detection",
    DatasetSpec(_build_detection, None, info=_detection_info,
                description="seeded shapes with known class and box (targets: labels, boxes)"),
)
