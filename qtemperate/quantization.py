"""Turn a float (possibly pruned) PyTorch model into a Brevitas QAT model, and back between bit widths.

The conversion is explicit module replacement on a deep copy of the model:

=============================  ==========================================================
float module                   quantized replacement
=============================  ==========================================================
``nn.BatchNorm2d`` after conv  folded into the conv (conv gets a bias), replaced by Identity
``nn.Conv1d/2d``               :class:`QuantConv1d/2d` (Brevitas layers, signed narrow-range
                               weights, bias rounded to the int32 grid ``s_x * s_w``)
``nn.Linear``                  :class:`QuantLinear` (same)
``nn.ReLU``                    ``brevitas.nn.QuantReLU`` (unsigned per-tensor activations)
``ResidualAdd`` (see below)    :class:`QuantResidualAdd`: one shared signed quantizer for both inputs
``nn.AdaptiveAvgPool2d`` /     :class:`QuantAvgPoolRequant`: the pool followed by a requantizing
``nn.AvgPool2d``               ``QuantIdentity`` so the classifier receives integer input
=============================  ==========================================================

The layers that read the model input get an 8-bit signed ``input_quant`` so the first
convolution already runs on integers in the exported ONNX graph.

Every quantizer uses a *stateful* constant bit width (Brevitas ``BitWidthStatefulConst``:
the bit width is a buffer), so bit widths travel with ``state_dict``: loading a 4-bit
checkpoint into a freshly :func:`quantize`-d 8-bit model restores 4 bits. Scales are the
usual Brevitas ones: weights use the per-channel (or per-tensor) maximum absolute value,

    s_w = max|W_c| / (2^(b_w - 1) - 1),   W_q = s_w * clamp(round(W / s_w), -(2^(b_w-1)-1), 2^(b_w-1)-1),

activations a learned threshold ``t`` (initialised from a high percentile of observed
values) with ``s_a = t / (2^(b_a-1) - 1)`` (signed) or ``s_a = t / (2^b_a - 1)`` (unsigned).
Because the learned parameter is the threshold ``t`` and not the scale, switching bit width
with :func:`set_bit_width` keeps the learned range and re-derives the scale.

Biases are stored as float32 parameters (Brevitas ``bias_quant=None``, so checkpoints hold
the float bias), but the forward pass of every quantized conv/linear whose input comes from a
quantizer rounds them to the int32 grid of the exported graph (straight-through estimator,
so QAT trains through the rounding):

    s_b = s_x * s_w,   b_q = s_b * round(b / s_b)

with ``s_x`` the scale of the quantizer producing the layer input and ``s_w`` the
(per-channel) weight scale. The ONNX export in :mod:`qtemperate.export` quantizes the float
bias with exactly this formula (int32 ``DequantizeLinear``; needed for onnxruntime to fuse
``QLinearConv``/``QGemm``, and onnxruntime would quantize a float bias itself anyway), so
PyTorch and the exported graph compute the same pre-activations. At 4 bits one activation
step is large, and a float bias that is off the int32 grid flips values near a rounding
boundary by a whole level. The input quantizer of a layer is found on the FX graph: the
layer's own ``input_quant`` (layers reading the model input), or a ``QuantReLU`` /
pool requantizer reached through Identity/Dropout/MaxPool/Flatten/reshape. Its scale is
recorded by a forward hook on that quantizer on every forward pass; layers without such a
quantizer (e.g. reading an un-requantized residual sum) keep the float bias.

Residual additions are recognised by duck typing, so this module does not import
:mod:`qtemperate.models`: a module is a residual add when its class is named
``"ResidualAdd"`` (e.g. ``qtemperate.models.ResidualAdd``) or it is an instance of
:class:`ResidualAddMarker`; its ``forward(a, b)`` must compute ``a + b``.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import brevitas.nn as qnn
import torch
from brevitas.core.bit_width.const import BitWidthStatefulConst
from brevitas.graph.calibrate import calibration_mode
from brevitas.inject.enum import BitWidthImplType
from brevitas.quant.scaled_int import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from brevitas.quant_tensor import QuantTensor
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "Int8ActPerTensorFloatStatefulBitWidth",
    "Int8WeightPerChannelFloatStatefulBitWidth",
    "Int8WeightPerTensorFloatStatefulBitWidth",
    "QuantAvgPoolRequant",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantResidualAdd",
    "ResidualAddMarker",
    "Uint8ActPerTensorFloatStatefulBitWidth",
    "calibrate",
    "fold_batch_norms",
    "get_bit_widths",
    "get_quant_config",
    "is_quantized",
    "quantize",
    "quantize_bias",
    "set_bit_width",
]

MIN_BITS = 2
MAX_BITS = 8
INPUT_ACT_BITS = 8
"""Bit width of the model-input quantizer; it never changes with :func:`set_bit_width`."""

ROLE_ATTR = "qtemperate_role"
"""Attribute set on quantized layers: ``"first"``, ``"last"``, ``"first_last"`` or ``"inner"``."""


# --------------------------------------------------------------------------- quantizers
class Int8WeightPerChannelFloatStatefulBitWidth(Int8WeightPerChannelFloat):
    """Signed narrow-range per-output-channel weight quantizer whose bit width is a buffer.

    Defaults to 8 bits; pass ``weight_bit_width=b`` to the layer for ``b`` bits.
    """

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class Int8WeightPerTensorFloatStatefulBitWidth(Int8WeightPerTensorFloat):
    """Signed narrow-range per-tensor weight quantizer whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class Int8ActPerTensorFloatStatefulBitWidth(Int8ActPerTensorFloat):
    """Signed per-tensor activation quantizer (learned threshold) whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class Uint8ActPerTensorFloatStatefulBitWidth(Uint8ActPerTensorFloat):
    """Unsigned per-tensor activation quantizer (learned threshold) whose bit width is a buffer."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class QuantConfig:
    """Bit-width configuration of a quantized model.

    Attributes:
        weight_bits: weight bit width of inner conv/linear layers (2..8).
        act_bits: activation bit width (ReLU, residual add, pool requant), 2..8.
        first_last_bits: weight bit width of the first and last conv/linear layers (2..8).
        per_channel: per-output-channel weight scales if True, else one per tensor.
        input_bits: bit width of the model-input quantizer (always 8).
    """

    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int = 8
    per_channel: bool = True
    input_bits: int = INPUT_ACT_BITS

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_bits("first_last_bits", self.first_last_bits)
        _check_bits("input_bits", self.input_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logging)."""
        return asdict(self)


def _check_bits(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {value!r}")
    if value == 32:
        raise ValueError(
            f"{name}=32 means float: skip quantize()/set_bit_width() for the float stage "
            f"instead of quantizing; quantized bit widths are {MIN_BITS}..{MAX_BITS}"
        )
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {value}")


# --------------------------------------------------------------------------- modules
class ResidualAddMarker:
    """Mixin marking a module whose ``forward(a, b)`` returns ``a + b`` as a residual add.

    Modules whose class is named ``ResidualAdd`` are recognised as well, so
    ``qtemperate.models.ResidualAdd`` needs no import of this module.
    """


def _is_residual_add(module: nn.Module) -> bool:
    return isinstance(module, ResidualAddMarker) or type(module).__name__ == "ResidualAdd"


class QuantResidualAdd(nn.Module):
    """Residual addition ``q(a) + q(b)`` with ONE shared signed activation quantizer ``q``.

    Sharing the quantizer gives both operands the same scale, so the sum is exact in the
    integer domain (``s * (int_a + int_b)``) and exports as an integer ``Add``
    (onnxruntime fuses it to ``QLinearAdd``).

    Args:
        act_bits: bit width of the shared quantizer.
    """

    def __init__(self, act_bits: int = 8) -> None:
        super().__init__()
        _check_bits("act_bits", act_bits)
        self.input_quant = qnn.QuantIdentity(
            act_quant=Int8ActPerTensorFloatStatefulBitWidth,
            bit_width=act_bits,
            return_quant_tensor=False,
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.input_quant(a) + self.input_quant(b)


class QuantAvgPoolRequant(nn.Module):
    """An average pool followed by a requantizing ``QuantIdentity``.

    The mean of ``k`` integers at scale ``s`` is not on the grid of ``s``; requantizing
    (``y = s_y * round(mean / s_y)``) puts the classifier input back on an integer grid so
    the following linear layer exports as an integer kernel.

    Args:
        pool: the float pooling module (kept as is).
        act_bits: bit width of the requantizer.
        signed: signed requantizer; use False when the pool input is a ReLU output.
    """

    def __init__(self, pool: nn.Module, act_bits: int = 8, signed: bool = True) -> None:
        super().__init__()
        _check_bits("act_bits", act_bits)
        self.pool = pool
        quant = (
            Int8ActPerTensorFloatStatefulBitWidth
            if signed
            else Uint8ActPerTensorFloatStatefulBitWidth
        )
        self.requant = qnn.QuantIdentity(
            act_quant=quant, bit_width=act_bits, return_quant_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.requant(self.pool(x))


_SCALE_SOURCE_ATTR = "_qtemperate_input_scale_source"
_LAST_SCALE_ATTR = "_qtemperate_last_scale"


def _record_output_scale(module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook on an activation quantizer proxy: remember the scale it just used."""
    scale = output.scale if isinstance(output, QuantTensor) else None
    module.__dict__[_LAST_SCALE_ATTR] = None if scale is None else scale.detach()


