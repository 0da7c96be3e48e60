"""Measured per-layer latency on this CPU and the model-latency predictor built on it.

A model's latency in a runtime is predicted as

    T(model) = c(input shape) + sum over conv / linear layers of t(layer signature)
               (+ sum over residual adds of t(add), where the runtime runs them apart),

where every term is *measured* on this CPU, in this runtime, at this batch size and
thread count, once, and cached as JSON (:class:`LatencyTable`):

* ``t(layer)``: a one-layer ONNX graph in the form qtemperate's export produces (int8:
  ``QuantizeLinear -> DequantizeLinear`` around the activation, per-channel int8 weights
  and an int32 bias through ``DequantizeLinear``, ``Conv`` / ``Gemm``, then
  ``QuantizeLinear -> DequantizeLinear`` on the output, which onnxruntime fuses to
  ``QLinearConv`` / ``QGemm``; float: plain ``Conv`` / ``Gemm``) is run with the
  runtime's profiler on, and the layer's node times are read per run (median-like
  trimmed mean). The graph's boundary nodes (the input quantizer, the output
  dequantizer, layout transposes / reorders) are not the layer's: a model pays for them
  once, in ``c``.
* A profiler charges every node a fixed cost ``beta`` inside its timed window (3.2 µs
  int8, 2.8 µs float per node in onnxruntime on the 2-core AMD EPYC this was written on:
  ~25 % of an int8 ResNet-20 at batch 1). ``beta`` is measured once per context as
  ``profiled time per node - slope of the unprofiled wall time`` of a chain of 1 and of
  17 identical small layers (the slope is the true in-graph cost of one layer; the three
  graphs run in turn, run by run, so a change of load hits every term alike) and
  subtracted from every entry.
* ``c``: the median wall time (:func:`~qtemperate.export.runtime.benchmark_onnx`, same
  session options) of an almost empty graph with the model's input shape (int8: input
  ``QuantizeLinear -> DequantizeLinear``; float: ``Identity``): the run overhead and the
  input's quantization.
* Residual adds (two tensors of one shape added, found with a torch function mode):
  onnxruntime's int8 graph runs each as its own ``QLinearAdd`` (41 of 419 µs of an int8
  ResNet-20), so they get entries; onnxruntime's float graph fuses an add that follows a
  convolution into it (``FusedConv``: the float ResNet-20 has no ``Add`` node left) and
  OpenVINO fuses it as a post-op in both precisions (0 µs in its performance counters),
  so there they cost nothing.

Pooling, concatenation, multiplies, normalisations that do not fold into a convolution
and activations outside one have no entry (the int8 ResNet-20's global pool and flatten
are ~1 % of it). Transposed convolutions, attention and recurrent layers are refused,
naming the layer, rather than under-predicted. A quantized export that leaves a layer in
float (two quantizers on one tensor) runs slower than its int8 entry says.

Measured accuracy (``bench/latency_prediction.py``; 2 shared cores of an AMD EPYC, 1
thread, batch 1; ResNet-20 and the MobileNetV2- and ResNet-style models of
``tests/test_latency.py``, unpruned and latency-pruned, the int8 file exported by
``quantize`` -> ``export_onnx``): the int8 student / float teacher ratio within -8..+14 %
of the measured one in onnxruntime 1.32 and -5..+7 % in OpenVINO 2026.4; absolute
student latencies -3..-24 % (onnxruntime, other load on the cores while measuring) and
-8..+11 % (OpenVINO). With the cores quiet the int8 ResNet-20 was predicted 6.5 % low,
its per-layer entries within 1 µs of the same layers profiled inside the model. A caller
checks the exported file with one real measurement: :func:`check_latency_prediction`.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

if TYPE_CHECKING:
    from qtemperate.export.targets import CpuInfo

__all__ = [
    "RUNTIMES",
    "LatencyContext",
    "LatencyPrediction",
    "LatencySpec",
    "LatencyTable",
    "LayerSignature",
    "check_latency_prediction",
    "kernel_friendly_round_to",
    "latency_context",
    "layer_signatures",
    "measure_latency",
    "predict_latency",
]

RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
"""Runtimes the table measures in (both run the same QDQ ONNX file)."""

TABLE_FILE = "latency_table.json"
"""File name of the table inside a user cache directory."""

_FORMAT = 1
_OPSET = 17
_ACT_SCALE, _W_SCALE = 0.05, 0.01
#: A one-layer measurement runs for about this long (seconds), within the bounds below.
_MEASURE_SECONDS = 0.15
_MIN_ITERS, _MAX_ITERS, _WARMUP = 20, 400, 5
#: Chain lengths of the profiler-overhead calibration.
_CHAIN_LONG = 17
_CALIBRATION_ROUNDS = 3
#: With more missing entries than this, measuring shows a progress bar.
_PROGRESS_FROM = 8
#: Runtimes (and precisions) that run a residual add as its own kernel.
_SEPARATE_ADDS = {("onnxruntime", True)}
# Nodes of a one-layer graph that the model pays once (boundary), not per layer.
_ORT_BOUNDARY = frozenset({"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput",
                           "ReorderOutput", "Identity"})
_OV_BOUNDARY = frozenset({"Parameter", "Result", "Reorder", "FakeQuantize", "Subgraph",
                          "Convert", "Reshape", "Transpose"})


# ----------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class LayerSignature:
    """What a layer's latency depends on (its weights' values do not matter).

    Attributes:
        kind: ``"conv"``, ``"linear"`` or ``"add"`` (a residual add).
        in_channels: Input channels (linear: in features; add: channels).
        out_channels: Output channels (linear: out features; add: channels).
        kernel: Kernel size per spatial dim (conv).
        stride: Stride per spatial dim (conv).
        padding: ONNX ``pads``: the begin pads of every spatial dim, then the end pads.
        dilation: Dilation per spatial dim (conv).
        groups: Convolution groups (depthwise: ``in_channels``).
        input_size: Spatial input size (conv, add); linear: ``(rows,)``, the rows one
            sample gives (1 for ``(N, in)`` inputs, ``T`` for ``(N, T, in)``).
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    input_size: tuple[int, ...] = ()

    def key(self) -> str:
        """A stable string naming the signature (the table's entry key)."""
        def dims(v: tuple[int, ...]) -> str:
            return "x".join(map(str, v)) or "-"

        if self.kind == "linear":
            return f"linear/{self.in_channels}/{self.out_channels}/rows{dims(self.input_size)}"
        if self.kind == "add":
            return f"add/{self.in_channels}/{dims(self.input_size)}"
        return (f"conv/{self.in_channels}/{self.out_channels}/k{dims(self.kernel)}/s{dims(self.stride)}"
                f"/p{dims(self.padding)}/d{dims(self.dilation)}/g{self.groups}/{dims(self.input_size)}")

    def output_size(self) -> tuple[int, ...]:
        """Spatial output size (conv: ``(n + pads - d (k - 1) - 1) // s + 1`` per dim)."""
        if self.kind != "conv":
            return self.input_size
        n = len(self.kernel)
        return tuple(
            (self.input_size[i] + self.padding[i] + self.padding[n + i]
             - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(n)
        )

    def macs(self) -> int:
        """Multiply-accumulates of one sample (adds: 0)."""
        if self.kind == "linear":
            return self.in_channels * self.out_channels * self.input_size[0]
        if self.kind == "add":
            return 0
        per_out = self.in_channels // self.groups * math.prod(self.kernel)
        return self.out_channels * math.prod(self.output_size()) * per_out


def _onnx_pads(m: nn.modules.conv._ConvNd) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(pads, extra input size)`` of a convolution, as the ONNX export writes it."""
    n = len(m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0,) * 2 * n, (0,) * n
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]  # "same"
        begin = [t // 2 for t in total]
        pads = (*begin, *(t - b for t, b in zip(total, begin)))
    else:
        pads = (*m.padding, *m.padding)
    if m.padding_mode != "zeros":  # exported as a Pad node before a pad-free Conv
        return (0,) * 2 * n, tuple(pads[i] + pads[n + i] for i in range(n))
    return tuple(int(p) for p in pads), (0,) * n


def _signature(m: nn.Module, x: torch.Tensor) -> LayerSignature:
    shape = tuple(int(d) for d in x.shape)
    if isinstance(m, nn.Linear):
        return LayerSignature("linear", m.in_features, m.out_features, input_size=(math.prod(shape[1:-1]),))
    pads, extra = _onnx_pads(m)  # type: ignore[arg-type]
    return LayerSignature(
        "conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), pads,
        tuple(m.dilation), m.groups, tuple(s + e for s, e in zip(shape[2:], extra)),
    )


# Compute-heavy layers without an entry kind: a prediction that skipped them would be low.
_UNMEASURED = (nn.modules.conv._ConvTransposeNd, nn.MultiheadAttention, nn.RNNBase, nn.Bilinear)

_ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
              torch.Tensor.__iadd__, torch.Tensor.__radd__}


class _AddRecorder(torch.overrides.TorchFunctionMode):
    """Records every add of two tensors of the same shape (a residual add), with its shape."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.adds: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if (func in _ADD_FUNCS and len(args) >= 2 and isinstance(args[0], torch.Tensor)
                and isinstance(args[1], torch.Tensor) and args[0].shape == args[1].shape
                and args[0].dim() >= 2):
            self.adds.append((self.where(), tuple(int(d) for d in args[0].shape)))
        return func(*args, **(kwargs or {}))


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    value = getattr(x, "value", None)  # a Brevitas QuantTensor
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(x, (list, tuple)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return None


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def layer_signatures(model: nn.Module, example_input: Any) -> list[tuple[str, LayerSignature]]:
    """The conv / linear layers (and residual adds) one forward pass runs, in call order.

    Forward hooks on every ``isinstance(m, nn.Conv1d/2d/3d | nn.Linear)`` module (so a
    library's subclass counts) record the module's widths from its attributes (a pruned
    copy reports its pruned widths) and the input's spatial size; a torch function mode
    records adds of two tensors of one shape, named ``<module>.add`` after the module
    whose forward ran them. A module called twice appears twice (``name``, ``name#2``).
    The model runs once in eval mode without gradients; its mode is restored.

    Args:
        model: A float ``nn.Module`` (or a quantized one whose layers subclass torch's).
        example_input: A tensor (dim 0 the batch), a tuple / list of positional inputs,
            or a dict of keyword inputs; moved to the model's device.

    Returns:
        ``[(name, signature), ...]``.

    Raises:
        ValueError: naming a transposed convolution (no entry kind measures it).
    """
    names = {m: n for n, m in model.named_modules()}
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    stack: list[str] = []
    found: list[tuple[str, LayerSignature]] = []
    seen: dict[str, int] = {}

    def unique(name: str) -> str:
        seen[name] = seen.get(name, 0) + 1
        return name if seen[name] == 1 else f"{name}#{seen[name]}"

    def pre(m: nn.Module, args: Any) -> None:
        stack.append(names.get(m, type(m).__name__))

    def post(m: nn.Module, args: Any, out: Any) -> None:
        stack.pop()
        if isinstance(m, _UNMEASURED):
            raise ValueError(
                f"latency prediction has no entry for {names[m] or 'the model'} "
                f"({type(m).__name__}): it measures Conv1d/2d/3d and Linear layers"
            )
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            x = _first_tensor(args)
            if x is not None:
                found.append((unique(names[m] or type(m).__name__), _signature(m, x)))

    recorder = _AddRecorder(lambda: stack[-1] if stack else "")
    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            _call(model, _to_device(example_input, device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # adds interleave with layers in call order only loosely; they are listed after them
    for where, shape in recorder.adds:
        found.append((unique(f"{where}.add" if where else "add"),
                      LayerSignature("add", shape[1], shape[1], input_size=shape[2:])))
    return found


# ----------------------------------------------------------------------------- ONNX graphs
def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "latency", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # readable by every onnxruntime / OpenVINO this project supports
    return model


def _qdq(nodes: list[Any], inits: list[Any], x: str, out: str, tag: str) -> None:
    """``x -> QuantizeLinear(uint8) -> DequantizeLinear -> out``, per-tensor (an activation)."""
    inits += [numpy_helper.from_array(np.array(_ACT_SCALE, np.float32), f"{tag}_s"),
              numpy_helper.from_array(np.array(0, np.uint8), f"{tag}_z")]
    nodes.append(helper.make_node("QuantizeLinear", [x, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]))
    nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [out]))


def _weights(nodes: list[Any], inits: list[Any], shape: list[int], int8: bool, tag: str,
             rng: np.random.Generator) -> tuple[str, str]:
    """Weight and bias tensors: int8 per-output-channel + int32 bias via DequantizeLinear, or float."""
    n = shape[0]
    if not int8:
        inits += [numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), f"{tag}_w"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{tag}_b")]
        return f"{tag}_w", f"{tag}_b"
    inits += [numpy_helper.from_array(rng.integers(-63, 64, size=shape, dtype=np.int8), f"{tag}_wq"),
              numpy_helper.from_array(np.full(n, _W_SCALE, np.float32), f"{tag}_ws"),
              numpy_helper.from_array(np.zeros(n, np.int8), f"{tag}_wz"),
              numpy_helper.from_array(rng.integers(-500, 500, n, dtype=np.int32), f"{tag}_bq"),
              numpy_helper.from_array(np.full(n, _ACT_SCALE * _W_SCALE, np.float32), f"{tag}_bs")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_ws", f"{tag}_wz"],
                                  [f"{tag}_w"], axis=0))
    nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_bq", f"{tag}_bs"], [f"{tag}_b"], axis=0))
    return f"{tag}_w", f"{tag}_b"


