"""ONNX export of float and Brevitas-quantized models, checked and timed in onnxruntime.

:func:`export_onnx` writes a quantized model in the standard QCDQ form
(``QuantizeLinear -> [Clip] -> DequantizeLinear``; Brevitas legacy TorchScript exporter)
or a float model with plain ``torch.onnx.export``; both with a dynamic batch axis. The
QCDQ graph is then post-processed so onnxruntime runs integer kernels and the file holds
integers:

1. weight ``Clip`` nodes on constant integer weights are folded into the initializers;
   weights of at most 4 bits become packed ``INT4`` initializers (two per byte; needs
   opset 21, so such models are converted to opset 21), others stay ``INT8``;
2. per-tensor ``DequantizeLinear`` outputs feeding ``Flatten``/``Reshape``/``MaxPool`` are
   moved below them (exact for a per-tensor scale), so the next ``Gemm``/``Conv`` sees a
   dequantized input directly;
3. float biases of ``Conv``/``Gemm`` whose input and weight are dequantized become int32
   with scale ``s_b = s_x * s_w`` (per output channel): ``b_int = round(b / s_b)``. Without
   a quantized bias onnxruntime's QDQ fusion does not form ``QLinearConv`` (and
   onnxruntime 1.32 quantizes such a float bias itself when it optimizes the graph). The QAT
   layers of :mod:`qtemperate.quantization` round their bias with the very same formula
   (:func:`qtemperate.quantization.quantize_bias`: float32 ``s_b``, float64 division,
   half-to-even), so PyTorch and onnxruntime agree up to float summation order.

:func:`verify_onnx` compares onnxruntime against PyTorch eval; :func:`benchmark_onnx`
measures median latency per batch size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qtemperate.quantization import is_quantized

__all__ = [
    "INT4_OPSET",
    "VerifyReport",
    "benchmark_onnx",
    "export_onnx",
    "optimized_op_types",
    "verify_onnx",
]

INT4_OPSET = 21
"""First ONNX opset whose ``DequantizeLinear`` accepts ``INT4`` inputs."""

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# --------------------------------------------------------------------------- export
def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int | None = None,
) -> Path:
    """Export a quantized (QCDQ) or float model to ONNX with a dynamic batch axis.

    Args:
        qmodel: model from :func:`qtemperate.quantization.quantize`, or any float model.
        path: output ``.onnx`` file (parent directories are created).
        example_input: example batch (its batch size is irrelevant: the axis is dynamic).
        opset: ONNX opset for the TorchScript exporter (<= 20). Defaults to 17 for float and
            >4-bit models; models with <=4-bit weights are exported at 20 and converted to
            opset 21 for packed ``INT4`` weights.

    Returns:
        The path written.

    Raises:
        ValueError: if ``opset`` is outside 13..21 or ``example_input`` is not a tensor.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(
            f"example_input must be a torch.Tensor, got {type(example_input).__name__}"
        )
    if opset is not None and not 13 <= opset <= INT4_OPSET:
        raise ValueError(f"opset must be in 13..{INT4_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_opset = 17 if opset is None else min(opset, 20)
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        "opset_version": export_opset,
        "dynamo": False,
    }
    device = next(qmodel.parameters()).device
    x = example_input.to(device)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_quantized(qmodel):
                from brevitas.export import export_onnx_qcdq

                export_onnx_qcdq(qmodel, x, export_path=str(path), **kwargs)
            else:
                with torch.no_grad():
                    torch.onnx.export(qmodel, (x,), str(path), **kwargs)
    finally:
        qmodel.train(was_training)
    if is_quantized(qmodel):
        model = onnx.load(str(path))
        model = _postprocess_qcdq(model, allow_int4=opset is None or opset >= INT4_OPSET)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return path


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _postprocess_qcdq(model: onnx.ModelProto, allow_int4: bool) -> onnx.ModelProto:
    inits = {i.name: i for i in model.graph.initializer}
    int4_needed = allow_int4 and _has_int4_weights(model, inits)
    if int4_needed and _opset(model) < INT4_OPSET:
        model = _upgrade_opset(model, INT4_OPSET)
    _fold_weight_clips(model, use_int4=int4_needed)
    _move_dq_below_order_preserving_ops(model)
    _quantize_biases(model)
    _prune_initializers(model)
    _shorten_names(model)
    return model


