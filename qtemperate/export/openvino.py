"""OpenVINO: run, verify and time the same QDQ ONNX file onnxruntime runs.

OpenVINO reads qtemperate's QDQ graph directly and compiles its convolutions and fully
connected layers to int8 kernels (oneDNN) — on x86 CPUs without VNNI it was the faster
int8 route (issue 8: 1.8-2.1x float at batch 64). Its compiled graph says which layers
run in int8 (:func:`openvino_int8_layers`).

Settings: ``INFERENCE_PRECISION_HINT = f32`` (on CPUs with bf16/AMX OpenVINO would
otherwise run the float parts in bf16, and the comparison would measure that instead
of the int8 kernels), a static batch per compiled model, and the ``LATENCY``
performance hint. Everything here needs the ``openvino`` extra
(``pip install 'qtemperate[openvino]'``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtemperate.export.runtime import (
    OutputAgreement,
    check_timing_args,
    compare_with_pytorch,
    median_ms,
)

__all__ = [
    "OPENVINO_EXTRA",
    "benchmark_openvino",
    "openvino_available",
    "openvino_int8_layers",
    "verify_openvino",
]

OPENVINO_EXTRA = "pip install 'qtemperate[openvino]'"
_INT8 = {"u8", "i8", "I8", "U8"}


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(f"the OpenVINO checks need the openvino package: {OPENVINO_EXTRA}") from None
    return ov.Core()


def _compile(core: Any, path: str | Path, batch: int, threads: int | None) -> Any:
    model = core.read_model(str(path))
    inp = model.inputs[0]
    shape = [batch, *[d.get_length() for d in list(inp.get_partial_shape())[1:]]]
    model.reshape({inp.get_any_name(): shape})
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(model, "CPU", config)


def _runner(core: Any, path: str | Path) -> Any:
    compiled: dict[int, Any] = {}

    def run(x: np.ndarray) -> list[np.ndarray]:
        n = int(x.shape[0])
        if n not in compiled:
            compiled[n] = _compile(core, path, n, None)
        res = compiled[n].create_infer_request().infer({0: x})
        return [np.asarray(res[o]) for o in compiled[n].outputs]

    return run


def verify_openvino(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor,
    classification_outputs: Sequence[str] | None = None,
) -> dict[str, OutputAgreement]:
    """Run the ONNX file in OpenVINO (CPU) and ``model`` in PyTorch; compare per output.

    Raises:
        ImportError: naming the ``openvino`` extra when it is not installed.
    """
    core = _core()
    return compare_with_pytorch(model, inputs, {"openvino": _runner(core, path)},
                                classification_outputs)["openvino"]


def benchmark_openvino(
    path: str | Path,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    iters: int = 30,
    threads: int | None = None,
) -> dict[int, float]:
    """Median OpenVINO CPU latency (ms per batch) for each batch size, standard normal input.

    Raises:
        ImportError: naming the ``openvino`` extra when it is not installed.
        ValueError: for non-positive ``iters``/batch sizes/threads or negative ``warmup``.
    """
    check_timing_args(batch_sizes, warmup, iters)
    core = _core()
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batch_sizes:
        compiled = _compile(core, path, int(b), threads)
        req = compiled.create_infer_request()
        x = rng.standard_normal(tuple(compiled.inputs[0].get_shape())).astype(np.float32)
        out[int(b)] = median_ms(lambda req=req, x=x: req.infer({0: x}), warmup, iters)
    return out


def openvino_int8_layers(path: str | Path) -> dict[str, int]:
    """How many convolution / fully connected layers OpenVINO's compiled graph runs in int8.

    Returns:
        ``{"int8": n, "float": m}`` over the compiled ``Convolution``, ``FullyConnected``,
        ``MatMul`` and ``Deconvolution`` layers (their ``runtimePrecision``).
    """
    core = _core()
    runtime = _compile(core, path, 1, 1).get_runtime_model()
    counts: Counter[str] = Counter()
    for op in runtime.get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind not in ("Convolution", "FullyConnected", "MatMul", "Deconvolution"):
            continue
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        counts["int8" if prec in _INT8 else "float"] += 1
    return {"int8": counts["int8"], "float": counts["float"]}