def _layer_node(sig: LayerSignature, src: str, out: str, w: str, b: str) -> Any:
    if sig.kind == "conv":
        return helper.make_node("Conv", [src, w, b], [out], kernel_shape=list(sig.kernel),
                                strides=list(sig.stride), pads=list(sig.padding),
                                dilations=list(sig.dilation), group=sig.groups)
    return helper.make_node("Gemm", [src, w, b], [out], transB=1)


def _shapes(sig: LayerSignature, batch: int) -> tuple[list[int], list[int], list[int]]:
    """``(input shape, output shape, weight shape)`` of the one-layer graph."""
    if sig.kind == "linear":
        rows = batch * sig.input_size[0]
        return [rows, sig.in_channels], [rows, sig.out_channels], [sig.out_channels, sig.in_channels]
    if sig.kind == "add":
        shape = [batch, sig.in_channels, *sig.input_size]
        return shape, shape, []
    return ([batch, sig.in_channels, *sig.input_size], [batch, sig.out_channels, *sig.output_size()],
            [sig.out_channels, sig.in_channels // sig.groups, *sig.kernel])


def layer_graph(sig: LayerSignature, batch: int, int8: bool, repeat: int = 1) -> onnx.ModelProto:
    """The one-layer ONNX graph :class:`LatencyTable` times for ``sig`` (export form, see module doc).

    ``repeat > 1`` chains that many copies of the layer (input and output shapes must
    agree): the profiler-overhead calibration.
    """
    rng = np.random.default_rng(0)
    in_shape, out_shape, w_shape = _shapes(sig, batch)
    if repeat > 1 and in_shape != out_shape:
        raise ValueError(f"a chain needs equal input and output shapes, {sig.key()} has {in_shape} -> {out_shape}")
    nodes: list[Any] = []
    inits: list[Any] = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    src = "x"
    if int8:
        _qdq(nodes, inits, "x", "x_d", "x")
        src = "x_d"
    if sig.kind == "add":
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, in_shape))
        other = "x2"
        if int8:
            _qdq(nodes, inits, "x2", "x2_d", "x2")
            other = "x2_d"
        nodes.append(helper.make_node("Add", [src, other], ["acc0"]))
        src = "acc0"
        if int8:
            _qdq(nodes, inits, src, "y_d", "y")
            src = "y_d"
    for k in range(repeat if sig.kind != "add" else 0):
        w, b = _weights(nodes, inits, w_shape, int8, f"l{k}", rng)
        nodes.append(_layer_node(sig, src, f"acc{k}", w, b))
        src = f"acc{k}"
        if int8:
            _qdq(nodes, inits, src, f"a{k}", f"a{k}")
            src = f"a{k}"
    nodes.append(helper.make_node("Identity", [src], ["y"]))
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    onnx.checker.check_model(model)
    return model


