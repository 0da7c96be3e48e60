"""onnxruntime: run an exported file, compare it with PyTorch, time it, list the ops it runs."""

from __future__ import annotations

import re
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qtemperate.errors import QtemperateWarning
from qtemperate.export.onnx import model_device
from qtemperate.quantization.torch_ao import frozen_observers

__all__ = [
    "DEPLOYED_AGREEMENT_FLOOR",
    "DeployedAgreementWarning",
    "OutputAgreement",
    "OutputReport",
    "VerifyReport",
    "benchmark_onnx",
    "compare_with_pytorch",
    "is_classification_output",
    "optimized_op_types",
    "ort_runner",
    "verify_onnx",
]

DEPLOYED_AGREEMENT_FLOOR = 0.99
"""A deployed (optimized-session) top-1 agreement below this is warned about by :func:`verify_onnx`."""


class DeployedAgreementWarning(QtemperateWarning):
    """The ONNX file a user would deploy disagrees with its PyTorch model on too many samples."""


def _session(
    path: str | Path,
    threads: int | None = None,
    optimized_path: str | None = None,
    optimized: bool = True,
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
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


CLASSIFICATION_NAME = re.compile(r"logit|class|cls|label|score|prob", re.IGNORECASE)
"""Output names taken as classification-like when a model has several outputs."""


def is_classification_output(name: str, shape: Sequence[int], n_outputs: int) -> bool:
    """Whether agreement (argmax over axis 1) means something for this output.

    An output of shape ``(N, C, ...)`` with ``C >= 2`` (axis 1 is the class axis, as in
    ``torch.nn.functional.cross_entropy``) that is the model's only output, or whose name
    says classes (:data:`CLASSIFICATION_NAME`: ``logits``, ``class``, ``cls``, ``scores``...).
    A box or regression head only gets its max |difference|.
    """
    if len(shape) < 2 or shape[1] < 2:
        return False
    return n_outputs == 1 or bool(CLASSIFICATION_NAME.search(name))


@dataclass(frozen=True)
class OutputAgreement:
    """One output of one runtime compared with PyTorch.

    Attributes:
        max_abs_diff: ``max |y_runtime - y_torch|`` over all elements.
        agreement: fraction of positions whose argmax over axis 1 agrees (top-1 agreement
            for logits), ``None`` for an output that is not classification-like.
        n: samples compared.
    """

    max_abs_diff: float
    agreement: float | None
    n: int


class _Accumulator:
    def __init__(self) -> None:
        self.max_diff, self.agree, self.positions, self.n = 0.0, 0, 0, 0
        self.classification: bool | None = None

    def add(self, got: np.ndarray, ref: np.ndarray, classification: bool) -> None:
        if got.shape != ref.shape:
            raise ValueError(f"runtime output shape {got.shape} != PyTorch shape {ref.shape}")
        self.classification = classification
        self.max_diff = max(self.max_diff, float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)))
        if classification:
            hit = got.argmax(1) == ref.argmax(1)
            self.agree += int(hit.sum())
            self.positions += hit.size
        self.n += ref.shape[0]

    def result(self) -> OutputAgreement:
        agreement = self.agree / max(self.positions, 1) if self.classification else None
        return OutputAgreement(self.max_diff, agreement, self.n)


def _as_batches(inputs: torch.Tensor | Iterable) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    batches = [b[0] if isinstance(b, list | tuple) else b for b in inputs]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ValueError(
            "inputs must be a tensor or a non-empty iterable of tensors / (x, y) batches"
        )
    return batches


Runner = Callable[[np.ndarray], Sequence[np.ndarray]]
"""Runs a float32 input batch, returns the outputs in the exported order."""