def _is_exporting(layer: nn.Module) -> bool:
    proxy = getattr(layer, "weight_quant", None)
    return bool(getattr(proxy, "export_mode", False)) or torch.onnx.is_in_onnx_export()


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor):
    """Round ``bias`` to the int32 grid ``s_b = s_x * s_w`` with a straight-through estimator.

    Bit-identical to the export's integer bias: ``s_b`` is the float32 product of the two
    scales and ``round(b / s_b)`` is computed in float64 (round half to even), as in
    :func:`qtemperate.export._quantize_biases`. Scales are treated as constants (detached);
    the gradient with respect to ``bias`` is the identity.
    """
    s_b = input_scale.detach().reshape(()).to(bias.dtype) * weight_scale.detach().reshape(-1).to(
        bias.dtype
    )
    s_b = s_b.expand(bias.shape) if s_b.numel() == 1 else s_b.reshape(bias.shape)
    q = torch.round(bias.detach().double() / s_b.double()).clamp_(-(2**31), 2**31 - 1)
    b_q = q.to(bias.dtype) * s_b
    return bias + (b_q - bias).detach()


class _IntBiasMixin:
    """Quantized conv/linear whose forward rounds the float bias to ``s_x * s_w`` (see module doc)."""

    def inner_forward_impl(self, x, quant_weight, quant_bias):  # type: ignore[no-untyped-def]
        if quant_bias is not None and not _is_exporting(self):  # type: ignore[arg-type]
            if isinstance(x, QuantTensor):
                s_x = x.scale
            else:
                src = self.__dict__.get(_SCALE_SOURCE_ATTR)
                s_x = None if src is None else src.__dict__.get(_LAST_SCALE_ATTR)
            s_w = quant_weight.scale if isinstance(quant_weight, QuantTensor) else None
            if s_x is not None and s_w is not None and s_x.numel() == 1:
                quant_bias = quantize_bias(quant_bias, s_x, s_w)
        return super().inner_forward_impl(x, quant_weight, quant_bias)  # type: ignore[misc]


