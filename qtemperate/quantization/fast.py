"""A faster tensor quantizer behind Brevitas's injector: fused fake-quantize, same numbers.

Brevitas computes a scaled-integer fake-quantization ``y = s * clamp(round(x / s), lo, hi)``
as a chain of small TorchScript modules (``x / s``, ``+ zero_point``, ``RoundSte``, a
``torch.where``-based clamp, ``- zero_point``, ``* s``), each a separate pass over the
tensor with its own autograd node: on a CPU the activation quantizers of a small ResNet
took as long as its convolutions. :class:`FastRescalingIntQuant` is a drop-in
``tensor_quant`` (a :class:`~brevitas.core.quant.RescalingIntQuant` with the same
submodules, state-dict keys and return value ``(y, scale, zero_point, bit_width)``) that
computes the bit width, threshold and scale with Brevitas's own modules (so learned
thresholds, statistics collection, calibration and ``scaling_min_val`` behave exactly as
before) and then applies ONE :class:`torch.autograd.Function` to the tensor:

forward (both kinds): ``v = x / s``, ``q = clamp(round(v), lo, hi)``, ``y = q * s`` — the
same float operations as Brevitas (round half to even, division, not multiplication by
``1/s``), so ``y`` is bit-identical (the sign of a zero may differ: ``-0.0 == 0.0``).

activations (Brevitas ``TensorClamp``: no gradient through the clamp), with the mask
``m = [lo <= round(v) <= hi]``:

    dL/dx = g * m,        dL/ds = sum(g * q) - sum(g * m * v)

weights (Brevitas ``TensorClampSte``: straight-through clamp) are small, so their backward
repeats Brevitas's own float operations and is bit-identical:

    dL/dx = (g * s) / s,  dL/ds = sum(g * q) + sum(-(g * s) * ((x / s) / s))

The activation gradients are the same formulas evaluated in fewer operations; they agree
with Brevitas's up to float32 rounding: ``g * m`` vs ``(g * s) * m / s`` (at most two
rounding steps, |Δ| ≤ 2.4e-7 |g|) and the order of the float32 sums in ``dL/ds``.

The mask costs no boolean tensor: ``round(v)`` lies in ``[lo, hi]`` exactly when ``v``
lies in ``(lo', hi')`` with ``lo' = lo - 1/2`` (or the float32 number just below it when
``lo`` is even: a tie rounds to the even ``lo``) and ``hi' = hi + 1/2`` (or just above
when ``hi`` is even), which ``torch.ops.aten.hardtanh_backward(g, v, lo', hi')`` applies in
one vectorised pass.

A ReLU in front of an unsigned quantizer (``QuantReLU``) is fused:
``clamp(round(x / s), 0, hi) = clamp(round(relu(x) / s), 0, hi)`` and the gradient mask
becomes ``x > 0 and round(v) <= hi`` = ``0 < v < hi'`` (for ``s > 0``; ``v`` underflows
to 0 only for ``0 < x < s * 2**-149``, a subnormal ``x``). :func:`fast_act_quant_proxy`
does that on the quantized forward only; export and disabled quantization still call the
ReLU module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp, TensorClampSte
from brevitas.core.quant import RescalingIntQuant
from brevitas.core.quant.delay import _NoDelay
from brevitas.core.scaling import ParameterFromRuntimeStatsScaling
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector, FusedActivationQuantProxy
from torch import Tensor, nn

__all__ = [
    "FastRescalingIntQuant",
    "brevitas_reference",
    "fake_quant",
    "fake_quant_ste",
    "fast_act_quant_proxy",
    "fast_quant_enabled",
]


def _float32_neighbour(value: float, direction: float) -> float:
    """The float32 number next to ``value`` (itself a float32 value) towards ``direction``."""
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32),
                                 torch.tensor(direction, dtype=torch.float32)))


def _mask_bounds(lo: float, hi: float) -> tuple[float, float]:
    """Open interval ``(a, b)`` of ``v`` with ``lo <= round_half_even(v) <= hi``.

    ``round(v) >= lo`` ⟺ ``v > lo - 1/2`` for odd ``lo`` (``lo - 1/2`` rounds away to the
    even ``lo - 1``) and ``v >= lo - 1/2`` for even ``lo``; symmetrically at ``hi``.
    ``lo ± 1/2`` are exact float32 numbers for bit widths up to 23.
    """
    a = lo - 0.5
    b = hi + 0.5
    if lo % 2 == 0:
        a = _float32_neighbour(a, -math.inf)
    if hi % 2 == 0:
        b = _float32_neighbour(b, math.inf)
    return a, b


class _FakeQuant(torch.autograd.Function):
    """``y = s * clamp(round(x / s), lo, hi)``; gradients as a ``torch.where`` clamp."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, lo: float, hi: float, relu: bool) -> Tensor:
        v = x / scale
        q = torch.round(v).clamp_(0.0 if relu else lo, hi)
        y = q * scale
        ctx.save_for_backward(v, q, scale)
        ctx.bounds = (0.0, _mask_bounds(lo, hi)[1]) if relu else _mask_bounds(lo, hi)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, q, scale = ctx.saved_tensors
        a, b = ctx.bounds
        gm = torch.ops.aten.hardtanh_backward(g, v, a, b)
        grad_s = None
        if ctx.needs_input_grad[1]:
            if scale.numel() == 1:  # two dot products: no product tensor is materialised
                dot = torch.dot(g.reshape(-1), q.reshape(-1)) - torch.dot(gm.reshape(-1), v.reshape(-1))
                grad_s = dot.reshape(scale.shape)
            else:
                grad_s = _sum_to(g * q - gm * v, scale.shape)
        return (gm if ctx.needs_input_grad[0] else None), grad_s, None, None, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


