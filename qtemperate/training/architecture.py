"""Building a recipe's model for its data: the class count and channels come from the dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qtemperate.models import build_model

__all__ = ["build_for_data"]


def build_for_data(
    name: str,
    kwargs: Mapping[str, Any],
    num_classes: int,
    in_channels: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """``build_model(name, num_classes=..., in_channels=..., **kwargs)`` on ``device``.

    The recipe's own ``kwargs`` win over the dataset facts (preflight has already
    checked that an explicit ``num_classes`` agrees with the data).
    """
    merged = {"num_classes": num_classes, "in_channels": in_channels, **dict(kwargs)}
    return build_model(name, **merged).to(device)
