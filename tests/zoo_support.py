"""timm for the model-zoo tests, importable beside a CPU-only torch."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

_keep: list[torch.library.Library] = []  # a Library's definitions live as long as it does


def import_timm() -> ModuleType:
    """timm, or ``pytest.skip`` naming why not.

    timm imports torchvision; a torchvision wheel built for CUDA cannot register its native
    ``nms`` beside a CPU torch and its import fails. Defining the two operator schemas it
    looks up (never called by these tests) lets the import go through.
    """
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keep.append(lib)
    try:
        import timm
    except ImportError as exc:
        pytest.skip(f"timm is not installed ({exc})")
    return timm
