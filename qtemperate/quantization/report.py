"""The quantization report: every operation of a model, quantized or float, and why.

:func:`quantization_report` reads the model the user holds — its traced graph and its
live quantizers — so the report is true for any model: one from
:func:`~qtemperate.quantization.quantize` (``quantize(..., return_report=True)`` returns
it beside the model), a stock Brevitas model, a float model, a torch.ao QAT model.

One row per operation that computes something (conv/linear/attention, activations,
pools, upsampling, additions, products, concatenations, normalizations, and every
functional op left in the forward such as ``matmul`` or ``softmax``); pure data movement
(reshape, flatten, transpose, indexing, dropout) is not listed. Each row says:

* ``weight_bits`` — the bit width of the op's weight quantizer, 32 for a float weight,
  None for an op without weights;
* ``act_bits`` — the bit width of the quantizer that puts the op's activations on an
  integer grid: the quantizer of its input for conv/linear/attention, additions, products,
  concatenations and normalizations; its output quantizer for activations, average pools,
  means and upsampling; the grid of its input for max pooling and nearest upsampling
  (which copy integers). None means the op computes on float activations;
* ``status`` — ``"quantized"`` when the activations (and weights, if any) are quantized,
  ``"float"`` otherwise, ``"unknown"`` where the model could not be traced;
* ``reason`` — why an op is float (or what stays float inside a quantized one).

A normalization layer counts as quantized when its input is (its statistics and affine
parameters are float32 by nature and its row says so; :func:`~qtemperate.size.model_size`
counts those parameters at 32 bits).
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from brevitas.nn import QuantMultiheadAttention
from brevitas.nn.mixin.base import QuantLayerMixin
from torch import fx, nn

from qtemperate.quantization.layers import (
    _ACT_MODULES,
    _QUANT_WBIOL,
    QuantAvgPoolRequant,
    QuantResidualAdd,
    _is_residual_add,
    is_quantized,
)
from qtemperate.quantization.ops import (
    Concat,
    Mean,
    Mul,
    QuantActivation,
    QuantConcat,
    QuantMul,
    QuantNormInput,
    QuantRequant,
)
from qtemperate.quantization.proxies import PROXY_ATTRS, enabled_proxy, proxy_bits
from qtemperate.quantization.torch_ao import ao_bit_widths, ao_kind, ao_weights

__all__ = [
    "FloatLeftoverError",
    "LayerQuantization",
    "QuantizationReport",
    "quantization_report",
    "quantization_summary",
    "refuse_quantized",
]

REPORT_FILE = "quantization_report.json"
"""File name of the report in a run folder (``qtemperate run`` writes it)."""

_MOVE_METHODS = {
    "flatten",
    "view",
    "reshape",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "chunk",
    "split",
    "t",
    "to",
    "float",
    "type",
    "type_as",
    "clone",
    "detach",
    "size",
    "dim",
    "numel",
}
_MOVE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.t,
    operator.getitem,
    getattr,
    len,
    torch.nn.functional.dropout,
}
_MOVE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten)
_INTEGER_COPY_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


class FloatLeftoverError(ValueError):
    """``quantize(..., strict=True)`` left operations in float; the message lists them."""


@dataclass(frozen=True)
class LayerQuantization:
    """One row of the report (see the module docstring)."""

    name: str
    op: str
    weight_bits: int | None
    act_bits: int | None
    status: str
    reason: str = ""


@dataclass
class QuantizationReport:
    """What is quantized in a model, operation by operation.

    Attributes:
        rows: One :class:`LayerQuantization` per computing operation, in graph order.
        traced: Whether the model's forward could be traced (functional ops inspected).
    """

    rows: list[LayerQuantization] = field(default_factory=list)
    traced: bool = True

    @property
    def float_ops(self) -> list[LayerQuantization]:
        """Rows that are not quantized (status ``float`` or ``unknown``)."""
        return [r for r in self.rows if r.status != "quantized"]

    @property
    def fully_quantized(self) -> bool:
        return not self.float_ops

    def raise_on_float(self) -> None:
        """Raise :class:`FloatLeftoverError` naming every float operation, if any."""
        left = self.float_ops
        if left:
            items = "; ".join(f"{r.name} ({r.op}): {r.reason}" for r in left)
            raise FloatLeftoverError(f"{len(left)} operation(s) stay float (strict=True): {items}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view: the rows and the names of the float operations."""
        return {
            "traced": self.traced,
            "fully_quantized": self.fully_quantized,
            "float_ops": [r.name for r in self.float_ops],
            "rows": [asdict(r) for r in self.rows],
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def format(self) -> str:
        """A plain-text table (one line per operation, float ones with their reason)."""

        def bits(b: int | None) -> str:
            return "-" if b is None else ("float" if b == 32 else str(b))

        header = ("layer", "op", "weight", "act", "status")
        table = [header] + [
            (
                r.name,
                r.op,
                bits(r.weight_bits),
                "float" if r.act_bits is None else str(r.act_bits),
                r.status,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
        for i, r in enumerate(self.rows, start=1):
            if r.reason:
                lines[i] += f"  # {r.reason}"
        n_float = len(self.float_ops)
        lines.append(
            f"{len(self.rows) - n_float} of {len(self.rows)} operations quantized"
            + (f"; float: {', '.join(r.name for r in self.float_ops)}" if n_float else "")
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def refuse_quantized(model: nn.Module) -> None:
    """Raise a helpful error when :func:`quantize` is handed an already quantized model."""
    kind = ao_kind(model)
    if kind is not None:
        raise ValueError(
            f"model is a torch.ao {kind} model: quantize() builds Brevitas QAT models from "
            "float models. qtemperate works on it as it is: model_size(), get_bit_widths() "
            "and (prepared models) set_bit_width() read and switch its fake-quant ranges"
        )
    if is_quantized(model):
        raise ValueError(
            "model is already quantized (it holds Brevitas layers): use set_bit_width() to "
            "change its bit widths (it rebuilds any Brevitas quantizer at the new width and "
            "keeps its learned scales) and quantization_report() to see what is quantized"
        )


# --------------------------------------------------------------------------- graph walk
def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _bits(module: nn.Module | None, attr: str) -> int | None:
    return proxy_bits(enabled_proxy(module, attr))


def _bias_note(m: nn.Module) -> str:
    """A float bias that the export's integer kernels will round but PyTorch does not."""
    from qtemperate.quantization.layers import _IntBiasMixin

    if getattr(m, "bias", None) is None or isinstance(m, _IntBiasMixin) or _bits(m, "bias_quant"):
        return ""
    return (
        "float bias: onnxruntime's integer kernels round it to the int32 grid s_x*s_w, "
        "PyTorch does not (bias_quant=Int32Bias makes both round it)"
    )


def _identity_bits(q: nn.Module | None) -> int | None:
    """Bits of a QuantIdentity-like quantizer module (None for nn.Identity / disabled)."""
    return _bits(q, "act_quant") if q is not None else None


class _Walk:
    """The report's walk over a traced graph; ``grid[node]`` is the bits of its output grid."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.modules = dict(model.named_modules())
        self.gm = gm
        self.grid: dict[fx.Node, int | None] = {}
        self.rows: list[LayerQuantization] = []
        from qtemperate.quantization.functional import tensor_valued

        self.tensors = tensor_valued(gm)

    def input_bits(self, node: fx.Node) -> list[int | None]:
        return [
            self.grid.get(a)
            for a in node.args
            if isinstance(a, fx.Node) and self.tensors.get(a, True)
        ]

    def add(
        self,
        node: fx.Node,
        op: str,
        w: int | None,
        a: int | None,
        reason_if_float: str,
        note: str = "",
    ) -> None:
        quantized = a is not None and w != 32
        reason = note if quantized else reason_if_float
        self.rows.append(
            LayerQuantization(_name(node), op, w, a, "quantized" if quantized else "float", reason)
        )

    def requantized_by(self, node: fx.Node) -> int | None:
        """Bits of the quantizer(s) that every use of ``node`` goes into (through data moves).

        An op between quantizers (an average pool, a mean, a softmax whose output only
        feeds a quantizer, on quantized inputs) is quantized like
        :class:`~qtemperate.quantization.ops.QuantRequant`.
        """
        bits: set[int | None] = set()
        frontier, seen = list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            mod = self.modules.get(str(user.target)) if user.op == "call_module" else None
            moves = (
                (user.op == "call_method" and user.target in _MOVE_METHODS)
                or (user.op == "call_function" and user.target in _MOVE_FUNCTIONS)
                or isinstance(mod, _MOVE_MODULES)
            )
            if moves:
                frontier.extend(user.users)
            elif isinstance(mod, _ACT_MODULES) and type(mod).__name__ == "QuantIdentity":
                bits.add(_bits(mod, "act_quant") or _bits(mod, "input_quant"))
            elif isinstance(mod, QuantLayerMixin) and _bits(mod, "input_quant") is not None:
                bits.add(_bits(mod, "input_quant"))
            else:
                return None
        return bits.pop() if len(bits) == 1 else None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.module(node, self.modules.get(str(node.target)))
            elif node.op in ("call_function", "call_method"):
                self.function(node)
            elif node.op in ("placeholder", "get_attr"):
                self.grid[node] = None

    def function(self, node: fx.Node) -> None:
        ins = [a for a in node.all_input_nodes if self.tensors.get(a, True)]
        moves = (node.op == "call_method" and node.target in _MOVE_METHODS) or (
            node.op == "call_function" and node.target in _MOVE_FUNCTIONS
        )
        if not self.tensors.get(node, True):
            return
        if moves:
            self.grid[node] = self.grid.get(ins[0]) if ins else None
            return
        self.grid[node] = None
        on_grid = bool(ins) and all(self.grid.get(i) is not None for i in ins)
        requant = self.requantized_by(node) if on_grid else None
        if requant is not None:
            self.rows.append(
                LayerQuantization(
                    _name(node),
                    _op_name(node),
                    None,
                    requant,
                    "quantized",
                    "computes in float between quantizers (quantized inputs, requantized output)",
                )
            )
            return
        where = "on quantized inputs" if on_grid else "on float inputs"
        self.rows.append(
            LayerQuantization(
                _name(node),
                _op_name(node),
                None,
                None,
                "float",
                f"functional {_op_name(node)} has no quantized form here: it computes in float {where}",
            )
        )

    def module(self, node: fx.Node, m: nn.Module | None) -> None:
        ins = self.input_bits(node)
        first = ins[0] if ins else None
        out: int | None = None
        kind = type(m).__name__
        if m is None:
            pass
        elif isinstance(m, _MOVE_MODULES):
            out = first
        elif isinstance(m, _INTEGER_COPY_MODULES) or (
            isinstance(m, nn.Upsample) and m.mode in ("nearest", "nearest-exact")
        ):
            out = first
            self.add(node, kind, None, first, "input not quantized: it runs in float")
        elif isinstance(m, _QUANT_WBIOL):
            w = _bits(m, "weight_quant")
            a = _bits(m, "input_quant") or first
            out = _bits(m, "output_quant")
            reason = "weight not quantized" if w is None else "input activations not quantized"
            self.add(node, kind, 32 if w is None else w, a, reason, _bias_note(m))
        elif isinstance(m, QuantMultiheadAttention):
            projs = [
                p for p in (m.in_proj, m.q_proj, m.k_proj, m.v_proj, m.out_proj) if p is not None
            ]
            ws = [_bits(p, "weight_quant") for p in projs]
            a = _bits(projs[0], "input_quant")
            w = None if None in ws else min(ws)
            self.add(
                node,
                kind,
                32 if w is None else w,
                a,
                "projections not quantized",
                "softmax and the attention matmuls run on quantized q, k, v and attention weights",
            )
        elif isinstance(m, QuantActivation):
            out = _identity_bits(m.act_quant)
            self.add(node, type(m.act).__name__, None, out, "no quantizer on its output")
        elif isinstance(m, QuantRequant | QuantAvgPoolRequant):
            inner = m.op if isinstance(m, QuantRequant) else m.pool
            out = _identity_bits(m.requant)
            self.add(node, type(inner).__name__, None, out, "no quantizer on its output")
        elif isinstance(m, QuantResidualAdd):
            a = _identity_bits(m.input_quant)
            self.add(
                node,
                "add",
                None,
                a,
                "no quantizer on its inputs",
                "one shared quantizer for both inputs",
            )
        elif isinstance(m, QuantConcat):
            out = _identity_bits(m.input_quant)
            self.add(
                node,
                "cat",
                None,
                out,
                "no quantizer on its inputs",
                "one shared quantizer for all inputs",
            )
        elif isinstance(m, QuantMul):
            qa = (
                _identity_bits(m.quant_a)
                if not isinstance(m.quant_a, nn.Identity)
                else (ins[0] if ins else None)
            )
            qb = (
                _identity_bits(m.quant_b)
                if not isinstance(m.quant_b, nn.Identity)
                else (ins[1] if len(ins) > 1 else None)
            )
            a = None if qa is None or qb is None else min(qa, qb)
            self.add(node, "mul", None, a, "an input is not quantized")
        elif isinstance(m, QuantNormInput):
            has_affine = next(m.norm.parameters(), None) is not None
            a = _identity_bits(m.input_quant)
            self.add(
                node,
                type(m.norm).__name__,
                None,
                a,
                "no quantizer on its input",
                "statistics"
                + (" and affine parameters" if has_affine else "")
                + " in float32 on the quantized input",
            )
        elif isinstance(m, _ACT_MODULES):
            out = _bits(m, "act_quant")
            self.add(node, kind, None, out, "quantizer disabled")
        elif isinstance(m, QuantLayerMixin):
            bits = [_bits(m, attr) for attr in PROXY_ATTRS if attr != "bias_quant"]
            a = next((b for b in bits if b is not None), None) or first
            out = _bits(m, "output_quant") or _bits(m, "act_quant")
            self.add(node, kind, None, a, "no enabled quantizer")
        elif isinstance(m, Concat | Mul | Mean) or _is_residual_add(m):
            self.add(node, kind, None, None, "no quantizer: quantize() has not been applied")
        elif type(m) is nn.MultiheadAttention:
            bypass = any(enabled_proxy(c, "weight_quant") is not None for c in m.modules())
            why = (
                "its forward reads out_proj.weight directly, bypassing the quantizer"
                if bypass
                else "float nn.MultiheadAttention"
            )
            self.add(node, kind, 32, None, why)
        elif next(m.parameters(), None) is not None:
            what = (
                "not quantized"
                if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
                else (f"no quantized replacement for {kind}")
            )
            self.add(node, kind, 32, None, what)
        else:
            requant = self.requantized_by(node) if first is not None else None
            self.add(
                node,
                kind,
                None,
                requant,
                f"no quantizer: {kind} computes in float",
                "computes in float between quantizers (quantized inputs, requantized output)",
            )
        self.grid[node] = out


def _ao_report(model: nn.Module) -> QuantizationReport:
    """torch.ao models: one row per weight layer and fake-quant (module level)."""
    weights = ao_weights(model)
    bits = ao_bit_widths(model)
    rows = []
    for name, row in bits.items():
        w = weights[name].bits if name in weights else None
        a = row.get("act")
        op = type(model.get_submodule(name)).__name__
        rows.append(
            LayerQuantization(
                name,
                op,
                w,
                a,
                "quantized" if (w or a) else "float",
                "" if a is not None else "no fake-quant on its output",
            )
        )
    for name, m in model.named_modules():
        plain = type(m).__module__.startswith("torch.nn.modules")
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and name not in weights and plain:
            rows.append(
                LayerQuantization(
                    name, type(m).__name__, 32, None, "float", "not prepared for quantization"
                )
            )
    return QuantizationReport(rows, traced=False)


def quantization_report(model: nn.Module) -> QuantizationReport:
    """The :class:`QuantizationReport` of ``model`` as it is now (see the module docstring).

    Args:
        model: Any model: quantized by :func:`~qtemperate.quantization.quantize`, a stock
            Brevitas model, a float model or a torch.ao QAT model.

    Returns:
        The report. For a model that cannot be FX-traced the rows are the modules that own
        quantizers or weights, plus one ``unknown`` row saying that functional operations
        in ``forward`` were not inspected.
    """
    from qtemperate.quantization.graph import _trace

    if ao_kind(model) is not None:
        return _ao_report(model)
    gm = model if isinstance(model, fx.GraphModule) else _trace(model)
    if gm is not None:
        walk = _Walk(model, gm)
        walk.run()
        return QuantizationReport(walk.rows, traced=True)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, _QUANT_WBIOL):
            rows.append(
                LayerQuantization(
                    name,
                    type(m).__name__,
                    _bits(m, "weight_quant") or 32,
                    _bits(m, "input_quant"),
                    "unknown",
                    "model not traceable",
                )
            )
        elif isinstance(m, _ACT_MODULES) and _bits(m, "act_quant") is not None:
            rows.append(
                LayerQuantization(name, type(m).__name__, None, _bits(m, "act_quant"), "quantized")
            )
        elif isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            rows.append(
                LayerQuantization(name, type(m).__name__, 32, None, "float", "not quantized")
            )
    rows.append(
        LayerQuantization(
            "(forward)",
            "forward",
            None,
            None,
            "unknown",
            "the model is not FX-traceable: functional operations in forward() were not inspected",
        )
    )
    return QuantizationReport(rows, traced=False)


def quantization_summary(model: nn.Module) -> dict[str, Any]:
    """``summary.json``'s record of what is really quantized in ``model``.

    Returns:
        ``float_ops``: names of the operations that stay float (``[]`` when fully
        quantized); ``quantized_ops``: how many are quantized; ``act_bits_used``: the
        distinct activation bit widths of the quantized operations (``[]`` when no
        activation is quantized), so an activation width is only reported where a
        quantizer applies it.
    """
    report = quantization_report(model)
    quantized = [r for r in report.rows if r.status == "quantized"]
    return {
        "float_ops": [r.name for r in report.float_ops],
        "quantized_ops": len(quantized),
        "act_bits_used": sorted({r.act_bits for r in quantized if r.act_bits is not None}),
    }
