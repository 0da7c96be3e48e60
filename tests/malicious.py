"""Armed pickles for the malicious-file tests: loading one with plain pickle runs code.

The payload's ``__reduce__`` makes the unpickler call ``exec`` on a statement that
creates a marker file, so a test can tell whether anything ran: the marker must never
appear when qtemperate reads the file. :func:`test_payloads_are_armed` (in
``tests/test_checkpoint.py``) checks that plain ``pickle.load`` does create it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Evil:
    """Unpickling this runs ``open(marker, 'w').close()`` (arbitrary code, in general)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def evil_torch_file(path: Path, marker: Path, layout: str = "state_dict") -> Path:
    """A ``torch.save`` file whose payload sits where qtemperate looks first.

    Args:
        layout: ``"state_dict"`` (``{"state_dict": {"w": Evil}}``), ``"top"`` (the
            whole object is the payload) or ``"checkpoint"`` (a training checkpoint's keys).
    """
    evil = Evil(marker)
    payload: Any
    if layout == "top":
        payload = evil
    elif layout == "checkpoint":
        payload = {"progress": evil, "scheduler": {}, "stage_index": 0, "model": {}, "optimizer": {}, "rng": {}}
    else:
        payload = {"state_dict": {"w": torch.zeros(1), "x": evil}, "model": "small_cnn", "kwargs": {}}
    torch.save(payload, path)
    return path


def evil_plain_pickle(path: Path, marker: Path) -> Path:
    """A raw pickle (not a torch zip file): torch.load's legacy path."""
    path.write_bytes(pickle.dumps({"state_dict": Evil(marker)}, protocol=2))
    return path


def evil_cifar_batch(path: Path, marker: Path) -> Path:
    """A CIFAR batch whose dict carries the payload beside real-looking arrays."""
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"batch_label": Evil(marker)}
    path.write_bytes(pickle.dumps(batch))
    return path
