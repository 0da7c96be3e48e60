"""Atomic checkpoints and the student file format.

Every write goes to a temporary file in the destination folder and is moved into
place with :func:`os.replace`, so a run killed mid-write leaves the previous
checkpoint intact.

A quantized Brevitas model is not stored as a pickle (its quantizer injectors are
classes built at run time); ``student.pt`` instead holds the pruned float
architecture, the quantization settings and the state dict, and
:func:`load_student` rebuilds the model from them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.bits import FLOAT_BITS

__all__ = ["load_checkpoint", "load_student", "save_atomic", "save_student"]

STUDENT_FORMAT = "qtemperate.student/1"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_atomic` (may contain pickled modules)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location=map_location, weights_only=False)


def save_student(
    path: str | Path,
    arch: nn.Module,
    model: nn.Module,
    weight_bits: int,
    act_bits: int,
    first_last_bits: int,
    per_channel: bool,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``student.pt``: float architecture + quantization settings + weights.

    Args:
        arch: The (pruned) float model the student was quantized from.
        model: The trained student (quantized, or float when bits are 32).
    """
    payload = {
        "format": STUDENT_FORMAT,
        "arch": arch,
        "state_dict": model.state_dict(),
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "first_last_bits": first_last_bits,
        "per_channel": per_channel,
        "extra": extra or {},
    }
    return save_atomic(payload, path)


def load_student(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved by :func:`save_student`.

    Returns:
        The model in eval mode and the payload's metadata (bits, extra).
    """
    from qtemperate.quantization import quantize  # heavy import, only when needed

    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{path}: not a qtemperate student file")
    arch = payload["arch"]
    if payload["weight_bits"] == FLOAT_BITS:
        model = arch
    else:
        model = quantize(
            arch,
            weight_bits=payload["weight_bits"],
            act_bits=payload["act_bits"],
            first_last_bits=payload["first_last_bits"],
            per_channel=payload["per_channel"],
        )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("arch", "state_dict")}
    return model, meta