def _empty_graph(shape: list[int], int8: bool) -> onnx.ModelProto:
    """The almost empty graph of the per-model constant: input quantizer pair, or Identity."""
    nodes: list[Any] = []
    inits: list[Any] = []
    if int8:
        _qdq(nodes, inits, "x", "y", "x")
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
    dims: list[Any] = ["batch", *shape[1:]]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)], inits)


# ----------------------------------------------------------------------------- timing
def _iters_for(seconds_per_run: float) -> int:
    return int(min(_MAX_ITERS, max(_MIN_ITERS, _MEASURE_SECONDS / max(seconds_per_run, 1e-7))))


def _trimmed_mean(values: Sequence[float]) -> float:
    """Mean of the middle half (robust to preempted runs, finer than a median of whole µs)."""
    v = sorted(values)
    k = len(v) // 4
    mid = v[k: len(v) - k] or v
    return sum(mid) / len(mid)


class _Graph:
    """One graph compiled in a runtime (the options of ``benchmark_onnx`` / ``benchmark_openvino``).

    ``run()`` runs it once; with ``profile=True`` the runtime's profiler is on and
    :meth:`layer_runs` gives, per run so far, the summed times (µs) of the nodes that
    are not the graph's boundary, and :attr:`nodes` how many such nodes ran.
    """

    def __init__(self, runtime: str, model: onnx.ModelProto, threads: int, profile: bool = False,
                 batch: int = 1) -> None:
        self.runtime, self.profile = runtime, profile
        self.nodes = 0
        self._runs: list[float] = []
        rng = np.random.default_rng(0)
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            if profile:
                self._tmp = tempfile.TemporaryDirectory()
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(self._tmp.name) / "profile")
            self._sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            self._feeds = {i.name: rng.standard_normal(tuple(d if isinstance(d, int) else batch for d in i.shape))
                           .astype(np.float32) for i in self._sess.get_inputs()}
        else:
            from qtemperate.export.openvino import _core

            core = _core()
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                      "INFERENCE_NUM_THREADS": int(threads)}
            if profile:
                config["PERF_COUNT"] = True
            ov_model = core.read_model(model.SerializeToString(), b"")
            if any(i.get_partial_shape().is_dynamic for i in ov_model.inputs):  # a dynamic batch axis
                ov_model.reshape({i.get_any_name(): [batch, *[d.get_length() for d in list(i.get_partial_shape())[1:]]]
                                  for i in ov_model.inputs})
            compiled = core.compile_model(ov_model, "CPU", config)
            self._req = compiled.create_infer_request()
            self._inputs = {k: rng.standard_normal(tuple(i.get_shape())).astype(np.float32)
                            for k, i in enumerate(compiled.inputs)}

    def run(self) -> None:
        if self.runtime == "onnxruntime":
            self._sess.run(None, self._feeds)
            return
        self._req.infer(self._inputs)
        if self.profile:
            total, names = 0.0, set()
            for p in self._req.get_profiling_info():
                # a node fused into another reports no time ("NOT_RUN"): it is not charged
                if p.node_type not in _OV_BOUNDARY and p.real_time.total_seconds() > 0:
                    names.add(p.node_name)
                    total += p.real_time.total_seconds() * 1e6
            self.nodes = max(self.nodes, len(names))
            self._runs.append(total)

    def layer_runs(self) -> list[float]:
        """Per run, the non-boundary nodes' summed time (µs); ends onnxruntime's profiling."""
        if self.runtime != "onnxruntime":
            return list(self._runs)
        events = json.loads(Path(self._sess.end_profiling()).read_text())
        self._tmp.cleanup()
        runs: list[float] = []
        names: set[str] = set()
        current = 0.0
        for e in events:  # a run's node events are written before its model_run event
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs.append(current)
                current = 0.0
            elif (e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                  and e.get("args", {}).get("op_name", "") not in _ORT_BOUNDARY):
                names.add(e["name"])
                current += float(e["dur"])
        self.nodes = len(names)
        # onnxruntime truncates each node's time to whole µs: +0.5 µs per node undoes the
        # truncation on average
        return [r + 0.5 * self.nodes for r in runs]

    def seconds_per_run(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0


def _profiled_us(runtime: str, model: onnx.ModelProto, threads: int) -> tuple[float, int]:
    """Trimmed mean over runs of the non-boundary nodes' profiled time (µs), and their count."""
    g = _Graph(runtime, model, threads, profile=True)
    for _ in range(_WARMUP):
        g.run()
    iters = _iters_for(g.seconds_per_run())
    for _ in range(iters):
        g.run()
    runs = g.layer_runs()[_WARMUP + 1:]
    return _trimmed_mean(runs), g.nodes


def _profiler_overhead_us(runtime: str, short: onnx.ModelProto, long: onnx.ModelProto, threads: int,
                          repeat: int) -> float:
    """``beta`` (µs per node), from a chain of one and of ``repeat`` identical layers.

    The profiled long chain and the unprofiled short and long chains run in turn, run by
    run, so load changes hit every term alike; per run ``beta_i = profiled_i / nodes -
    (wall_long_i - wall_short_i) / (repeat - 1)`` (the wall slope is a layer's true cost
    in a graph); the trimmed mean over runs is returned.
    """
    prof = _Graph(runtime, long, threads, profile=True)
    g_short, g_long = _Graph(runtime, short, threads), _Graph(runtime, long, threads)
    for g in (prof, g_short, g_long):
        for _ in range(_WARMUP):
            g.run()
    iters = _iters_for(prof.seconds_per_run() + g_short.seconds_per_run() + g_long.seconds_per_run())
    slopes: list[float] = []
    for _ in range(iters):
        prof.run()
        t0 = time.perf_counter()
        g_short.run()
        t1 = time.perf_counter()
        g_long.run()
        t2 = time.perf_counter()
        slopes.append(((t2 - t1) - (t1 - t0)) * 1e6 / (repeat - 1))
    profiled = prof.layer_runs()[_WARMUP + 1:]
    n = max(prof.nodes, 1)
    return _trimmed_mean([p / n - s for p, s in zip(profiled, slopes)])


# ----------------------------------------------------------------------------- the table
def _runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return str(onnxruntime.__version__)
    try:
        import openvino
    except ImportError:
        from qtemperate.export.openvino import OPENVINO_EXTRA

        raise ImportError(f"latency in OpenVINO needs the openvino package: {OPENVINO_EXTRA}") from None
    return str(getattr(openvino, "__version__", None) or openvino.get_version())


def _cpu_name() -> str:
    """The CPU model and its int8 class (``AMD EPYC (x86-vnni)``): what the kernels depend on."""
    from qtemperate.export.targets import cpu_info, detect_target

    info = cpu_info()
    return f"{info.model or info.machine} ({detect_target(info)})"


def _check_positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_runtime(runtime: Any) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return str(runtime)


@dataclass(frozen=True)
class LatencyContext:
    """What every entry of a table is measured under; a table never mixes contexts.

    Attributes:
        cpu: CPU model and int8 class (``AMD EPYC (x86-vnni)``).
        runtime: ``onnxruntime`` or ``openvino``.
        version: The runtime's version.
        threads: Intra-op threads.
        batch: Batch size of every graph.
    """

    cpu: str
    runtime: str
    version: str
    threads: int
    batch: int

    def key(self) -> str:
        """The table's key of this context."""
        return f"{self.cpu} | {self.runtime} {self.version} | threads={self.threads} | batch={self.batch}"


def latency_context(runtime: str = "onnxruntime", batch: int = 1, threads: int = 1) -> LatencyContext:
    """The context of measurements made now, on this CPU, in ``runtime``.

    Raises:
        ValueError: for an unknown runtime or a batch / threads that is not an int >= 1.
        ImportError: naming the extra, for OpenVINO when it is not installed.
    """
    runtime = _check_runtime(runtime)
    return LatencyContext(_cpu_name(), runtime, _runtime_version(runtime),
                          _check_positive("threads", threads), _check_positive("batch", batch))


def _precision(int8: bool) -> str:
    return "int8" if int8 else "float"


class LatencyTable:
    """Measured latencies (ms) of layers, per context, cached as JSON.

    Entries are keyed by the :class:`LatencyContext` (CPU, runtime and version, threads,
    batch), the precision (``int8`` / ``float``) and the layer signature
    (:meth:`LayerSignature.key`); a context's entries are used only under that very
    context, so a table moved to another CPU, runtime version, thread count or batch
    size measures anew (its old entries stay in the file for the machine they belong
    to). Besides layers a context holds ``constant/<input shape>`` (the per-model
    constant, ms) and ``profiler_overhead`` (``beta``, ms per node).

    The file is written after every batch of measurements (atomically, merged with what
    another process wrote meanwhile), to ``path`` and to ``cache_dir/latency_table.json``.

    Args:
        path: The table file of a run ("cached beside the run"), or ``None``.
        cache_dir: A user cache directory shared by runs on this machine, or ``None``.
            Entries found in either are used (``path`` first).

    Attributes:
        measurements: How many entries this object has measured (cache misses).
    """

    def __init__(self, path: str | Path | None = None, cache_dir: str | Path | None = None) -> None:
        self.paths = [Path(p) for p in (path, None if cache_dir is None else Path(cache_dir) / TABLE_FILE)
                      if p is not None]
        self.measurements = 0
        self._data: dict[str, dict[str, Any]] = {}
        for p in reversed(self.paths):  # path's entries win
            for key, ctx in _read(p).items():
                self._data.setdefault(key, {**ctx, "entries": {}})["entries"].update(ctx.get("entries", {}))

    def entries(self, context: LatencyContext) -> dict[str, float]:
        """The entries measured under ``context`` (``precision|key -> ms``); a copy."""
        return dict(self._data.get(context.key(), {}).get("entries", {}))

    def get(self, context: LatencyContext, int8: bool, key: str) -> float | None:
        """One entry (ms), ``None`` when not measured."""
        return self._data.get(context.key(), {}).get("entries", {}).get(f"{_precision(int8)}|{key}")

    def _put(self, context: LatencyContext, int8: bool, key: str, ms: float) -> None:
        ctx = self._data.setdefault(context.key(), {**asdict(context), "entries": {}})
        ctx["entries"][f"{_precision(int8)}|{key}"] = float(ms)

    def profiler_overhead_ms(self, context: LatencyContext, int8: bool) -> float:
        """``beta``: the profiler's time per node (ms), measured once per context and precision.

        Per run of a chain of 17 identical layers (16-channel 1x1 convolutions on 8x8
        inputs, cheap enough that load noise is small against beta), ``beta = profiled
        time / 17 - (wall time of the chain - of one such layer) / 16``, the three graphs
        run in turn; the median of three such calibrations is kept.
        """
        got = self.get(context, int8, "profiler_overhead")
        if got is not None:
            return got
        sig = LayerSignature("conv", 16, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (8, 8))
        short = layer_graph(sig, context.batch, int8)
        long = layer_graph(sig, context.batch, int8, _CHAIN_LONG)
        estimates = [_profiler_overhead_us(context.runtime, short, long, context.threads, _CHAIN_LONG)
                     for _ in range(_CALIBRATION_ROUNDS)]
        beta = max(0.0, statistics.median(estimates)) / 1e3
        self._put(context, int8, "profiler_overhead", beta)
        self.measurements += 1
        return beta

    def constant_ms(self, context: LatencyContext, int8: bool, input_shape: Sequence[int]) -> float:
        """The per-model constant (ms) for a per-sample input shape, measured on a miss."""
        key = "constant/" + "x".join(map(str, input_shape))
        got = self.get(context, int8, key)
        if got is None:
            got = measure_latency(_empty_graph([context.batch, *input_shape], int8), context.runtime,
                                  context.batch, context.threads, iters=200)
            self._put(context, int8, key, got)
            self.measurements += 1
        return got

    def layer_ms(self, context: LatencyContext, int8: bool, sig: LayerSignature) -> float:
        """One layer's latency (ms), measured on a miss: profiled node time minus ``beta``."""
        got = self.get(context, int8, sig.key())
        if got is None:
            beta_us = self.profiler_overhead_ms(context, int8) * 1e3
            us, nodes = _profiled_us(context.runtime, layer_graph(sig, context.batch, int8), context.threads)
            got = max(0.0, us - beta_us * nodes) / 1e3
            self._put(context, int8, sig.key(), got)
            self.measurements += 1
        return got

    def ensure(self, context: LatencyContext, int8: bool, signatures: Sequence[LayerSignature],
               input_shape: Sequence[int] | None = None) -> None:
        """Measure the missing entries of ``signatures`` (a progress bar when many) and save."""
        missing = list(dict.fromkeys(s for s in signatures if self.get(context, int8, s.key()) is None))
        todo = [None, *missing] if input_shape is not None else list(missing)
        before = self.measurements
        if input_shape is not None:
            self.constant_ms(context, int8, input_shape)
        if missing:
            items: Any = missing
            if len(missing) > _PROGRESS_FROM:
                from tqdm.auto import tqdm

                items = tqdm(missing, desc=f"latency table ({context.runtime} {_precision(int8)})",
                             leave=False)
            for sig in items:
                self.layer_ms(context, int8, sig)
        if todo and self.measurements > before:
            self.save()

    def save(self) -> None:
        """Write the table to every path, merged with entries other processes wrote meanwhile."""
        from qtemperate.atomic import write_json_atomic

        for p in self.paths:
            on_disk = _read(p)
            for key, ctx in self._data.items():
                merged = on_disk.setdefault(key, {k: v for k, v in ctx.items() if k != "entries"})
                merged.setdefault("entries", {}).update(ctx["entries"])
            write_json_atomic(p, {"format": _FORMAT, "contexts": on_disk}, indent=1, sort_keys=True)


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """The contexts of a table file (empty when absent); a corrupt or foreign file is refused."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"latency table {path}: not a readable JSON file ({exc}); delete it to re-measure") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("contexts"), dict):
        raise ValueError(f"latency table {path}: not a qtemperate latency table of format {_FORMAT}")
    return data["contexts"]


# ----------------------------------------------------------------------------- prediction
@dataclass
class LatencyPrediction:
    """A predicted latency: ``total_ms = constant_ms + sum(layers.values())``.

    Attributes:
        total_ms: Predicted milliseconds per batch.
        constant_ms: The per-model constant (run overhead, input quantization).
        layers: Layer (or ``<module>.add``) name -> predicted ms.
        runtime: ``onnxruntime`` or ``openvino``.
        int8: Whether the int8 (QDQ) graph was predicted, else the float graph.
        batch: Batch size.
        threads: Intra-op threads.
        cpu: The CPU the table was measured on.
    """

    total_ms: float
    constant_ms: float
    layers: dict[str, float]
    runtime: str
    int8: bool
    batch: int
    threads: int
    cpu: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for ``summary.json``)."""
        return asdict(self)


def _sample_shape(example_input: Any) -> list[int]:
    x = _first_tensor(example_input)
    if x is None or x.dim() < 1:
        raise ValueError("example_input must be a tensor (or hold one) with a batch dimension")
    return [int(d) for d in x.shape[1:]]


def predict_latency(
    model: nn.Module,
    example_input: Any,
    table: LatencyTable,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int = 1,
    int8: bool = True,
) -> LatencyPrediction:
    """Predict ``model``'s latency in ``runtime`` from measured per-layer entries.

    ``total = c(input shape) + sum of the entries of its conv / linear layers (+ its
    residual adds in onnxruntime int8)``; entries the table lacks are measured now (a
    progress bar when many) and saved. Widths come from the modules' attributes, so a
    pruned copy is predicted at its pruned widths; a float model is predicted as the
    int8 graph its quantized export would run (``int8=True``) or as its float graph.

    Args:
        model: The model (float, pruned, or with quantized layers subclassing torch's).
        example_input: One example batch (any batch size: only per-sample shapes are read).
        table: Where entries are looked up and stored.
        runtime: ``onnxruntime`` or ``openvino``.
        batch: Batch size predicted.
        threads: Intra-op threads.
        int8: Predict the int8 QDQ graph (else the float graph).

    Returns:
        A :class:`LatencyPrediction`.

    Raises:
        ValueError: for a bad runtime / batch / threads, or a layer kind without entries.
    """
    context = latency_context(runtime, batch, threads)
    sigs = layer_signatures(model, example_input)
    counted = [(n, s) for n, s in sigs if s.kind != "add" or (runtime, int8) in _SEPARATE_ADDS]
    shape = _sample_shape(example_input)
    table.ensure(context, int8, [s for _, s in counted], shape)
    constant = table.constant_ms(context, int8, shape)
    layers = {n: table.layer_ms(context, int8, s) for n, s in counted}
    return LatencyPrediction(constant + sum(layers.values()), constant, layers, runtime, int8,
                             batch, threads, context.cpu)


def measure_latency(
    onnx_model: str | Path | onnx.ModelProto,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int = 1,
    warmup: int = 10,
    iters: int = 100,
) -> float:
    """One real measurement: median ms per batch of an ONNX file in ``runtime``.

    :func:`~qtemperate.export.runtime.benchmark_onnx` or
    :func:`~qtemperate.export.openvino.benchmark_openvino` with ``threads`` intra-op
    threads (the prediction's options); an in-memory model is written to a temporary file.
    """
    runtime = _check_runtime(runtime)
    _check_positive("batch", batch)
    _check_positive("threads", threads)
    if isinstance(onnx_model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(onnx_model, str(path))
            return measure_latency(path, runtime, batch, threads, warmup, iters)
    if runtime == "onnxruntime":
        from qtemperate.export.runtime import benchmark_onnx

        return benchmark_onnx(onnx_model, (batch,), warmup, iters, threads)[batch]
    from qtemperate.export.openvino import benchmark_openvino

    return benchmark_openvino(onnx_model, (batch,), warmup, iters, threads)[batch]


def check_latency_prediction(
    predicted_ms: float, measured_ms: float, tolerance: float = 0.15
) -> tuple[float, str | None]:
    """Relative error of a prediction against one real measurement, and a warning when off.

    ``error = (predicted - measured) / measured``; the message (else ``None``) says by
    how much and in which direction when ``|error| > tolerance``.

    Raises:
        ValueError: for a non-positive measurement, a negative prediction or tolerance.
    """
    if not measured_ms > 0:
        raise ValueError(f"measured_ms must be > 0, got {measured_ms!r}")
    if not predicted_ms >= 0:
        raise ValueError(f"predicted_ms must be >= 0, got {predicted_ms!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    error = (predicted_ms - measured_ms) / measured_ms
    if abs(error) <= tolerance:
        return error, None
    return error, (
        f"predicted latency {predicted_ms:.4g} ms is {abs(error):.0%} "
        f"{'above' if error > 0 else 'below'} the measured {measured_ms:.4g} ms (tolerance "
        f"{tolerance:.0%}): the latency table may be stale or measured under other load; "
        "delete it to re-measure, and trust the measurement"
    )


@dataclass(frozen=True)
class LatencySpec:
    """Where a latency target is predicted: runtime, batch, threads and the table's files.

    Attributes:
        runtime: ``onnxruntime`` or ``openvino``.
        batch: Batch size predicted (>= 1).
        threads: Intra-op threads (>= 1).
        path: The run's table file ("cached beside the run"), or ``None``.
        cache_dir: A user cache directory shared by runs on this machine, or ``None``.
        teacher_ms: A measured teacher latency (ms per batch, same runtime, batch and
            threads) to divide by, instead of the teacher's predicted float latency.
    """

    runtime: str = "onnxruntime"
    batch: int = 1
    threads: int = 1
    path: str | Path | None = None
    cache_dir: str | Path | None = None
    teacher_ms: float | None = None

    def __post_init__(self) -> None:
        _check_runtime(self.runtime)
        _check_positive("batch", self.batch)
        _check_positive("threads", self.threads)
        if self.teacher_ms is not None and not (
            isinstance(self.teacher_ms, (int, float)) and not isinstance(self.teacher_ms, bool)
            and self.teacher_ms > 0
        ):
            raise ValueError(f"teacher_ms must be a positive number of milliseconds, got {self.teacher_ms!r}")

    def make_table(self) -> LatencyTable:
        """The :class:`LatencyTable` on this spec's files."""
        return LatencyTable(self.path, self.cache_dir)


#: The channel multiple per x86 vector width (see :func:`kernel_friendly_round_to`).
_AVX512_MULTIPLE, _NARROW_MULTIPLE = 16, 8


def kernel_friendly_round_to(runtime: str = "onnxruntime", cpu: CpuInfo | None = None) -> int:
    """The channel multiple whose widths the int8 (and float) kernels of ``runtime`` run well.

    Measured (``bench/latency_round_to.py``, results in ``bench/results/``): ``c -> c``
    convolutions on a 16x16 input, batch 1, 1 thread, every ``c`` in 4..64, on an AMD
    EPYC with AVX-512 VNNI (onnxruntime 1.32, OpenVINO 2026.4). Microseconds:

    ====================  =====  =====  =====  =====  =====  =====  =====  =====  =====
    layer                 c=8    c=15   c=16   c=17   c=31   c=32   c=33   c=63   c=64
    ====================  =====  =====  =====  =====  =====  =====  =====  =====  =====
    onnxruntime int8 3x3  8.2    11.3   6.0    14.2   21.2   13.2   27.4   58.2   45.2
    onnxruntime int8 1x1  3.2    4.3    1.2    4.2    7.4    2.2    7.2    12.2   6.3
    onnxruntime fp32 3x3  6.7    13.0   11.7   26.7   65.7   40.7   71.4   228.8  155.9
    OpenVINO int8 3x3     4.5    4.4    5.2    10.2   12.4   12.5   19.7   45.3   43.6
    OpenVINO fp32 3x3     8.3    12.1   14.3   24.4   43.0   42.4   72.5   170.5  156.5
    ====================  =====  =====  =====  =====  =====  =====  =====  =====  =====

    onnxruntime's ``QLinearConv`` runs a width that is a multiple of 16 about twice as
    fast as its odd neighbours, and faster than the multiples of 8 or 4 below it (8
    channels cost more than 16). Among multiples of 16 no width was slower than a wider
    one, in every row (3x3 and 1x1, int8 and fp32, both runtimes; OpenVINO's int8 1x1
    layers, 1-9 µs, are within its counters' 1 µs resolution); with a multiple of 8 some
    width (8) ran slower than a wider twin: a pruned layer slower than the unpruned one.
    OpenVINO (oneDNN) steps at every multiple of 16: 17 channels cost about what 32 do.
    So 16 on x86 with AVX-512, in both runtimes. Per MAC a narrow layer still costs more
    than a wide one (16 channels: ~2x the cost per MAC of 64 at 3x3 in onnxruntime int8):
    rounding removes the odd-width penalty, not the fixed cost per output pixel.

    Not measured here: x86 without AVX-512 (AVX2) and 64-bit ARM get 8, the width of
    their 256-bit / 128-bit int8 and fp32 blocks (onnxruntime's NCHWc block is 8 floats
    on AVX2); an unknown CPU gets 16, a multiple of both.

    Args:
        runtime: ``onnxruntime`` or ``openvino``.
        cpu: The CPU (:func:`~qtemperate.export.targets.cpu_info`); default this one.

    Returns:
        16 or 8.

    Raises:
        ValueError: for an unknown runtime.
    """
    from qtemperate.export.targets import cpu_info

    _check_runtime(runtime)
    info = cpu or cpu_info()
    if info.machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        if not info.flags or "avx512f" in info.flags:
            return _AVX512_MULTIPLE
        return _NARROW_MULTIPLE
    if info.machine in ("aarch64", "arm64", "armv8", "armv8l", "arm64e"):
        return _NARROW_MULTIPLE
    return _AVX512_MULTIPLE