def compare_with_pytorch(
    model: nn.Module,
    inputs: torch.Tensor | Iterable,
    runners: Mapping[str, Runner],
    classification_outputs: Sequence[str] | None = None,
) -> dict[str, dict[str, OutputAgreement]]:
    """Compare runtimes with ``model`` (PyTorch, eval mode) on the same inputs, per output.

    Args:
        model: The PyTorch model that was exported (tensor, dict or tuple output).
        inputs: A batch tensor, or an iterable of tensors / ``(x, y)`` batches.
        runners: ``{runtime name: runner}``; each returns the outputs in the order of
            :func:`~qtemperate.export.onnx.flatten_outputs`.
        classification_outputs: Output names to compute agreement for; ``None`` picks
            them with :func:`is_classification_output`.

    Returns:
        ``{runtime name: {output name: OutputAgreement}}``.
    """
    from qtemperate.export.onnx import flatten_outputs

    device = model_device(model)
    was_training = model.training
    model.eval()
    acc: dict[str, dict[str, _Accumulator]] = {r: {} for r in runners}
    try:
        # a torch.ao fake-quant observes (and moves its scale) on every call, even in eval
        with torch.no_grad(), frozen_observers(model):
            for x in _as_batches(inputs):
                names, refs_t = flatten_outputs(model(x.to(device)))
                refs = [r.detach().float().cpu().numpy() for r in refs_t]
                x_np = x.detach().cpu().float().numpy()
                for rname, run in runners.items():
                    got = run(x_np)
                    if len(got) != len(refs):
                        raise ValueError(
                            f"{rname}: {len(got)} outputs, the PyTorch model returns {len(refs)}"
                        )
                    for name, g, ref in zip(names, got, refs):
                        cls = (
                            name in classification_outputs
                            if classification_outputs is not None
                            else is_classification_output(name, ref.shape, len(refs))
                        )
                        acc[rname].setdefault(name, _Accumulator()).add(np.asarray(g), ref, cls)
    finally:
        model.train(was_training)
    return {r: {o: a.result() for o, a in outs.items()} for r, outs in acc.items()}


@dataclass(frozen=True)
class OutputReport:
    """One output of an ONNX file compared with PyTorch in both onnxruntime sessions.

    Attributes:
        graph: The unoptimized session (``ORT_DISABLE_ALL``): the graph's own semantics,
            i.e. whether the exported graph is exact.
        deployed: The default optimized session (``ORT_ENABLE_ALL``): the fused integer
            kernels a user runs, on this CPU.
    """

    graph: OutputAgreement
    deployed: OutputAgreement


