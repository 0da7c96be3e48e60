"""What :func:`~qtemperate.quantization.quantize` does with each operation besides conv/linear/ReLU.

The decisions need the traced float graph (sign of an op's inputs, whether an input
already comes from a quantizer), so they are made here, once, before any module is
replaced:

* **activations** (ReLU6, SiLU, GELU, Hardswish, Hardsigmoid, Sigmoid, Tanh, ...) get an
  output quantizer (:class:`~qtemperate.quantization.ops.QuantActivation`);
* **concatenations** one shared input quantizer, unsigned when every input is
  non-negative (:class:`~qtemperate.quantization.ops.QuantConcat`);
* **products** a quantizer on each input not already on an integer grid
  (:class:`~qtemperate.quantization.ops.QuantMul`);
* **means** and non-nearest **upsampling** a requantizer
  (:class:`~qtemperate.quantization.ops.QuantRequant`); nearest upsampling and max
  pooling copy integers and need nothing;
* **normalization** layers (LayerNorm, GroupNorm, InstanceNorm, a BatchNorm not folded
  into a convolution) an input quantizer
  (:class:`~qtemperate.quantization.ops.QuantNormInput`);
* ``nn.MultiheadAttention`` becomes Brevitas's ``QuantMultiheadAttention`` (quantized
  input/output projections, q/k/v, attention weights), with the float weights loaded;
* transposed convolutions (U-Net decoders) become Brevitas's ``QuantConvTranspose1d/2d``
  with an input quantizer and an int32 bias (always inner layers: they keep ``weight_bits``);
* a **conv/linear whose input is not a quantizer output** (a residual sum, a product, a
  concatenation, a normalization, an upsampled or float tensor) gets its own input
  quantizer at the activation bit width, so every weight layer reads integers. Only
  Identity/Dropout/MaxPool/Flatten/reshape are looked through: they are the ops the ONNX
  export moves the ``DequantizeLinear`` below, so PyTorch and onnxruntime agree on which
  scale the layer's input (and int32 bias) uses.
"""

from __future__ import annotations

import brevitas.nn as qnn
import torch
from torch import fx, nn

from qtemperate.quantization.config import ROLE_ATTR
from qtemperate.quantization.ops import (
    SIGNED_ACTIVATIONS,
    UNSIGNED_ACTIVATIONS,
    Concat,
    Mean,
    Mul,
    QuantActivation,
    QuantConcat,
    QuantMul,
    QuantNormInput,
    QuantRequant,
)
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Int8WeightPerChannelFloatStatefulBitWidth,
    Int8WeightPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)

__all__ = ["NORMS", "GraphFacts", "graph_facts", "replacement"]

NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)
"""Normalization layers that get an input quantizer (their arithmetic stays float)."""

_ACTIVATIONS = (*UNSIGNED_ACTIVATIONS, *SIGNED_ACTIVATIONS)
_NEAREST = ("nearest", "nearest-exact")
# Ops whose output is on the grid of their (single) input's quantizer, for a product's input.
_GRID_PRESERVING_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
_GRID_PRESERVING_METHODS = (
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
)
_GRID_PRESERVING_FUNCTIONS = (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
)


_SIGN_PRESERVING_MODULES = (
    *_GRID_PRESERVING_MODULES,
    nn.Upsample,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    Mean,
)


def _moves_data(node: fx.Node) -> bool:
    """Reshapes, transposes and the like: values unchanged."""
    return (node.op == "call_method" and node.target in _GRID_PRESERVING_METHODS) or (
        node.op == "call_function" and node.target in _GRID_PRESERVING_FUNCTIONS
    )


def _is_nearest(m: nn.Module) -> bool:
    return isinstance(m, nn.Upsample) and m.mode in _NEAREST


