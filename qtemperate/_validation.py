"""Small argument checks shared by the losses and the schedules (one message style)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_number", "positive_number"]


def finite_number(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite real number (bools rejected), else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def positive_number(value: Any, name: str) -> float:
    """``float(value)`` if it is finite and > 0, else ``ValueError`` naming ``name``."""
    try:
        v = finite_number(value, name)
    except ValueError:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if v <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v
