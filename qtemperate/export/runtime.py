"""onnxruntime: run an exported file, compare it with PyTorch, time it, list the ops it runs."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qtemperate.export.onnx import model_device

__all__ = ["VerifyReport", "benchmark_onnx", "optimized_op_types", "verify_onnx"]

def _session(path: str | Path, threads: int | None = None, optimized_path: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimized_op_types(path: str | Path) -> Counter[str]:
    """Op-type counts of the graph onnxruntime actually runs after all graph optimizations.

    Used to check that a QCDQ model is fused into integer kernels (``QLinearConv``,
    ``QLinearAdd``, ...) rather than running float ops between Q/DQ pairs.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        _session(path, threads=1, optimized_path=out)
        model = onnx.load(out)
    return Counter(n.op_type for n in model.graph.node)


@dataclass(frozen=True)
class VerifyReport:
    """Agreement between onnxruntime and PyTorch on the same inputs.

    Attributes:
        max_abs_diff: ``max |y_onnx - y_torch|`` over all outputs.
        top1_agreement: fraction of samples whose argmax agrees.
        n: number of samples compared.
    """

    max_abs_diff: float
    top1_agreement: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain-dict view (for logging)."""
        return asdict(self)


def _as_batches(inputs: torch.Tensor | Iterable) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    batches = [b[0] if isinstance(b, list | tuple) else b for b in inputs]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ValueError(
            "inputs must be a tensor or a non-empty iterable of tensors / (x, y) batches"
        )
    return batches


def verify_onnx(
    path: str | Path, model: nn.Module, inputs: torch.Tensor | Iterable
) -> VerifyReport:
    """Run the ONNX file in onnxruntime and ``model`` in PyTorch eval mode on ``inputs``.

    Args:
        path: ONNX file from :func:`export_onnx`.
        model: the PyTorch model that was exported.
        inputs: a batch tensor, or an iterable of tensors / ``(x, y)`` batches.

    Returns:
        A :class:`VerifyReport` (max abs logit difference, top-1 agreement, sample count).
    """
    sess = _session(path)
    name = sess.get_inputs()[0].name
    device = model_device(model)
    was_training = model.training
    model.eval()
    max_diff, agree, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x in _as_batches(inputs):
                ref = model(x.to(device)).float().cpu().numpy()
                got = sess.run(None, {name: x.detach().cpu().float().numpy()})[0]
                max_diff = max(max_diff, float(np.abs(got - ref).max()))
                agree += int((got.argmax(1) == ref.argmax(1)).sum())
                n += x.shape[0]
    finally:
        model.train(was_training)
    return VerifyReport(max_abs_diff=max_diff, top1_agreement=agree / max(n, 1), n=n)


def _input_shape(sess: Any, batch: int) -> tuple[int, ...]:
    inp = sess.get_inputs()[0]
    shape = list(inp.shape)
    if not shape:
        raise ValueError("ONNX model input has no shape")
    dims = []
    for k, d in enumerate(shape):
        if k == 0:
            dims.append(batch)
        elif isinstance(d, int) and d > 0:
            dims.append(d)
        else:
            raise ValueError(
                f"ONNX input {inp.name!r} has a dynamic non-batch dimension {k}: {d!r}"
            )
    return tuple(dims)


def benchmark_onnx(
    path: str | Path,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    iters: int = 30,
    threads: int | None = None,
) -> dict[int, float]:
    """Median onnxruntime latency (milliseconds per batch) for each batch size.

    The input shape is read from the ONNX graph input (dim 0 = batch, must be dynamic or
    equal to the requested batch); the input is standard normal float32.

    Args:
        path: ONNX file.
        batch_sizes: batch sizes to time.
        warmup: untimed runs per batch size (>= 0).
        iters: timed runs per batch size (>= 1).
        threads: onnxruntime intra-op threads; None = onnxruntime default (all cores).

    Returns:
        ``{batch_size: median_ms}``.

    Raises:
        ValueError: for non-positive ``iters``/batch sizes or negative ``warmup``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    sess = _session(path, threads=threads)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batch_sizes:
        x = rng.standard_normal(_input_shape(sess, int(b))).astype(np.float32)
        for _ in range(warmup):
            sess.run(None, {name: x})
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            times.append((time.perf_counter() - t0) * 1e3)
        out[int(b)] = statistics.median(times)
    return out