class _FakeQuantSTE(torch.autograd.Function):
    """``y = s * clamp(round(x / s), lo, hi)``, straight-through round and clamp (Brevitas-exact)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, lo: float, hi: float) -> Tensor:
        v = x / scale
        q = torch.round(v).clamp_(lo, hi)
        ctx.save_for_backward(v, q, scale)
        return q * scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, q, scale = ctx.saved_tensors
        gq = g * scale  # autograd's MulBackward, then DivBackward: the same float operations
        grad_x = gq / scale if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = _sum_to(g * q, scale.shape) + _sum_to(-gq * (v / scale), scale.shape)
        return grad_x, grad_s, None, None


def fake_quant(x: Tensor, scale: Tensor, lo: float, hi: float, relu: bool = False) -> Tensor:
    """``s * clamp(round(x / s), lo, hi)``, no gradient through the clamp (Brevitas ``TensorClamp``).

    Args:
        x: Tensor to quantize.
        scale: Scale ``s > 0`` (broadcastable to ``x``; may require grad).
        lo: Smallest integer of the grid.
        hi: Largest integer of the grid.
        relu: Quantize ``relu(x)`` (fused; see the module docstring).
    """
    return _FakeQuant.apply(x, scale, lo, hi, relu)


def fake_quant_ste(x: Tensor, scale: Tensor, lo: float, hi: float) -> Tensor:
    """``s * clamp(round(x / s), lo, hi)`` with a straight-through clamp (Brevitas ``TensorClampSte``)."""
    return _FakeQuantSTE.apply(x, scale, lo, hi)


_ENABLED = True


def fast_quant_enabled() -> bool:
    """Whether :class:`FastRescalingIntQuant` takes its fused path (the default)."""
    return _ENABLED


@contextmanager
def brevitas_reference() -> Iterator[None]:
    """Run every :class:`FastRescalingIntQuant` through Brevitas's own operations.

    Inside the block the quantizers compute exactly what ``RescalingIntQuant`` computes
    (and the ReLU runs as its own module): the reference the fused path is tested and
    benchmarked against, on the same model.
    """
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


class FastRescalingIntQuant(RescalingIntQuant):
    """:class:`~brevitas.core.quant.RescalingIntQuant` with a fused fake-quantize.

    Same constructor, submodules and outputs; the fused path is taken when the integer
    quantizer is Brevitas's plain one (``RoundSte``, ``TensorClamp`` or ``TensorClampSte``,
    identity input view, no quantization delay, zero zero-point), otherwise Brevitas's own
    ``int_quant`` runs. The integer range ``[lo, hi]`` is read from the bit-width buffer
    once per change of the buffer (its ``_version``), so no host sync per call.
    """

    def __init__(
        self,
        int_quant: nn.Module,
        scaling_impl: nn.Module,
        int_scaling_impl: nn.Module,
        zero_point_impl: nn.Module,
        bit_width_impl: nn.Module,
    ) -> None:
        super().__init__(int_quant, scaling_impl, int_scaling_impl, zero_point_impl, bit_width_impl)
        iq = self.int_quant
        clamp = type(getattr(iq, "tensor_clamp_impl", None))
        self._fast_kind: str | None = None
        if (
            type(getattr(iq, "float_to_int_impl", None)) is RoundSte
            and type(getattr(iq, "input_view_impl", None)) is Identity
            and isinstance(getattr(getattr(iq, "delay_wrapper", None), "delay_impl", None), _NoDelay)
            and type(self.zero_point_impl) is ZeroZeroPoint
            and clamp in (TensorClamp, TensorClampSte)
        ):
            self._fast_kind = "ste" if clamp is TensorClampSte else "clamp"
        self._range_of: tuple[Tensor, int] | None = None  # (bit-width tensor, its _version)
        self._range: tuple[float, float] = (0.0, 0.0)

    @property
    def fast(self) -> bool:
        """Whether the fused path applies to this quantizer."""
        return self._fast_kind is not None

    def int_range(self, bit_width: Tensor) -> tuple[float, float]:
        """``(lo, hi)`` of the integer grid at ``bit_width`` (cached per buffer version)."""
        seen = self._range_of
        if seen is None or seen[0] is not bit_width or seen[1] != bit_width._version:
            iq = self.int_quant
            self._range = (float(iq.min_int(bit_width)), float(iq.max_int(bit_width)))
            # Holding the tensor keeps its id from being reused by another one.
            self._range_of = (bit_width, bit_width._version)
        return self._range

    def can_fuse_relu(self) -> bool:
        """Whether ``forward(x, relu=True)`` may replace ``forward(relu(x))`` now.

        Only when the fused path is on and the scale is the learned threshold: while
        Brevitas collects statistics (calibration, its first training steps) they must
        be statistics of ``relu(x)``.
        """
        impl = self.scaling_impl
        return (
            _ENABLED
            and self._fast_kind == "clamp"
            and not self.observer_only
            and isinstance(impl, ParameterFromRuntimeStatsScaling)
            and impl.counter > impl.collect_stats_steps
        )

    def forward(self, x: Tensor, relu: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, scale, zero_point, bit_width)`` as ``RescalingIntQuant``; ``relu`` only when
        :meth:`can_fuse_relu` (the caller checks)."""
        if self._fast_kind is None or not _ENABLED:
            return super().forward(x)
        bit_width = self.msb_clamp_bit_width_impl()
        int_threshold = self.int_scaling_impl(bit_width)
        scale = self.scaling_impl(x, int_threshold)
        zero_point = self.zero_point_impl(x, scale, bit_width)
        if self.observer_only:
            y = x
        else:
            lo, hi = self.int_range(bit_width)
            if self._fast_kind == "clamp":
                y = _FakeQuant.apply(x, scale, lo, hi, relu)
            else:
                y = _FakeQuantSTE.apply(x, scale, lo, hi)
        return y, scale, zero_point, bit_width


