"""What :func:`~qtemperate.quantization.quantize` will make of a float model, read off its graph.

The planner searches pruning ratios for a bytes target at the final bit widths; building a
Brevitas model for every candidate (hundreds of quantizer proxies for a ResNet-50) only to
count its bytes cost most of the planning time and pulled Brevitas into ``qtemperate
plan``. A :class:`QuantLayout` holds the facts that decide the bytes and does not depend
on channel widths, so one layout of the teacher serves every pruned candidate (pruning
removes channels, not layers, and keeps module names):

* the conv/linear layers that become quantized layers and their role (``first``, ``last``,
  ``first_last`` or ``inner``: first/last layers take ``first_last_bits``);
* the convolutions a BatchNorm is folded into (they gain a bias; the BatchNorm's parameters
  disappear);
* the number of learned activation thresholds: one per ReLU, residual add or average pool
  (a model holding one its forward never calls gets no layout), one input
  quantizer per layer reading the model input or any tensor that is not a quantizer's
  output (a residual sum, a linear layer's output, ...), and one per BatchNorm that is not
  folded (it reads a quantized input, :class:`~qtemperate.quantization.ops.QuantNormInput`,
  and its parameters are reported under ``<name>.norm``).

:meth:`QuantLayout.size` then gives, from the candidate's widths alone, exactly the
:class:`~qtemperate.size.SizeReport` that ``model_size(quantize(model, ...))`` reports
(``macs`` aside): weights at their bit width plus one float32 scale per output channel (or
per tensor), float32 biases, float32 thresholds, every other parameter float32.

These are the decisions of :func:`qtemperate.quantization.quantize` (BatchNorm folding on
the FX graph, first/last layers, module replacement), made here without Brevitas. A model
with a module or a functional operation whose treatment is not mirrored here, or that FX
cannot trace, gets no layout (:func:`quant_layout` returns ``None``) and the planner counts bytes on the quantized model instead;
``tests/test_quant_layout.py`` pins the equality on the model zoo and on a model holding
every supported module type.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
from torch import fx, nn

from qtemperate.bits import FLOAT_BITS
from qtemperate.fx_graph import forward_is_add
from qtemperate.size import SizeReport

__all__ = ["QuantLayout", "quant_layout"]

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_FOLDED_INTO = (nn.Conv1d, nn.Conv2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_PASSIVE = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
# quantize()'s first-layer search walks through these modules (and through any function or
# method call except torch.add): the layers reached from the input get an input quantizer.
_FIRST_LAYER_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten)
# A layer reading a quantizer's output through these (values unchanged) needs no input
# quantizer of its own (quantization.graph._input_quantizer_sources).
_SOURCE_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
_SOURCE_FUNCTIONS = (torch.flatten, torch.reshape, nn.functional.max_pool1d, nn.functional.max_pool2d,
                     nn.functional.dropout)
_SOURCE_METHODS = ("flatten", "view", "reshape", "contiguous")
_PRODUCERS = (nn.ReLU, *_POOLS)  # modules quantize() ends with a quantizer (among the supported)
# Functional operations quantize() leaves alone (data movement): any other call_function /
# call_method is rewritten into a quantized module, which the layout does not mirror.
_PLAIN_FUNCTIONS = (*_SOURCE_FUNCTIONS, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    operator.getitem, getattr)
_PLAIN_METHODS = (*_SOURCE_METHODS, "permute", "transpose", "squeeze", "unsqueeze", "size", "dim")
_ADD_CACHE: dict[type, bool] = {}


def _is_residual_add(module: nn.Module) -> bool:
    """A ``ResidualAddMarker`` or a parameter-free leaf whose forward is ``a + b`` (as quantize)."""
    layers = sys.modules.get("qtemperate.quantization.layers")  # a marker needs it imported
    if layers is not None and isinstance(module, layers.ResidualAddMarker):
        return True
    if next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is not None:
        return False
    cls = type(module)
    if cls not in _ADD_CACHE:
        _ADD_CACHE[cls] = forward_is_add(module)
    return _ADD_CACHE[cls]


def _trace(model: nn.Module) -> fx.GraphModule | None:
    """FX graph with residual adds as leaves (quantize's tracer); None when not traceable."""

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return _is_residual_add(m) or super().is_leaf_module(m, qualname)

    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception:
        return None


def _fold_pairs(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{conv: bn}`` folded by quantize: a BN reading a conv that has no other user."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCH_NORMS):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), _FOLDED_INTO) and len(src.users) == 1):
            conv, bn = str(src.target), str(node.target)
            if modules[bn].num_features == modules[conv].out_channels and modules[bn].running_mean is not None:
                out[conv] = bn
    return out


def _first_last(gm: fx.GraphModule, modules: dict[str, nn.Module], folded_bns: set[str]) -> tuple[set[str], set[str]]:
    """Layers reading the model input, and the layers producing its outputs (as quantize finds them)."""
    from qtemperate.fx_graph import input_layers, output_layers

    # quantize() searches after folding: a folded BN is an Identity by then
    first, _ = input_layers(gm, lambda m: isinstance(m, _WEIGHT_LAYERS), lambda n, m: (
        isinstance(m, _FIRST_LAYER_PASSTHROUGH) or n.target in folded_bns))
    ordered = [n.target for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(modules.get(n.target), _WEIGHT_LAYERS)]
    if first and ordered:
        return first, output_layers(gm, lambda m: isinstance(m, _WEIGHT_LAYERS)) or {ordered[-1]}
    ordered = [name for name, m in modules.items() if isinstance(m, _WEIGHT_LAYERS)]
    return ({ordered[0]}, {ordered[-1]}) if ordered else (set(), set())


def _reads_a_quantizer(node: fx.Node, modules: dict[str, nn.Module], folded_bns: set[str]) -> bool:
    """Whether a layer's input is a quantizer's output, looking through value-preserving ops."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        if src.op == "call_module":
            mod = modules.get(str(src.target))
            if isinstance(mod, _PRODUCERS):
                return True
            if not (isinstance(mod, _SOURCE_PASSTHROUGH) or src.target in folded_bns):
                return False
        elif not ((src.op == "call_function" and src.target in _SOURCE_FUNCTIONS)
                  or (src.op == "call_method" and src.target in _SOURCE_METHODS)):
            return False
        src = src.args[0] if src.args else None
    return False


@dataclass(frozen=True)
class QuantLayout:
    """The width-independent facts of a float model's quantized form (module docstring).

    Attributes:
        roles: ``{layer: role}`` of every conv/linear layer ``quantize`` replaces.
        folded: ``{conv: batch_norm}`` folded pairs.
        thresholds: Learned activation thresholds (one float32 each).
        norms: BatchNorms that are not folded (reported as ``<name>.norm``).
    """

    roles: dict[str, str]
    folded: dict[str, str]
    thresholds: int
    norms: frozenset[str] = frozenset()

    def size(self, model: nn.Module, weight_bits: int, act_bits: int, first_last_bits: int = 8,
             per_channel: bool = True) -> SizeReport:
        """``model_size(quantize(model, weight_bits, act_bits, first_last_bits, per_channel))``.

        ``model`` is the float model this layout was read from, or a channel-pruned copy of
        it (same module names). ``act_bits`` does not change the bytes (thresholds are
        float32 at any bit width); it is taken for the signature's sake.
        """
        del act_bits
        folded_bns = set(self.folded.values())
        params, qbytes = 0, 0.0
        bits: dict[str, int] = {}
        for name, mod in model.named_modules():
            role = self.roles.get(name)
            if role is not None:
                b = first_last_bits if role != "inner" else weight_bits
                out_ch = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                n_bias = out_ch if (mod.bias is not None or name in self.folded) else 0
                n_w = mod.weight.numel()
                params += n_w + n_bias
                qbytes += n_w * b / 8 + 4 * (out_ch if per_channel else 1)
                qbytes += 4 * n_bias
                bits[name] = b
                continue
            own = dict(mod.named_parameters(recurse=False))
            if not own or name in folded_bns:
                continue
            n = sum(p.numel() for p in own.values())
            params += n
            qbytes += 4 * n
            if "weight" in own:
                bits[f"{name}.norm" if name in self.norms else name] = FLOAT_BITS
        qbytes += 4 * self.thresholds
        float_bytes = 4 * params
        return SizeReport(float_bytes=float_bytes, quantized_bytes=qbytes,
                          compression_ratio=qbytes / float_bytes if float_bytes else 1.0,
                          params=params, macs=None, bits=bits)


def _supported(name: str, mod: nn.Module) -> bool:
    if not name or isinstance(mod, (*_BATCH_NORMS, *_POOLS, *_PASSIVE, nn.ReLU)):
        return True
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        return mod.padding_mode == "zeros"
    if isinstance(mod, nn.Linear):
        return True
    if next(mod.parameters(recurse=False), None) is not None:
        return False  # a layer quantize() leaves float today, but may convert one day
    if next(mod.children(), None) is not None:
        return True  # a container: its children are checked themselves
    return _is_residual_add(mod)  # any other parameter-free leaf may be converted one day


def quant_layout(model: nn.Module) -> QuantLayout | None:
    """The :class:`QuantLayout` of a float model, or ``None`` when it holds a module type or a
    functional operation whose conversion is not mirrored here (or is already quantized, or
    FX cannot trace it)."""
    if "brevitas" in sys.modules:  # a model holding Brevitas layers is already quantized
        from qtemperate.quantization import is_quantized

        if is_quantized(model):
            return None
    modules = dict(model.named_modules())
    if not all(_supported(n, m) for n, m in modules.items()):
        return None
    gm = _trace(model)
    if gm is None:
        return None
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target not in _PLAIN_FUNCTIONS) or (
                node.op == "call_method" and node.target not in _PLAIN_METHODS):
            return None  # quantize() rewrites it into a quantized module first
    folded = _fold_pairs(gm, modules)
    folded_bns = set(folded.values())
    first, last = _first_last(gm, modules, folded_bns)
    roles: dict[str, str] = {}
    for name, mod in modules.items():
        if name and isinstance(mod, _WEIGHT_LAYERS):
            f, la = name in first, name in last
            roles[name] = "first_last" if f and la else "first" if f else "last" if la else "inner"
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    norms = {str(n.target) for n in calls
             if isinstance(modules.get(str(n.target)), _BATCH_NORMS) and n.target not in folded_bns}
    called = {str(n.target) for n in calls}
    thresholds = len(first) + len(norms)
    for name, mod in modules.items():
        if name and (isinstance(mod, _PRODUCERS) or _is_residual_add(mod)):
            if name not in called:
                return None  # whether quantize() keeps an unused module depends on other rewrites
            thresholds += 1  # one quantizer per module, however often the forward calls it
    for n in calls:
        mod = modules.get(str(n.target))
        if isinstance(mod, _WEIGHT_LAYERS) and n.target not in first and not _reads_a_quantizer(
                n, modules, folded_bns):
            thresholds += 1  # its own input quantizer
    return QuantLayout(roles=roles, folded=folded, thresholds=thresholds, norms=frozenset(norms))