def _is_unsigned_activation(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return float(m.min_val) >= 0.0
    return isinstance(m, (nn.ReLU, *UNSIGNED_ACTIVATIONS))


def _quantizer_output(m: nn.Module | None) -> bool:
    """Float modules that :func:`quantize` turns into a module ending in a quantizer."""
    if m is None:
        return False
    if _is_nearest(m):
        return False
    producers = (
        nn.ReLU,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        Mean,
        nn.Upsample,
    )
    return isinstance(m, (*producers, *_ACTIVATIONS))


class GraphFacts:
    """Per-node facts of the traced float graph used by :func:`replacement`.

    Attributes:
        node_of: ``{module name: its (first) call_module node}``.
        unsigned: Nodes whose output is never negative.
        on_grid: Nodes whose output is on the integer grid of a quantizer.
    """

    def __init__(self, gm: fx.GraphModule | None, modules: dict[str, nn.Module]) -> None:
        self.gm = gm
        self.modules = modules
        self.node_of: dict[str, fx.Node] = {}
        self.unsigned: set[fx.Node] = set()
        self.on_grid: set[fx.Node] = set()
        if gm is None:
            return
        for node in gm.graph.nodes:
            mod = modules.get(node.target) if node.op == "call_module" else None
            if mod is not None:
                self.node_of.setdefault(str(node.target), node)
            ins = list(node.all_input_nodes)
            first = ins[0] if ins else None
            if self._unsigned(node, mod, ins, first):
                self.unsigned.add(node)
            if self._on_grid(node, mod, first):
                self.on_grid.add(node)

    def _unsigned(
        self, node: fx.Node, mod: nn.Module | None, ins: list[fx.Node], first: fx.Node | None
    ) -> bool:
        if mod is not None:
            if _is_unsigned_activation(mod):
                return True
            if isinstance(mod, Concat | Mul):
                return bool(ins) and all(i in self.unsigned for i in ins)
            return isinstance(mod, _SIGN_PRESERVING_MODULES) and first in self.unsigned
        return _moves_data(node) and first in self.unsigned

    def _on_grid(self, node: fx.Node, mod: nn.Module | None, first: fx.Node | None) -> bool:
        if mod is not None:
            if _quantizer_output(mod) or isinstance(mod, Concat):
                return True
            preserving = isinstance(mod, _GRID_PRESERVING_MODULES) or _is_nearest(mod)
            return preserving and first in self.on_grid
        return _moves_data(node) and first in self.on_grid

    def inputs(self, name: str) -> list[fx.Node]:
        node = self.node_of.get(name)
        return [] if node is None else [a for a in node.args if isinstance(a, fx.Node)]

    def input_unsigned(self, name: str) -> bool:
        ins = self.inputs(name)
        return bool(ins) and all(i in self.unsigned for i in ins)

    def called(self, name: str) -> bool:
        """Whether the forward calls module ``name`` (True when the model is not traceable)."""
        return self.gm is None or name in self.node_of


def graph_facts(gm: fx.GraphModule | None, modules: dict[str, nn.Module]) -> GraphFacts:
    """The :class:`GraphFacts` of a traced float model (empty facts when not traceable)."""
    return GraphFacts(gm, modules)


def quant_mha(
    mha: nn.MultiheadAttention, weight_bits: int, act_bits: int, per_channel: bool
) -> nn.Module:
    """Brevitas ``QuantMultiheadAttention`` with qtemperate's stateful quantizers and ``mha``'s weights."""
    weight_quant = (
        Int8WeightPerChannelFloatStatefulBitWidth
        if per_channel
        else Int8WeightPerTensorFloatStatefulBitWidth
    )
    act = Int8ActPerTensorFloatStatefulBitWidth
    new = qnn.QuantMultiheadAttention(
        mha.embed_dim,
        mha.num_heads,
        dropout=mha.dropout,
        bias=mha.in_proj_bias is not None,
        add_bias_kv=mha.bias_k is not None,
        add_zero_attn=mha.add_zero_attn,
        kdim=mha.kdim,
        vdim=mha.vdim,
        batch_first=mha.batch_first,
        in_proj_input_quant=act,
        in_proj_weight_quant=weight_quant,
        attn_output_weights_quant=Uint8ActPerTensorFloatStatefulBitWidth,
        q_scaled_quant=act,
        k_transposed_quant=act,
        v_quant=act,
        out_proj_input_quant=act,
        out_proj_weight_quant=weight_quant,
        return_quant_tensor=False,
        in_proj_input_bit_width=act_bits,
        in_proj_weight_bit_width=weight_bits,
        attn_output_weights_bit_width=act_bits,
        q_scaled_bit_width=act_bits,
        k_transposed_bit_width=act_bits,
        v_bit_width=act_bits,
        out_proj_input_bit_width=act_bits,
        out_proj_weight_bit_width=weight_bits,
        dtype=mha.out_proj.weight.dtype,
        device=mha.out_proj.weight.device,
    )
    # the float state has weights and biases only; the quantizers keep their fresh state
    missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
    if unexpected or any("_quant" not in k for k in missing):
        raise ValueError(
            f"nn.MultiheadAttention -> QuantMultiheadAttention: weights did not map "
            f"(missing {[k for k in missing if '_quant' not in k]}, unexpected {unexpected})"
        )
    for layer in (new.in_proj, new.q_proj, new.k_proj, new.v_proj, new.out_proj):
        if layer is not None:
            setattr(layer, ROLE_ATTR, "inner")
    return new


def quant_conv_transpose(
    conv: nn.ConvTranspose1d | nn.ConvTranspose2d,
    weight_bits: int,
    act_bits: int,
    per_channel: bool,
) -> nn.Module:
    """Brevitas ``QuantConvTranspose1d/2d`` with its own input quantizer and an int32 bias.

    The bias is quantized by Brevitas (``Int32Bias``: ``s_b = s_x * s_w``) in PyTorch and in
    the export alike, so an integer runtime fusing the transposed convolution rounds nothing
    that PyTorch did not.
    """
    from brevitas.quant import Int32Bias

    if conv.padding_mode != "zeros" or conv.output_padding != tuple(0 for _ in conv.output_padding):
        raise ValueError(
            f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}, "
            f"output_padding={conv.output_padding} has no quantized replacement"
        )
    cls = (
        qnn.QuantConvTranspose2d
        if isinstance(conv, nn.ConvTranspose2d)
        else qnn.QuantConvTranspose1d
    )
    weight_quant = (
        Int8WeightPerChannelFloatStatefulBitWidth
        if per_channel
        else Int8WeightPerTensorFloatStatefulBitWidth
    )
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        weight_quant=weight_quant,
        weight_bit_width=weight_bits,
        input_quant=Int8ActPerTensorFloatStatefulBitWidth,
        input_bit_width=act_bits,
        bias_quant=Int32Bias if conv.bias is not None else None,
        return_quant_tensor=False,
        dtype=conv.weight.dtype,
        device=conv.weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(new, ROLE_ATTR, "inner")
    return new


