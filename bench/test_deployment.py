"""Deployment: exported student (pruned + W8A8 / W4A4) vs float student vs float teacher.

Run: ``pytest bench/test_deployment.py --benchmark-only``

ResNet-20 at Fashion-MNIST scale (1x28x28). Training is not needed for latency, so the
teacher is an untrained ``resnet20(in_channels=1)``; the student is that teacher
pruned to 1/2 of the parameters (:func:`qtemperate.prune`, BN re-estimated on real
images), then quantized W8A8 or W4A4 *with calibration* on Fashion-MNIST images
(:func:`qtemperate.quantize`), and everything is exported with
:func:`qtemperate.export_onnx` (QCDQ; packed INT4 weights for W4A4).

* ``test_latency[<model>-b<batch>]``: ``InferenceSession.run`` at batch 1 and 64,
  onnxruntime CPU provider, all graph optimizations, 2 intra-op threads;
* ``test_export_and_bytes``: times the W4A4 export and records, for every model, the
  ONNX file bytes next to ``model_size(...)`` (float bytes and the params × bits
  limit ``quantized_bytes``), the onnxruntime/PyTorch agreement and the op types
  onnxruntime runs after fusion (QLinearConv ⇒ integer kernels).

Results: ``bench/results/deployment.json``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qtemperate import build_model, export_onnx, model_size, prune, quantize, verify_onnx

MODELS = ("teacher_float", "student_float", "student_w8a8", "student_w4a4")
BATCHES = (1, 64)
_RESULTS: dict[str, Any] = {"latency_ms_median": {}, "latency_ms_mean": {}, "models": {}}


class _Deploy:
    def __init__(self, folder: Path, calib: list[torch.Tensor]) -> None:
        torch.manual_seed(0)
        example = calib[0][:1]
        teacher = build_model("resnet20", num_classes=10, in_channels=1).eval()
        student, report = prune(teacher, example, target_params_ratio=0.5, calibration_loader=calib)
        student.eval()
        w8 = quantize(student, 8, 8, calibration_loader=calib, calibration_batches=8).eval()
        w4 = quantize(student, 4, 4, calibration_loader=calib, calibration_batches=8).eval()
        self.torch_models = {"teacher_float": teacher, "student_float": student,
                             "student_w8a8": w8, "student_w4a4": w4}
        self.example = example
        self.prune_ratio = report.achieved_ratio
        self.paths = {name: export_onnx(m, folder / f"{name}.onnx", example)
                      for name, m in self.torch_models.items()}
        self.folder = folder


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory, calib_batches: list[torch.Tensor]) -> _Deploy:
    return _Deploy(tmp_path_factory.mktemp("deploy"), calib_batches)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("name", MODELS)
def test_latency(benchmark: Any, deploy: _Deploy, name: str, batch: int, result_writer: Any) -> None:
    """onnxruntime latency of one model at one batch size."""
    sess = _session(deploy.paths[name])
    inp = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    rounds = 200 if batch == 1 else 30
    benchmark.pedantic(sess.run, args=(None, {inp: x}), rounds=rounds, iterations=1, warmup_rounds=5)
    _RESULTS["latency_ms_median"].setdefault(name, {})[str(batch)] = benchmark.stats.stats.median * 1e3
    _RESULTS["latency_ms_mean"].setdefault(name, {})[str(batch)] = benchmark.stats.stats.mean * 1e3
    lat = _RESULTS["latency_ms_median"]
    if "student_float" in lat:
        _RESULTS["speedup_vs_student_float"] = {
            m: {b: lat["student_float"][b] / v for b, v in d.items() if b in lat["student_float"]}
            for m, d in lat.items()
        }
    if "teacher_float" in lat:
        _RESULTS["speedup_vs_teacher_float"] = {
            m: {b: lat["teacher_float"][b] / v for b, v in d.items() if b in lat["teacher_float"]}
            for m, d in lat.items()
        }
    result_writer("deployment", _RESULTS)


def test_export_and_bytes(
    benchmark: Any, deploy: _Deploy, fashion: Any, result_writer: Any
) -> None:
    """W4A4 export time; ONNX bytes vs model_size for every model."""
    from qtemperate.export import optimized_op_types

    w4 = deploy.torch_models["student_w4a4"]
    out = deploy.folder / "bench_export_w4a4.onnx"
    benchmark.pedantic(export_onnx, args=(w4, out, deploy.example), rounds=3, iterations=1)
    xs = torch.stack([fashion.test[i][0] for i in range(256)])
    _RESULTS["student_prune_ratio_params"] = deploy.prune_ratio
    for name, model in deploy.torch_models.items():
        size = model_size(model, deploy.example)
        path = deploy.paths[name]
        onnx_bytes = path.stat().st_size
        rep = verify_onnx(path, model, xs)
        ops = optimized_op_types(path)
        _RESULTS["models"][name] = {
            "params": size.params,
            "macs": size.macs,
            "float_bytes": size.float_bytes,
            "quantized_bytes_limit": size.quantized_bytes,
            "onnx_bytes": onnx_bytes,
            "onnx_over_limit": onnx_bytes / size.quantized_bytes,
            "onnx_top1_agreement": rep.top1_agreement,
            "onnx_max_abs_diff": rep.max_abs_diff,
            "ort_op_types": dict(Counter(ops).most_common()),
        }
    result_writer("deployment", _RESULTS)
