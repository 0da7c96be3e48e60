"""Seeding and the RNG state a checkpoint carries (exact resume).

The state is plain data (ints, tuples, tensors), so a checkpoint holding it loads
with ``torch.load(weights_only=True)``: NumPy's Mersenne-Twister keys are kept as an
``int64`` tensor rather than a pickled ``ndarray``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["phase_seed", "rng_state", "seed_all", "set_rng_state"]


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def phase_seed(seed: int, phase: str) -> int:
    """A seed for one phase of a run (``"student"``, ``"stages"``), a pure function of
    ``(seed, phase)``: a run resumed at the start of a phase draws exactly what an
    uninterrupted run draws there, whatever happened before."""
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(phase))) % (2**31)


def rng_state() -> dict[str, Any]:
    """The state of every generator the run draws from, as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