class QuantConv1d(_IntBiasMixin, qnn.QuantConv1d):
    """``brevitas.nn.QuantConv1d`` whose bias is rounded to the int32 grid of the export."""


class QuantConv2d(_IntBiasMixin, qnn.QuantConv2d):
    """``brevitas.nn.QuantConv2d`` whose bias is rounded to the int32 grid of the export."""


class QuantLinear(_IntBiasMixin, qnn.QuantLinear):
    """``brevitas.nn.QuantLinear`` whose bias is rounded to the int32 grid of the export."""


_QUANT_WBIOL = (qnn.QuantConv1d, qnn.QuantConv2d, qnn.QuantLinear)
_ACT_MODULES = (qnn.QuantReLU, qnn.QuantIdentity)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` contains at least one Brevitas quantized layer."""
    return any(isinstance(m, (*_QUANT_WBIOL, *_ACT_MODULES)) for m in model.modules())


# --------------------------------------------------------------------------- graph helpers
def _trace(model: nn.Module) -> fx.GraphModule | None:
    """FX-trace with residual adds and Brevitas layers as leaves; None when not traceable."""

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if _is_residual_add(m) or isinstance(m, (*_QUANT_WBIOL, *_ACT_MODULES)):
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
    """Names of the layers reading the model input and of the last conv/linear layer."""
    wb_types = (nn.Conv1d, nn.Conv2d, nn.Linear)
    modules = dict(model.named_modules())
    if gm is not None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        passthrough = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten)
        first: set[str] = set()
        frontier = list(placeholders)
        seen: set[fx.Node] = set()
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                mod = modules.get(user.target) if user.op == "call_module" else None
                if isinstance(mod, wb_types):
                    first.add(user.target)
                elif isinstance(mod, passthrough) or (
                    user.op in ("call_method", "call_function") and user.target not in (torch.add,)
                ):
                    frontier.append(user)
        ordered = [
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules.get(n.target), wb_types)
        ]
        if first and ordered:
            return first, {ordered[-1]}
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


def _input_quantizer_sources(gm: fx.GraphModule | None, modules: dict[str, nn.Module]) -> dict:
    """``{layer: producer}`` for float conv/linear layers whose input is a quantizer output.

    The producer is the name of an ``nn.ReLU`` (becomes ``QuantReLU``) or an avg pool (becomes
    :class:`QuantAvgPoolRequant`), reached backwards through ops that the export moves the
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
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node):
            if src.op == "call_module":
                mod = modules.get(src.target)
                if isinstance(mod, nn.ReLU | nn.AdaptiveAvgPool2d | nn.AvgPool2d):
                    out[node.target] = src.target
                    break
                if not isinstance(mod, _PASSTHROUGH_MODULES):
                    break
            elif not (
                (src.op == "call_function" and src.target in _PASSTHROUGH_FUNCTIONS)
                or (src.op == "call_method" and src.target in _PASSTHROUGH_METHODS)
            ):
                break
            src = src.args[0] if src.args else None
    return out


def _producer_proxy(module: nn.Module) -> nn.Module | None:
    if isinstance(module, QuantAvgPoolRequant):
        module = module.requant
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


# --------------------------------------------------------------------------- replacement
def _quant_layer(
    mod: nn.Module, weight_bits: int, per_channel: bool, input_quant: bool
) -> nn.Module:
    weight_quant = (
        Int8WeightPerChannelFloatStatefulBitWidth
        if per_channel
        else Int8WeightPerTensorFloatStatefulBitWidth
    )
    kwargs: dict[str, Any] = {
        "weight_quant": weight_quant,
        "weight_bit_width": weight_bits,
        "bias_quant": None,
        "output_quant": None,
        "return_quant_tensor": False,
        "dtype": mod.weight.dtype,
        "device": mod.weight.device,
    }
    if input_quant:
        kwargs["input_quant"] = Int8ActPerTensorFloatStatefulBitWidth
        kwargs["input_bit_width"] = INPUT_ACT_BITS
    has_bias = mod.bias is not None
    if isinstance(mod, nn.Linear):
        new: nn.Module = QuantLinear(mod.in_features, mod.out_features, bias=has_bias, **kwargs)
    else:
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantConv1d
        if mod.padding_mode != "zeros":
            raise ValueError(f"padding_mode={mod.padding_mode!r} is not supported; use 'zeros'")
        new = cls(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,
            stride=mod.stride,
            padding=mod.padding,
            dilation=mod.dilation,
            groups=mod.groups,
            bias=has_bias,
            **kwargs,
        )
    with torch.no_grad():
        new.weight.copy_(mod.weight)
        if has_bias:
            new.bias.copy_(mod.bias)
    return new


def calibrate(qmodel: nn.Module, loader: Iterable, batches: int = 8) -> int:
    """Initialise activation thresholds from ``batches`` batches of ``loader``.

    Runs forward passes inside Brevitas ``calibration_mode`` (quantization disabled,
    statistics collected and averaged, then frozen into the learned thresholds).

    Args:
        qmodel: model returned by :func:`quantize`.
        loader: iterable of ``x`` or ``(x, y, ...)`` batches.
        batches: maximum number of batches to use (>= 1).

    Returns:
        The number of batches actually used.

    Raises:
        ValueError: if ``batches < 1`` or the loader is empty.
    """
    if batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {batches}")
    device = next(qmodel.parameters()).device
    was_training = qmodel.training
    qmodel.eval()
    used = 0
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in loader:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            qmodel(x.to(device))
            used += 1
            if used >= batches:
                break
    qmodel.train(was_training)
    if used == 0:
        raise ValueError("calibration_loader yielded no batches")
    return used


def quantize(
    model: nn.Module,
    weight_bits: int = 8,
    act_bits: int = 8,
    first_last_bits: int = 8,
    per_channel: bool = True,
    calibration_loader: Iterable | None = None,
    calibration_batches: int = 8,
) -> nn.Module:
    """Return a Brevitas QAT copy of ``model`` (the input model is not modified).

    Steps: deep copy; fold BatchNorm into convolutions (:func:`fold_batch_norms`); replace
    Conv/Linear/ReLU/ResidualAdd/avg-pool modules by quantized ones (see module docstring);
    give the layers that read the model input an 8-bit input quantizer; optionally
    calibrate activation thresholds on ``calibration_batches`` batches (:func:`calibrate`).

    Each quantized conv/linear carries a ``qtemperate_role`` attribute (``"first"``,
    ``"last"``, ``"first_last"`` or ``"inner"``); :func:`get_quant_config` reads the
    configuration back from the live quantizers.

    Args:
        model: float model (any channel counts, e.g. after structured pruning).
        weight_bits: weight bits of inner conv/linear layers, 2..8.
        act_bits: activation bits, 2..8.
        first_last_bits: weight bits of the first and last conv/linear layers, 2..8.
        per_channel: per-output-channel weight scales (else per tensor).
        calibration_loader: optional iterable of ``x`` or ``(x, y)`` batches. Without it the
            activation thresholds are initialised by Brevitas from statistics of the first
            training-mode forward passes (300 by default), so an uncalibrated model is only
            meaningful in eval mode after some training steps.
        calibration_batches: batches used for calibration.

    Returns:
        The quantized model, in the same train/eval mode as ``model``.

    Raises:
        ValueError: for bit widths outside 2..8 (32 = float: do not call quantize), for an
            already quantized model, or for ``calibration_batches < 1``.
    """
    QuantConfig(weight_bits, act_bits, first_last_bits, per_channel)  # validates the bits
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
    if is_quantized(model):
        raise ValueError("model is already quantized; use set_bit_width() to change bit widths")
    was_training = model.training
    qmodel = copy.deepcopy(model).eval()
    fold_batch_norms(qmodel)
    gm = _trace(qmodel)
    first, last = _first_last_layers(qmodel, gm)
    modules = dict(qmodel.named_modules())
    bias_sources = _input_quantizer_sources(gm, modules)
    for name, mod in list(modules.items()):
        if not name:
            continue
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Linear) and not isinstance(mod, _QUANT_WBIOL):
            is_first, is_last = name in first, name in last
            bits = first_last_bits if (is_first or is_last) else weight_bits
            new = _quant_layer(mod, bits, per_channel, input_quant=is_first)
            role = (
                "first_last"
                if is_first and is_last
                else "first"
                if is_first
                else "last"
                if is_last
                else "inner"
            )
            setattr(new, ROLE_ATTR, role)
        elif isinstance(mod, nn.ReLU):
            new = qnn.QuantReLU(
                act_quant=Uint8ActPerTensorFloatStatefulBitWidth,
                bit_width=act_bits,
                return_quant_tensor=False,
            )
        elif _is_residual_add(mod):
            new = QuantResidualAdd(act_bits)
        elif isinstance(mod, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
            new = QuantAvgPoolRequant(
                mod, act_bits, signed=not _pool_input_is_relu(gm, modules, name)
            )
        else:
            continue
        _set_submodule(qmodel, name, new)
    _link_bias_scale_sources(qmodel, bias_sources)
    if calibration_loader is not None:
        calibrate(qmodel, calibration_loader, calibration_batches)
    return qmodel.train(was_training)


# --------------------------------------------------------------------------- bit widths
def _bit_width_buffers(module: nn.Module) -> list[BitWidthStatefulConst]:
    return [m for m in module.modules() if isinstance(m, BitWidthStatefulConst)]


def _read_bits(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    buffers = _bit_width_buffers(module)
    return int(buffers[0].bit_width.item()) if buffers else None


def _write_bits(module: nn.Module | None, bits: int) -> None:
    if module is None:
        return
    for b in _bit_width_buffers(module):
        b.bit_width.fill_(float(bits))


def _weight_proxy(layer: nn.Module) -> nn.Module | None:
    proxy = getattr(layer, "weight_quant", None)
    return proxy if proxy is not None and getattr(proxy, "is_quant_enabled", False) else None


def _act_proxy(module: nn.Module) -> nn.Module | None:
    for attr in ("act_quant", "input_quant"):
        proxy = getattr(module, attr, None)
        if proxy is not None and getattr(proxy, "is_quant_enabled", False):
            return proxy
    return None


def get_bit_widths(qmodel: nn.Module) -> dict[str, dict[str, int | None]]:
    """Per-layer bit widths read from the live quantizers.

    Returns:
        ``{name: {"weight": bits|None, "act": bits|None, "input": bits|None}}`` for every
        quantized conv/linear (``weight``; ``input`` for layers with an input quantizer),
        QuantReLU / QuantIdentity (``act``). Residual adds and pool requantizers appear
        under the name of their inner ``QuantIdentity``.
    """
    out: dict[str, dict[str, int | None]] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, _QUANT_WBIOL):
            inp = getattr(m, "input_quant", None)
            in_bits = _read_bits(inp) if inp is not None and inp.is_quant_enabled else None
            out[name] = {"weight": _read_bits(_weight_proxy(m)), "act": None, "input": in_bits}
        elif isinstance(m, _ACT_MODULES):
            out[name] = {"weight": None, "act": _read_bits(_act_proxy(m)), "input": None}
    return out


def set_bit_width(qmodel: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    """Switch a quantized model's bit widths in place, keeping weights and learned thresholds.

    Inner conv/linear weights go to ``weight_bits`` and every activation quantizer
    (ReLU, residual add, pool requant) to ``act_bits``; first/last layer weights keep
    ``first_last_bits`` and the model-input quantizer stays at 8 bits. The bit widths are
    buffers, so they are saved in and restored from ``state_dict``.

    Args:
        qmodel: model returned by :func:`quantize`.
        weight_bits: new inner weight bits, 2..8.
        act_bits: new activation bits, 2..8.

    Returns:
        ``qmodel`` (modified in place).

    Raises:
        ValueError: for bit widths outside 2..8, or when ``qmodel`` is not quantized.
    """
    _check_bits("weight_bits", weight_bits)
    _check_bits("act_bits", act_bits)
    if not is_quantized(qmodel):
        raise ValueError("qmodel is not quantized; call quantize() first")
    for m in qmodel.modules():
        if isinstance(m, _QUANT_WBIOL):
            if getattr(m, ROLE_ATTR, "inner") == "inner":
                _write_bits(_weight_proxy(m), weight_bits)
        elif isinstance(m, _ACT_MODULES):
            _write_bits(_act_proxy(m), act_bits)
    return qmodel


def get_quant_config(qmodel: nn.Module) -> QuantConfig:
    """Derive the :class:`QuantConfig` of a quantized model from its live quantizers.

    ``weight_bits`` / ``first_last_bits`` come from the inner / first-last layers (the
    minimum when they differ), ``act_bits`` from the activation quantizers, and
    ``per_channel`` from the shape of the first layer's weight scale.

    Raises:
        ValueError: when ``qmodel`` is not quantized.
    """
    if not is_quantized(qmodel):
        raise ValueError("qmodel is not quantized; call quantize() first")
    inner, edge, acts, inputs = [], [], [], []
    per_channel: bool | None = None
    for m in qmodel.modules():
        if isinstance(m, _QUANT_WBIOL):
            bits = _read_bits(_weight_proxy(m))
            if bits is not None:
                (inner if getattr(m, ROLE_ATTR, "inner") == "inner" else edge).append(bits)
                if per_channel is None:
                    per_channel = m.quant_weight().scale.numel() > 1
            inp = getattr(m, "input_quant", None)
            if inp is not None and inp.is_quant_enabled:
                inputs.append(_read_bits(inp))
        elif isinstance(m, _ACT_MODULES):
            bits = _read_bits(_act_proxy(m))
            if bits is not None:
                acts.append(bits)
    edge_bits = min(edge) if edge else (min(inner) if inner else MAX_BITS)
    return QuantConfig(
        weight_bits=min(inner) if inner else edge_bits,
        act_bits=min(acts) if acts else MAX_BITS,
        first_last_bits=edge_bits,
        per_channel=True if per_channel is None else per_channel,
        input_bits=min(b for b in inputs if b is not None) if any(inputs) else INPUT_ACT_BITS,
    )
