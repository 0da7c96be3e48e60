"""Which device a run trains on."""

from __future__ import annotations

import os

import torch

from qtemperate.recipe import RecipeError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is an error.

    Under a launcher (torchrun sets ``LOCAL_RANK``) a CUDA run takes the GPU of its
    local rank, ``cuda:LOCAL_RANK``: one process per GPU.

    Raises:
        RecipeError: (a ``ValueError``) ``cuda`` requested on a machine without CUDA, or a local rank
            without a GPU of its own.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda requested but CUDA is not available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise RecipeError(f"device: cuda for local rank {local}, but this machine has {count} GPU(s); "
                             f"start at most {count} processes per node")
        return torch.device("cuda", local)
    return torch.device(name)
