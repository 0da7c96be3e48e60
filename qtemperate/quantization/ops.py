"""Quantized forms of the operations vision models use besides conv/linear/ReLU.

Each float operation gets an integer-grid form that ONNX runtimes can run on integer
kernels (or that at least hands the next layer integers):

=================================================  ==========================================
float operation                                    quantized form
=================================================  ==========================================
activation ``f`` (ReLU6, SiLU, GELU, Hardswish,    :class:`QuantActivation`: ``q(f(x))``, an
Hardsigmoid, Sigmoid, Tanh, LeakyReLU, Hardtanh,   output quantizer after the float activation
ELU)                                               (unsigned for ReLU6/Sigmoid/Hardsigmoid)
``torch.cat`` / :class:`Concat`                    :class:`QuantConcat`: ONE shared quantizer for
                                                   every input, so the inputs share a scale and
                                                   the concatenation is exact on integers
``a * b`` / :class:`Mul` (squeeze-excitation)      :class:`QuantMul`: a quantizer on each input
                                                   not already on an integer grid
mean over a dimension / :class:`Mean`, bilinear    :class:`QuantRequant`: the float op followed by
upsampling                                         a requantizer (as
                                                   :class:`~qtemperate.quantization.layers.QuantAvgPoolRequant`)
LayerNorm / GroupNorm / InstanceNorm / unfolded    :class:`QuantNormInput`: the norm reads a
BatchNorm                                          quantized input (its affine parameters and
                                                   arithmetic stay float32 and are reported so)
=================================================  ==========================================

:class:`Add`, :class:`Mul`, :class:`Concat` and :class:`Mean` are the float modules that
:mod:`qtemperate.quantization.functional` puts in place of ``x + y``, ``x * y``,
``torch.cat`` and ``x.mean(dim)`` in a traced forward, so each gets its own quantizer.
"""

from __future__ import annotations

import brevitas.nn as qnn
import torch
from torch import nn

from qtemperate.quantization.config import _check_bits
from qtemperate.quantization.layers import ResidualAddMarker
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)

__all__ = [
    "SIGNED_ACTIVATIONS",
    "UNSIGNED_ACTIVATIONS",
    "Add",
    "Concat",
    "Mean",
    "Mul",
    "QuantActivation",
    "QuantConcat",
    "QuantMul",
    "QuantNormInput",
    "QuantRequant",
    "act_quantizer",
]

UNSIGNED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
"""Activations whose output is never negative: an unsigned quantizer keeps every level."""

SIGNED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.ELU,
    nn.Mish,
)
"""Activations with negative outputs (SiLU's minimum is about -0.28): a signed quantizer."""


def act_quantizer(act_bits: int, signed: bool) -> qnn.QuantIdentity:
    """A per-tensor activation quantizer with a learned threshold and a stateful bit width."""
    _check_bits("act_bits", act_bits)
    quant = (
        Int8ActPerTensorFloatStatefulBitWidth if signed else Uint8ActPerTensorFloatStatefulBitWidth
    )
    return qnn.QuantIdentity(act_quant=quant, bit_width=act_bits, return_quant_tensor=False)


class Add(ResidualAddMarker, nn.Module):
    """``a + b`` as a module (a traced ``x + y`` between two tensors)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    """``a * b`` as a module (a traced ``x * y`` between two tensors, e.g. squeeze-excitation)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Concat(nn.Module):
    """``torch.cat(xs, dim)`` as a module taking the tensors as positional arguments."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Mean(nn.Module):
    """``x.mean(dim, keepdim)`` as a module (e.g. pooling over tokens)."""

    def __init__(self, dim: int | tuple[int, ...], keepdim: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"


class QuantActivation(nn.Module):
    """A float activation followed by an output quantizer: ``y = q(f(x))``.

    Args:
        act: The float activation module (kept as is: ``act``).
        act_bits: Bit width of the output quantizer ``act_quant``.
        signed: Signed quantizer (False for activations with non-negative outputs).
    """

    def __init__(self, act: nn.Module, act_bits: int = 8, signed: bool = True) -> None:
        super().__init__()
        self.act = act
        self.act_quant = act_quantizer(act_bits, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quant(self.act(x))


class QuantRequant(nn.Module):
    """A float op followed by a requantizer: ``y = q(op(x))`` (mean, bilinear upsampling).

    Args:
        op: The float module (``op``).
        act_bits: Bit width of the requantizer ``requant``.
        signed: Signed requantizer (False when the input is non-negative).
    """

    def __init__(self, op: nn.Module, act_bits: int = 8, signed: bool = True) -> None:
        super().__init__()
        self.op = op
        self.requant = act_quantizer(act_bits, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.requant(self.op(x))


class QuantConcat(nn.Module):
    """Concatenation of inputs quantized by ONE shared quantizer: ``cat(q(x_1), ..., q(x_n))``.

    Sharing the quantizer gives every input the same scale, so the concatenation is exact
    in the integer domain and exports as one integer ``Concat``; inputs at different
    scales would each be rescaled by the integer kernel (``QLinearConcat``) and disagree
    with the PyTorch model.

    Args:
        dim: Concatenation dimension.
        act_bits: Bit width of the shared quantizer ``input_quant``.
        signed: Signed quantizer (False when every input is non-negative).
    """

    def __init__(self, dim: int = 0, act_bits: int = 8, signed: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.input_quant = act_quantizer(act_bits, signed)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_quant(x) for x in xs], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class QuantMul(nn.Module):
    """Element-wise product of quantized inputs: ``q_a(a) * q_b(b)``.

    An input that already comes from a quantizer (e.g. a quantized Hardsigmoid gate) keeps
    its grid: its quantizer is ``nn.Identity`` rather than a second rounding.

    Args:
        act_bits: Bit width of the input quantizers.
        quantize_a: Give input ``a`` a quantizer (``quant_a``).
        quantize_b: Give input ``b`` a quantizer (``quant_b``).
        signed_a: Signed quantizer for ``a``.
        signed_b: Signed quantizer for ``b``.
    """

    def __init__(
        self,
        act_bits: int = 8,
        quantize_a: bool = True,
        quantize_b: bool = True,
        signed_a: bool = True,
        signed_b: bool = True,
    ) -> None:
        super().__init__()
        self.quant_a = act_quantizer(act_bits, signed_a) if quantize_a else nn.Identity()
        self.quant_b = act_quantizer(act_bits, signed_b) if quantize_b else nn.Identity()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant_a(a) * self.quant_b(b)


class QuantNormInput(nn.Module):
    """A normalization layer reading a quantized input: ``norm(q(x))``.

    The normalization itself (statistics, affine ``gamma``/``beta``) computes in float32,
    as in every integer runtime without a fused norm kernel; its output is requantized by
    the next layer's input quantizer.

    Args:
        norm: The float normalization module (``norm``).
        act_bits: Bit width of the input quantizer ``input_quant``.
    """

    def __init__(self, norm: nn.Module, act_bits: int = 8) -> None:
        super().__init__()
        self.input_quant = act_quantizer(act_bits, signed=True)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.input_quant(x))


QUANT_OPS: tuple[type[nn.Module], ...] = (
    QuantActivation,
    QuantRequant,
    QuantConcat,
    QuantMul,
    QuantNormInput,
)
"""The quantized op modules of this module (traced as leaves)."""
