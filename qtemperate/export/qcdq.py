"""Rewrites of a Brevitas QCDQ graph so onnxruntime runs integer kernels and the file holds integers.

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
   half-to-even), so PyTorch and onnxruntime agree up to float summation order;
4. the all-zero int32 zero points of bias ``DequantizeLinear`` nodes are dropped (ONNX's
   default zero point is 0 of the input's type; 4 bytes per channel), identical initializers (the scalar scales and zero points Brevitas
   writes once per Q and once per DQ) are stored once, and internal tensor names are
   shortened and node names dropped: every byte left is a weight, a scale the format
   needs, or a node (:func:`qtemperate.export.size.onnx_byte_breakdown`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["INT4_OPSET", "postprocess_qcdq"]

INT4_OPSET = 21
"""First ONNX opset whose ``DequantizeLinear`` accepts ``INT4`` inputs."""

def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def postprocess_qcdq(
    model: onnx.ModelProto, allow_int4: bool, quantize_biases: bool = True
) -> onnx.ModelProto:
    """Apply the rewrites of the module docstring (3 only when ``quantize_biases``).

    ``quantize_biases=False`` keeps float biases, for graphs whose PyTorch model adds
    them in float (torch.ao's fake-quant models, :mod:`qtemperate.export.torch_ao`).
    """
    inits = {i.name: i for i in model.graph.initializer}
    int4_needed = allow_int4 and _has_int4_weights(model, inits) and not _shared_dq_reshape(model, inits)
    if int4_needed and _opset(model) < INT4_OPSET:
        model = _upgrade_opset(model, INT4_OPSET)
    _fold_weight_clips(model, use_int4=int4_needed)
    _move_dq_below_order_preserving_ops(model)
    if quantize_biases:
        _quantize_biases(model)
    _drop_zero_initializer_zero_points(model)
    _dedupe_initializers(model)
    _prune_initializers(model)
    _shorten_names(model)
    return model


_DROP_ZP_TYPES = {TensorProto.INT32}
"""Only int32 (bias) zero points: onnxruntime 1.32 fuses ``QGemm`` only when the weight's
``DequantizeLinear`` has its zero point (int8 weights keep theirs: 1 byte per channel)."""


def _drop_zero_initializer_zero_points(model: onnx.ModelProto) -> None:
    """Remove all-zero int32 zero points of bias DQs (default zero point: 0).

    An activation DQ keeps its zero point (onnxruntime compares it with its
    QuantizeLinear's when it fuses the pair), and so does a weight DQ (see below).
    """
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits:
            continue
        zp = inits.get(n.input[2])
        if zp is not None and zp.data_type in _DROP_ZP_TYPES and not np.any(numpy_helper.to_array(zp).astype(np.int64)):
            del n.input[2]


def _dedupe_initializers(model: onnx.ModelProto) -> None:
    """Point every user of an initializer identical to an earlier one (type, shape, bytes) at it."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for init in model.graph.initializer:
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
    if not rename:
        return
    for n in model.graph.node:
        n.input[:] = [rename.get(x, x) for x in n.input]


def _shorten_names(model: onnx.ModelProto) -> None:
    """Rename internal tensors to short base-36 ids (``t0``..``tz``, ``t10``..) and drop node names.

    The exporter names tensors after Brevitas' module paths
    (``/layer1/layer1.0/conv1/weight_quant/export_handler/...``); on a small model those
    strings were ~40 % of a 4-bit file. Node names are optional in ONNX (a node is known
    by its output). The graph's inputs and outputs keep their names.
    """
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = "t" + np.base_repr(len(mapping), 36).lower()
        return mapping[name]

    for init in g.initializer:
        init.name = short(init.name)
    for node in g.node:
        node.name = ""
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


def _shared_dq_reshape(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """An activation ``DequantizeLinear`` read by a ``Reshape`` and other nodes (GroupNorm's export).

    onnxruntime 1.32 cannot load such an opset-21 graph: its QDQ propagation copies the
    Q/DQ pair past the Reshape with ``output_dtype=INT8`` and its S8->U8 rewrite then
    changes the zero point to UINT8 ("output_dtype INT8 does not match y_zero_point type
    UINT8"). Such models keep INT8 weight storage at opset 20 (the values stay 4-bit).
    """
    users = _consumers(model)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            readers = users.get(n.output[0], [])
            if len(readers) > 1 and any(r.op_type == "Reshape" for r in readers):
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