def replacement(
    name: str, mod: nn.Module, facts: GraphFacts, weight_bits: int, act_bits: int, per_channel: bool
) -> nn.Module | None:
    """The quantized module for ``mod`` (see the module docstring), or None to leave it."""
    if type(mod) is nn.MultiheadAttention:
        return quant_mha(mod, weight_bits, act_bits, per_channel)
    if type(mod) in (nn.ConvTranspose1d, nn.ConvTranspose2d):
        return quant_conv_transpose(mod, weight_bits, act_bits, per_channel)
    if isinstance(mod, nn.ReLU):
        return None  # conv.py's QuantReLU
    if isinstance(mod, _ACTIVATIONS):
        return QuantActivation(mod, act_bits, signed=not _is_unsigned_activation(mod))
    if isinstance(mod, Concat):
        return QuantConcat(mod.dim, act_bits, signed=not facts.input_unsigned(name))
    if isinstance(mod, Mul):
        ins = facts.inputs(name)
        if len(ins) != 2:
            return QuantMul(act_bits)
        a, b = ins
        return QuantMul(
            act_bits,
            quantize_a=a not in facts.on_grid,
            quantize_b=b not in facts.on_grid,
            signed_a=a not in facts.unsigned,
            signed_b=b not in facts.unsigned,
        )
    if isinstance(mod, Mean) or (isinstance(mod, nn.Upsample) and not _is_nearest(mod)):
        return QuantRequant(mod, act_bits, signed=not facts.input_unsigned(name))
    if isinstance(mod, nn.AvgPool1d | nn.AdaptiveAvgPool1d):
        from qtemperate.quantization.layers import QuantAvgPoolRequant

        return QuantAvgPoolRequant(mod, act_bits, signed=not facts.input_unsigned(name))
    if isinstance(mod, NORMS):
        return QuantNormInput(mod, act_bits)
    return None


def needs_input_quant(name: str, facts: GraphFacts, sources: dict[str, str]) -> bool:
    """Whether conv/linear ``name`` reads something other than a quantizer's output."""
    return facts.gm is not None and name in facts.node_of and name not in sources
