"""The optimizer a recipe asks for (SGD with Nesterov momentum, or AdamW)."""

from __future__ import annotations

import torch
from torch import nn

from qtemperate.recipe import OptimizerConfig

__all__ = ["build_optimizer"]


def build_optimizer(model: nn.Module, config: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``model`` at learning rate ``lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov and config.momentum > 0,
    )