def _shorten_names(model: onnx.ModelProto) -> None:
    """Rename internal tensors and nodes to short ids (``t12``, ``n7``).

    The exporter names tensors after Brevitas' module paths
    (``/layer1/layer1.0/conv1/weight_quant/export_handler/...``); on a small model those
    strings were ~40 % of a 4-bit file. The graph's input and output keep their names.
    """
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    for init in g.initializer:
        init.name = short(init.name)
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    for vi in g.value_info:
        vi.name = short(vi.name)


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert to ``target`` with the ONNX version converter; bump the import if it fails.

    Every op the exporter emits here (Conv, Gemm, Relu, Add, pools, Flatten, Reshape,
    Q/DQ, Clip) has the same semantics in opsets 17..21 under default attributes.
    """
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, target)
        del converted.graph.value_info[:]  # shape annotations the converter adds: pure file bloat
        return converted
    except Exception:  # any converter failure: fall back to a plain opset bump
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
        return model


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def _weight_clips(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]):
    """Yield ``(clip, dq)`` for Clip nodes on constant int weights feeding one DequantizeLinear."""
    users = _consumers(model)
    for n in model.graph.node:
        if n.op_type != "Clip" or len(n.input) < 3 or n.input[0] not in inits:
            continue
        if inits[n.input[0]].data_type not in (TensorProto.INT8, TensorProto.UINT8):
            continue
        dqs = users.get(n.output[0], [])
        if (
            len(dqs) == 1
            and dqs[0].op_type == "DequantizeLinear"
            and dqs[0].input[0] == n.output[0]
        ):
            yield n, dqs[0]


def _has_int4_weights(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> bool:
    for clip, _ in _weight_clips(model, inits):
        lo, hi = (numpy_helper.to_array(inits[clip.input[k]]) for k in (1, 2))
        if int(lo) >= -8 and int(hi) <= 7:
            return True
    return False


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """Packed ``INT4`` tensor: element ``2k`` in the low nibble of byte ``k``, ``2k+1`` in the high."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def _fold_weight_clips(model: onnx.ModelProto, use_int4: bool) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    remove: list[onnx.NodeProto] = []
    for clip, dq in list(_weight_clips(model, inits)):
        w = numpy_helper.to_array(inits[clip.input[0]])
        lo, hi = (int(numpy_helper.to_array(inits[clip.input[k]])) for k in (1, 2))
        w = np.clip(w, lo, hi)
        base = clip.output[0]
        zp_name = dq.input[2] if len(dq.input) > 2 else ""
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else None
        if use_int4 and lo >= -8 and hi <= 7 and w.dtype == np.int8:
            w_t = _int4_tensor(base + "_int4", w)
            zp_t = _int4_tensor(base + "_int4_zp", zp.astype(np.int8)) if zp is not None else None
        else:
            w_t = numpy_helper.from_array(w, base + "_int")
            zp_t = numpy_helper.from_array(zp, base + "_int_zp") if zp is not None else None
        model.graph.initializer.append(w_t)
        dq.input[0] = w_t.name
        if zp_t is not None:
            model.graph.initializer.append(zp_t)
            dq.input[2] = zp_t.name
        remove.append(clip)
    for n in remove:
        model.graph.node.remove(n)


def _move_dq_below_order_preserving_ops(model: onnx.ModelProto) -> None:
    """Rewrite ``DQ -> op`` into ``op -> DQ`` for per-tensor DQs and op in Flatten/Reshape/MaxPool.

    Exact: a reshape commutes with the element-wise DQ, and with a positive scale ``s``
    ``max_i s (q_i - z) = s (max_i q_i - z)``; MaxPool accepts 8-bit integers (opset >= 12).
    """
    changed = True
    while changed:
        changed = False
        prod = _producers(model)
        users = _consumers(model)
        for n in list(model.graph.node):
            if n.op_type not in ("Flatten", "Reshape", "MaxPool") or len(n.output) != 1:
                continue
            dq = prod.get(n.input[0])
            if (
                dq is None
                or dq.op_type != "DequantizeLinear"
                or len(users.get(dq.output[0], [])) != 1
            ):
                continue
            scale = _const(model, dq.input[1])
            if scale is None or scale.size != 1 or float(scale) <= 0:
                continue
            # DQ(q) -> R  ==>  R(q) -> DQ ; the new DQ writes the reshape's old output name
            out_name = n.output[0]
            mid = out_name + "_int"
            n.input[0] = dq.input[0]
            n.output[0] = mid
            dq.input[0] = mid
            dq.output[0] = out_name
            nodes = list(model.graph.node)
            nodes.remove(dq)
            nodes.insert(nodes.index(n) + 1, dq)
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            changed = True
            break


def _quantize_biases(model: onnx.ModelProto) -> None:
    prod = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        if n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
            continue
        dq_x, dq_w = prod.get(n.input[0]), prod.get(n.input[1])
        if (
            dq_x is None
            or dq_w is None
            or dq_x.op_type != dq_w.op_type
            or dq_x.op_type != "DequantizeLinear"
        ):
            continue
        s_x, s_w = _const(model, dq_x.input[1]), _const(model, dq_w.input[1])
        bias = numpy_helper.to_array(inits[n.input[2]])
        if s_x is None or s_w is None or s_x.size != 1 or bias.dtype != np.float32:
            continue
        if s_w.size not in (1, bias.size):
            continue
        scale = (s_x.astype(np.float64).reshape(()) * s_w.astype(np.float64).reshape(-1)).astype(
            np.float32
        )
        scale_b = (
            np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.size == 1 else scale
        )
        q = np.clip(np.round(bias.astype(np.float64) / scale_b), -(2**31), 2**31 - 1).astype(
            np.int32
        )
        base = n.input[2] + "_int32"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, base),
                numpy_helper.from_array(scale_b.astype(np.float32), base + "_scale"),
                numpy_helper.from_array(np.zeros(bias.shape, np.int32), base + "_zp"),
            ]
        )
        n.input[2] = base + "_dq"  # mutate before the node list is rebuilt (protobuf copies)
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [base, base + "_scale", base + "_zp"],
                [base + "_dq"],
                name=base + "_DequantizeLinear",
                axis=0,
            )
        )
    if new_nodes:  # bias DQs read only initializers: put them first (topological order)
        nodes = new_nodes + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _prune_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    names = {i.name for i in keep}
    graph_inputs = [i for i in model.graph.input if i.name not in names and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)


# --------------------------------------------------------------------------- onnxruntime
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
    device = next(model.parameters()).device
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