class _FusedReLUQuant(FusedActivationQuantProxy):
    """``tensor_quant(relu(x))`` computed as one fused fake-quantize (module doc)."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.tensor_quant.can_fuse_relu():
            return self.tensor_quant(x, relu=True)
        return super().forward(x)


def _fuse_relu(proxy: nn.Module, *_: Any) -> None:
    """Wrap a proxy's ``ReLU -> FastRescalingIntQuant`` pair into :class:`_FusedReLUQuant`."""
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    if (
        type(fused) is FusedActivationQuantProxy
        and type(fused.activation_impl) is nn.ReLU
        and isinstance(fused.tensor_quant, FastRescalingIntQuant)
        and fused.tensor_quant.fast
    ):
        proxy.fused_activation_quant_proxy = _FusedReLUQuant(fused.activation_impl, fused.tensor_quant)


def fast_act_quant_proxy(quant_layer: nn.Module, quant_injector: Any) -> ActQuantProxyFromInjector:
    """Build Brevitas's ``ActQuantProxyFromInjector`` with a ReLU fused into the quantizer.

    Used as the presets' ``proxy_class``: the proxy stays exactly Brevitas's class (its
    export handlers are looked up by exact type), only its ``fused_activation_quant_proxy``
    is replaced, and again after every ``load_state_dict`` (which rebuilds it). Only the
    quantized training/eval path changes; export and disabled quantization call
    ``activation_impl`` (the ReLU) as Brevitas does.
    """
    proxy = ActQuantProxyFromInjector(quant_layer, quant_injector)
    _fuse_relu(proxy)
    proxy.register_load_state_dict_post_hook(_fuse_relu)
    return proxy
