"""Where the bytes of an ONNX file go: weights, scales, zero points, biases, graph.

A quantized file cannot be exactly ``params x bits``: each integer weight tensor needs its
float32 scales (one per output channel) for ``DequantizeLinear``, each bias is int32
with its own float32 per-channel scale (``s_x * s_w``; needed for onnxruntime to fuse
``QLinearConv``), every activation quantizer a float32 scale and an 8-bit zero point (the
zero point's type is the quantized type, so it stays), and the graph itself (nodes,
tensor names, shapes) is protobuf. :func:`onnx_byte_breakdown` attributes every byte of
the file to one of those parts, so a summary can show why a file is above the limit and
which part would have to shrink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

__all__ = ["onnx_byte_breakdown"]

_PARTS = (
    "weights",
    "weight_scales",
    "biases",
    "bias_scales",
    "activation_scales",
    "zero_points",
    "other_initializers",
    "graph",
)


def _roles(model: onnx.ModelProto) -> dict[str, str]:
    """``{initializer name: part}`` from how the graph uses each initializer."""
    inits = {i.name for i in model.graph.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            users.setdefault(name, []).append((n, k))
    roles: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        consumers = users.get(n.output[0], [])
        slot = {k for c, k in consumers if c.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
        from_init = n.input[0] in inits and n.op_type == "DequantizeLinear"
        kind = "activation"
        if from_init and 1 in slot:
            kind = "weight"
        elif from_init and 2 in slot:
            kind = "bias"
        for k, name in enumerate(n.input):
            if name not in inits or name in roles:
                continue
            if k == 0:
                roles[name] = {"weight": "weights", "bias": "biases"}.get(kind, "other_initializers")
            elif k == 1:
                roles[name] = {"weight": "weight_scales", "bias": "bias_scales"}.get(
                    kind, "activation_scales")
            else:
                roles[name] = "zero_points"
    return roles


def onnx_byte_breakdown(
    path: str | Path, params: int | None = None, bits: int | None = None
) -> dict[str, Any]:
    """Attribute the bytes of an ONNX file to its parts.

    Each initializer counts with its serialized size (data, dims and name); ``graph`` is
    the rest of the file (nodes, names, opsets, metadata).

    Args:
        path: The ONNX file.
        params: The model's parameter count, for ``limit_bytes = params * bits / 8``.
        bits: The weights' storage width in the file (8 for INT8, 4 for packed INT4).

    Returns:
        ``{"file_bytes", "parts": {part: bytes}, "limit_bytes", "ratio_to_limit"}``; the
        parts sum to ``file_bytes``; the limit entries are ``None`` without ``params``/``bits``.
    """
    path = Path(path)
    model = onnx.load(str(path))
    file_bytes = path.stat().st_size
    roles = _roles(model)
    parts = dict.fromkeys(_PARTS, 0)
    for init in model.graph.initializer:
        parts[roles.get(init.name, "other_initializers")] += init.ByteSize()
    parts["graph"] = file_bytes - sum(parts.values())
    limit = params * bits / 8 if params is not None and bits is not None else None
    return {
        "file_bytes": file_bytes,
        "parts": parts,
        "limit_bytes": limit,
        "ratio_to_limit": file_bytes / limit if limit else None,
    }
