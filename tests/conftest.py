"""Shared test settings: offline W&B, quiet, and small thread counts."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _torchvision_ops_schemas() -> None:
    """Environment workaround, tests and bench only: PyPI's torchvision wheel is a CUDA build
    whose native ops cannot load beside the CPU torch wheel, and ``import torchvision`` (which
    timm and Lightning do) then dies with ``operator torchvision::nms does not exist``. Declaring
    the two operator schemas its fake-tensor registrations need lets the Python package import;
    its detection ops keep no kernel and fail loudly if called. qtemperate never imports it."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - the native library loaded: nothing to do
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


_KEEP: list[object] = []
_torchvision_ops_schemas()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as standardised (N, 1, 8, 8) tensors: 1200 train, 597 test (seeded)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope="session")
def offline_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real 4-point sweep through the CLI: tiny runs, W&B offline, ONNX exported and timed.

    Returns ``{"recipe": path, "folder": sweep folder, "rc": exit code, "out": stdout}``.
    """
    import contextlib
    import io

    import yaml

    from qtemperate.cli import main
    from tests.pipeline_helpers import SHORT_TEACHER, tiny_recipe

    tmp = tmp_path_factory.mktemp("sweep")
    raw = tiny_recipe(
        tmp, teacher=SHORT_TEACHER, tracking={"loggers": ["jsonl", "wandb"], "mode": "offline"},
        export={"onnx": True, "verify_samples": 64, "batch_sizes": [1], "benchmark_iters": 2},
    )
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    argv = ["sweep", str(path), "--grid", "student.target_size_ratio=0.125,0.25",
            "--grid", "distillation.kd_weight=0.5,0.9", "--name", "grid4", "--no-progress"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return {"recipe": path, "folder": tmp / "runs" / "grid4", "rc": rc, "out": out.getvalue(), "argv": argv}
