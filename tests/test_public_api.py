"""The public API: every exported name resolves; the light core stays light."""

from __future__ import annotations

import subprocess
import sys

import qtemperate


def test_every_exported_name_resolves() -> None:
    for name in qtemperate.__all__:
        assert getattr(qtemperate, name) is not None, name


def test_issue_contract_names_are_exported() -> None:
    contract = {
        "kd_loss", "multi_scale_kd_loss", "TemperateLoss", "ConstantTemperature", "TemperateSchedule",
        "GradientNormTemperature", "to_lookup_table", "LookupTableTemperature", "suggest_initial_temperature",
        "build_model", "prune", "quantize", "set_bit_width", "model_size", "export_onnx", "verify_onnx",
        "benchmark_onnx", "JointScheduler",
    }
    assert contract <= set(qtemperate.__all__)


def test_import_does_not_pull_heavy_dependencies() -> None:
    code = (
        "import sys, qtemperate; "
        "print(','.join(m for m in ('brevitas', 'torch_pruning', 'wandb', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
