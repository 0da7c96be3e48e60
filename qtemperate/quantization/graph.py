"""Graph helpers of the conversion: FX tracing, BatchNorm folding, first/last layers, bias sources."""

from __future__ import annotations

import itertools
import warnings

import torch
from brevitas.nn import QuantMultiheadAttention
from brevitas.nn.mixin.base import QuantLayerMixin
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from qtemperate.fx_graph import input_layers, output_layers
from qtemperate.quantization.coverage import _quantizer_output
from qtemperate.quantization.layers import (
    _ACT_MODULES,
    _QUANT_WBIOL,
    _SCALE_SOURCE_ATTR,
    QuantAvgPoolRequant,
    QuantResidualAdd,
    _IntBiasMixin,
    _is_residual_add,
    _record_output_scale,
)
from qtemperate.quantization.ops import QUANT_OPS, Concat, Mean, Mul, QuantActivation, QuantRequant

__all__ = ["fold_batch_norms", "output_layers"]


def _is_quant_leaf(m: nn.Module) -> bool:
    """Quantized modules traced as one node: Brevitas layers/proxies/MHA and qtemperate's ops."""
    return isinstance(
        m,
        (
            QuantLayerMixin,
            QuantProxyFromInjector,
            QuantMultiheadAttention,
            QuantResidualAdd,
            QuantAvgPoolRequant,
            *QUANT_OPS,
            Concat,
            Mean,
            Mul,
        ),
    )