@dataclass(frozen=True)
class VerifyReport:
    """Agreement between onnxruntime and PyTorch on the same inputs.

    The top-level figures are those of the deployed (optimized) session, worst over the
    outputs: ``max_abs_diff`` the largest difference, ``top1_agreement`` the lowest
    agreement of the classification-like outputs (``None`` when there is none).

    Attributes:
        max_abs_diff: deployed ``max |y_onnx - y_torch|`` over all outputs.
        top1_agreement: deployed fraction of samples whose argmax agrees.
        n: number of samples compared.
        graph_max_abs_diff: the same in the unoptimized session.
        graph_agreement: the same in the unoptimized session.
        outputs: per output name, both sessions.
        warning: the :class:`DeployedAgreementWarning` message when ``top1_agreement``
            is below :data:`DEPLOYED_AGREEMENT_FLOOR` (it names the figure), else ``None``.
    """

    max_abs_diff: float
    top1_agreement: float | None
    n: int
    graph_max_abs_diff: float = 0.0
    graph_agreement: float | None = None
    outputs: dict[str, OutputReport] = field(default_factory=dict)
    warning: str | None = None

    @property
    def deployed_agreement(self) -> float | None:
        """Alias of ``top1_agreement`` (the optimized session's)."""
        return self.top1_agreement

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logging)."""
        return asdict(self)


def _worst(results: Mapping[str, OutputAgreement]) -> tuple[float, float | None]:
    diff = max((r.max_abs_diff for r in results.values()), default=0.0)
    agreements = [r.agreement for r in results.values() if r.agreement is not None]
    return diff, (min(agreements) if agreements else None)


def ort_runner(path: str | Path, optimized: bool = True, threads: int | None = None) -> Runner:
    """A :data:`Runner` on an onnxruntime CPU session (optimized or ``ORT_DISABLE_ALL``)."""
    sess = _session(path, threads=threads, optimized=optimized)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor | Iterable,
    classification_outputs: Sequence[str] | None = None,
) -> VerifyReport:
    """Run the ONNX file in onnxruntime (unoptimized and optimized) and ``model`` in PyTorch.

    The unoptimized session (``ORT_DISABLE_ALL``) computes the graph as written (Q/DQ
    around float ops): it shows whether the export is exact. The optimized session
    (``ORT_ENABLE_ALL``, onnxruntime's default) fuses the integer kernels a user runs;
    on x86 CPUs without VNNI those can saturate (:mod:`qtemperate.export.targets`).
    A QAT-prepared torch.ao model runs with its observers frozen
    (:func:`~qtemperate.quantization.torch_ao.frozen_observers`): the function exported,
    unchanged by the check. Top-1 agreement is the fraction of samples whose argmax over
    axis 1 is the same in onnxruntime and PyTorch (ties resolved to the first index).

    Args:
        path: ONNX file from :func:`export_onnx`.
        model: the PyTorch model that was exported.
        inputs: a batch tensor, or an iterable of tensors / ``(x, y)`` batches.
        classification_outputs: outputs to compute agreement for (default: see
            :func:`is_classification_output`).

    Returns:
        A :class:`VerifyReport` (both sessions, per output).

    Warns:
        DeployedAgreementWarning: when an output's deployed top-1 agreement is below
            :data:`DEPLOYED_AGREEMENT_FLOOR` (0.99), for any model (qtemperate's, stock
            Brevitas, torch.ao, hand-written); the message (also in
            :attr:`VerifyReport.warning`) gives the measured agreement per output.
    """
    res = compare_with_pytorch(
        model, inputs,
        {"graph": ort_runner(path, optimized=False), "deployed": ort_runner(path, optimized=True)},
        classification_outputs,
    )
    graph, deployed = res["graph"], res["deployed"]
    d_diff, d_agree = _worst(deployed)
    g_diff, g_agree = _worst(graph)
    n = next(iter(deployed.values())).n if deployed else 0
    outputs = {o: OutputReport(graph=graph[o], deployed=deployed[o]) for o in deployed}
    warning = _agreement_warning(Path(path).name, outputs, n)
    if warning is not None:
        warnings.warn(warning, DeployedAgreementWarning, stacklevel=2)
    return VerifyReport(
        max_abs_diff=d_diff, top1_agreement=d_agree, n=n,
        graph_max_abs_diff=g_diff, graph_agreement=g_agree, outputs=outputs, warning=warning,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def _agreement_warning(name: str, outputs: Mapping[str, OutputReport], n: int) -> str | None:
    """The message for outputs whose deployed agreement is below the floor, or None.

    It names each such output with its deployed and graph (unoptimized) agreement, and
    says which of the two is at fault: when the graph agrees, onnxruntime's optimized
    kernels are (int8 kernels that saturate on this CPU, a fusion that rounds a float
    bias); otherwise the file itself computes another function than the model.
    """
    low = {o: r for o, r in outputs.items()
           if r.deployed.agreement is not None and r.deployed.agreement < DEPLOYED_AGREEMENT_FLOOR}
    if not low:
        return None
    worst = min(r.deployed.agreement for r in low.values())  # type: ignore[type-var]
    graph_ok = all(r.graph.agreement is not None and r.graph.agreement >= DEPLOYED_AGREEMENT_FLOOR
                   for r in low.values())
    parts = ", ".join(f"{o!r} {_pct(r.deployed.agreement)} (graph {_pct(r.graph.agreement)})"
                      for o, r in low.items())
    why = ("the unoptimized graph agrees, so onnxruntime's optimized kernels are not exact "
           "on this CPU" if graph_ok else
           "the exported graph itself computes another function than the PyTorch model")
    return (f"DEPLOYED AGREEMENT {_pct(worst)} < {DEPLOYED_AGREEMENT_FLOOR * 100:.0f}% "
            f"(onnxruntime, optimized session): {name} vs the PyTorch model on {n} samples, "
            f"top-1 agreement of output {parts}: {why}")


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
    check_timing_args(batch_sizes, warmup, iters)
    sess = _session(path, threads=threads)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batch_sizes:
        x = rng.standard_normal(_input_shape(sess, int(b))).astype(np.float32)
        out[int(b)] = median_ms(lambda x=x: sess.run(None, {name: x}), warmup, iters)
    return out


def check_timing_args(batch_sizes: Sequence[int], warmup: int, iters: int) -> None:
    """Raise ``ValueError`` for non-positive ``iters``/batch sizes or negative ``warmup``."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")


def median_ms(run: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall time of ``run()`` in milliseconds over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

