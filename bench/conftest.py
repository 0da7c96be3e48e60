"""Shared fixtures of the benchmarks (``pytest bench --benchmark-only``).

Benchmarks are not part of the test suite (``testpaths = ["tests"]``). They pin
torch to 2 threads (the reference machine has 2 cores), run W&B offline, and use
real Fashion-MNIST images (Debian's ``dataset-fashion-mnist`` or
``$QTEMPERATE_FASHION_MNIST``); a test is skipped when the data is missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

THREADS = int(os.environ.get("QTEMPERATE_BENCH_THREADS", max(1, min(2, os.cpu_count() or 1))))
torch.set_num_threads(THREADS)

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """Hardware and versions, recorded next to every figure."""
    import brevitas
    import onnxruntime
    import torch_pruning

    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "brevitas": brevitas.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": torch_pruning.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the environment attached."""
    return write_json(RESULTS / f"{name}.json", payload)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``{"environment": ..., **payload}`` to ``path`` (folders created) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


@pytest.fixture(scope="session")
def fashion() -> Any:
    """Fashion-MNIST: 4096 training images (class-balanced slice) and 512 test images."""
    from qtemperate.data import build_datasets

    try:
        return build_datasets("fashion_mnist", limit_train=4096, limit_test=512, seed=0)
    except FileNotFoundError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="session")
def fashion_batch(fashion: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch of 128 images (1x28x28) and labels."""
    xs, ys = zip(*(fashion.train[i] for i in range(128)))
    return torch.stack(xs), torch.tensor([int(y) for y in ys])


@pytest.fixture(scope="session")
def calib_batches(fashion: Any) -> list[torch.Tensor]:
    """Eight calibration batches of 64 training images."""
    xs = torch.stack([fashion.train[i][0] for i in range(512)])
    return list(xs.split(64))


@pytest.fixture(scope="session")
def result_writer() -> Any:
    """``write_result(name, payload)`` for benchmarks (conftest is not importable by name)."""
    return write_result