def _trace(model: nn.Module) -> fx.GraphModule | None:
    """FX-trace with residual adds and quantized modules as leaves; None when not traceable."""

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if _is_residual_add(m) or isinstance(m, (*_QUANT_WBIOL, *_ACT_MODULES)) or _is_quant_leaf(m):
                return True
            return super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # any tracing failure means "use the fallback"
        return None
    return fx.GraphModule(model, graph)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fold_batch_norms(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every ``BatchNorm`` that directly follows a convolution into that convolution.

    With BN running statistics ``mu, var``, affine ``gamma, beta`` and ``eps``:

        W' = W * gamma / sqrt(var + eps)   (per output channel)
        b' = (b - mu) * gamma / sqrt(var + eps) + beta

    The convolution gets the bias ``b'`` (created if absent) and the BN is replaced by
    ``nn.Identity``. Works in place on ``model``. Pairs are found on the FX graph (a conv
    whose only user is a BN); if the model is not FX-traceable, a conv immediately followed
    by a BN with matching channel count among the same parent's children is folded.

    Args:
        model: float model (modified in place).

    Returns:
        The list of folded ``(conv_name, bn_name)`` pairs.
    """
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    gm = _trace(model)
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(
                modules.get(node.target), nn.BatchNorm2d | nn.BatchNorm1d
            ):
                continue
            src = node.args[0]
            if (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d | nn.Conv1d)
                and len(src.users) == 1
            ):
                pairs.append((src.target, node.target))
    else:
        warnings.warn(
            "fold_batch_norms: model is not FX-traceable; folding conv->bn by child order",
            stacklevel=2,
        )
        for parent_name, parent in model.named_modules():
            children = list(parent.named_children())
            for (cname, c), (bname, b) in itertools.pairwise(children):
                if isinstance(c, nn.Conv2d | nn.Conv1d) and isinstance(
                    b, nn.BatchNorm2d | nn.BatchNorm1d
                ):
                    prefix = f"{parent_name}." if parent_name else ""
                    pairs.append((prefix + cname, prefix + bname))
    for conv_name, bn_name in pairs:
        conv = modules[conv_name]
        bn = modules[bn_name]
        if bn.num_features != conv.out_channels or bn.running_mean is None:
            continue
        w, b = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight = nn.Parameter(w.detach().clone())
        conv.bias = nn.Parameter(b.detach().clone())
        _set_submodule(model, bn_name, nn.Identity())
    return pairs


def _first_last_layers(model: nn.Module, gm: fx.GraphModule | None) -> tuple[set[str], set[str]]:
    """Names of the layers reading the model input and of the layers producing its outputs."""
    wb_types = (nn.Conv1d, nn.Conv2d, nn.Linear)
    modules = dict(model.named_modules())
    if gm is not None:
        passthrough = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten)
        first, _ = input_layers(gm, lambda m: isinstance(m, wb_types), lambda _n, m: isinstance(m, passthrough))
        ordered = [
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules.get(n.target), wb_types)
        ]
        if first and ordered:
            return first, output_layers(gm, lambda m: isinstance(m, wb_types)) or {ordered[-1]}
    ordered = [name for name, m in model.named_modules() if isinstance(m, wb_types)]
    if not ordered:
        return set(), set()
    return {ordered[0]}, {ordered[-1]}


def _pool_input_is_relu(
    gm: fx.GraphModule | None, modules: dict[str, nn.Module], name: str
) -> bool:
    if gm is None:
        return False
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == name:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module":
                return isinstance(modules.get(src.target), nn.ReLU)
            return isinstance(src, fx.Node) and src.target in (torch.relu, nn.functional.relu)
    return False


_PASSTHROUGH_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
_PASSTHROUGH_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    nn.functional.max_pool1d,
    nn.functional.max_pool2d,
    nn.functional.dropout,
)
_PASSTHROUGH_METHODS = ("flatten", "view", "reshape", "contiguous")


def _quantizer_producer(src: object, modules: dict[str, nn.Module]) -> str | None:
    """The module (``nn.ReLU``, activation, avg pool, mean...: :mod:`.coverage`) whose quantized
    output ``src`` is, through passthrough ops.

    Walks back through ops that keep values on the quantizer's grid and that the export
    moves the ``DequantizeLinear`` below (Identity, Dropout, MaxPool, Flatten,
    view/reshape); ``None`` when ``src`` is not a quantizer output.
    """
    while isinstance(src, fx.Node):
        if src.op == "call_module":
            mod = modules.get(src.target)
            if _quantizer_output(mod):  # ReLU, activations, avg pools, means: see coverage.py
                return str(src.target)
            if not isinstance(mod, _PASSTHROUGH_MODULES):
                return None
        elif not (
            (src.op == "call_function" and src.target in _PASSTHROUGH_FUNCTIONS)
            or (src.op == "call_method" and src.target in _PASSTHROUGH_METHODS)
        ):
            return None
        src = src.args[0] if src.args else None
    return None


def _input_quantizer_sources(gm: fx.GraphModule | None, modules: dict[str, nn.Module]) -> dict:
    """``{layer: producer}`` for float conv/linear layers whose input is a quantizer output.

    The producer is the name of an ``nn.ReLU`` (becomes ``QuantReLU``), an avg pool (becomes
    :class:`QuantAvgPoolRequant`) or another module that :func:`quantize` ends with a
    quantizer (activations, means, bilinear upsampling; see :mod:`.coverage`), reached backwards through ops that the export moves the
    ``DequantizeLinear`` below (Identity, Dropout, MaxPool, Flatten, view/reshape), i.e. the
    quantizer whose scale is ``s_x`` of the layer's ``DequantizeLinear`` input in ONNX.
    """
    if gm is None:
        return {}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.Conv1d | nn.Conv2d | nn.Linear
        ):
            continue
        producer = _quantizer_producer(node.args[0] if node.args else None, modules)
        if producer is not None:
            out[node.target] = producer
    return out


def _residual_inputs_to_quantize(
    gm: fx.GraphModule | None, modules: dict[str, nn.Module], name: str
) -> tuple[bool, bool]:
    """Which of a residual add's two inputs need its quantizer (``False``: already quantized).

    An input that is a quantizer output (:func:`_quantizer_producer`, e.g. the identity
    shortcut, the previous block's ReLU) is added as it is: requantizing it to the add's
    scale would cost precision and leave a ``DequantizeLinear -> QuantizeLinear`` pair in
    the graph that onnxruntime cannot fuse (its ``QLinearAdd`` takes two input scales).
    Both inputs are quantized when the graph is unknown.
    """
    if gm is None:
        return (True, True)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.args) == 2 and not node.kwargs:
            return tuple(_quantizer_producer(a, modules) is None for a in node.args)  # type: ignore[return-value]
    return (True, True)


def _producer_proxy(module: nn.Module) -> nn.Module | None:
    if isinstance(module, QuantAvgPoolRequant | QuantRequant):
        module = module.requant
    elif isinstance(module, QuantActivation):
        module = module.act_quant
    proxy = getattr(module, "act_quant", None)
    return proxy if isinstance(proxy, nn.Module) else None


def _link_bias_scale_sources(qmodel: nn.Module, sources: dict[str, str]) -> None:
    """Give each quantized layer a (non-module, non-state) reference to its input quantizer."""
    hooked: set[int] = set()
    for layer_name, src_name in sources.items():
        layer = qmodel.get_submodule(layer_name)
        proxy = _producer_proxy(qmodel.get_submodule(src_name))
        if not isinstance(layer, _IntBiasMixin) or proxy is None:
            continue
        if id(proxy) not in hooked:
            proxy.register_forward_hook(_record_output_scale)
            hooked.add(id(proxy))
        layer.__dict__[_SCALE_SOURCE_ATTR] = proxy  # plain attribute: not a submodule

