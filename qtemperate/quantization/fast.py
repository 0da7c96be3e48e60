"""A faster tensor quantizer behind Brevitas's injector: fused fake-quantize, same numbers.

Brevitas computes a scaled-integer fake-quantization ``y = s * clamp(round(x / s), lo, hi)``
as a chain of small TorchScript modules (``x / s``, ``+ zero_point``, ``RoundSte``, a
``torch.where``-based clamp, ``- zero_point``, ``* s``), each a separate pass over the
tensor with its own autograd node, and derives the scale ``s`` through another ~15 small
modules: on a CPU the quantizers of a small ResNet cost as much as its convolutions.
:class:`FastRescalingIntQuant` is a drop-in ``tensor_quant`` (a
:class:`~brevitas.core.quant.RescalingIntQuant` with the same submodules, state-dict keys
and return value ``(y, scale, zero_point, bit_width)``, selected by the presets in
:mod:`qtemperate.quantization.quantizers`) that computes the same numbers with three
autograd functions:

**The tensor** (float32 or float64; other dtypes run Brevitas's operations) (``v = x / s``,
``q = clamp(round(v), lo, hi)``, ``y = q * s``): the same float operations as Brevitas (division, not multiplication by ``1/s``; round half to
even), so ``y`` is bit-identical (the sign of a zero may differ: ``-0.0 == 0.0``).

* activations (Brevitas ``TensorClamp``: no gradient through the clamp), with the mask
  ``m = [lo <= round(v) <= hi]``::

      dL/dx = g * m,        dL/ds = sum(g * q) - sum(g * m * v)

  the same formulas as Brevitas's chain in fewer operations, equal up to float32
  rounding: ``g * m`` vs ``((g * s) * m) / s`` (two roundings, |Δ| ≤ 2**-22 |g|) and two
  dot products instead of element-wise products and sums for ``dL/ds``. The mask costs no
  boolean tensor: ``round(v)`` lies in ``[lo, hi]`` exactly when ``v`` lies in the open
  interval ``(lo', hi')``, ``lo' = lo - 1/2`` (or the float32 number below it when ``lo``
  is even: a tie rounds to the even ``lo``) and ``hi' = hi + 1/2`` (or the one above when
  ``hi`` is even), which ``torch.ops.aten.hardtanh_backward(g, v, lo', hi')`` applies in
  one vectorised pass.
* weights (Brevitas ``TensorClampSte``: straight-through clamp) are small, so their
  backward repeats Brevitas's float operations and is bit-identical::

      dL/dx = (g * s) / s,  dL/ds = sum(g * q) + sum(-(g * s) * ((x / s) / s))

**The scale** from the bit width's integer threshold ``N`` (``2^(b-1)``, ``2^(b-1) - 1`` or
``2^b - 1``; cached per change of the bit-width buffer, so no host sync per call) and
``scaling_min_val`` ``c``, for the two configurations of the presets (any other runs
through Brevitas's modules):

* a learned threshold ``t`` (``ParameterFromRuntimeStatsScaling`` after its statistics
  phase): ``s = max(|t|, c) / N`` in training, ``max(|t| / N, c)`` in eval (Brevitas's
  two orders), ``dL/dt = (dL/ds / N) * sign(t)``;
* weight statistics ``a = max|W|`` per channel or tensor (``StatsFromParameterScaling``,
  ``AbsMax``, computed by Brevitas's own stats modules): ``s = max(a, c) / N``,
  ``dL/da = dL/ds / N``;

both bit-identical to Brevitas's chains of ``abs``, sign-preserving clamps with
straight-through gradients and the division (whose gradient factors are exactly ±1).

**A ReLU** in front of a quantizer (``QuantReLU``) is fused once the threshold is learned:
``clamp(round(x / s), 0, hi) = clamp(round(relu(x) / s), lo, hi)`` for ``lo <= 0``, and the
mask becomes ``x > 0 and round(v) <= hi`` = ``0 < v < hi'`` (for ``s > 0``; ``v``
underflows to 0 only for ``0 < x < s * 2**-149``, a subnormal ``x``).
:func:`fast_act_quant_proxy` does that on the quantized forward only; statistics
(calibration, Brevitas's first training steps), export and disabled quantization call the
ReLU module as before.

:func:`brevitas_reference` switches every such quantizer back to Brevitas's operations
(tests and benchmarks compare the two on the same model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from brevitas.core.function_wrapper import (
    Identity,
    RoundSte,
    ScalarSignedClampMinSte,
    TensorClamp,
    TensorClampSte,
)
from brevitas.core.function_wrapper.misc import Abs
from brevitas.core.quant import RescalingIntQuant
from brevitas.core.quant.delay import _NoDelay
from brevitas.core.restrict_val import FloatRestrictValue
from brevitas.core.scaling import ParameterFromRuntimeStatsScaling
from brevitas.core.scaling.runtime import StatsFromParameterScaling
from brevitas.core.stats.stats_op import AbsMax
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

_ENABLED = True


def fast_quant_enabled() -> bool:
    """Whether :class:`FastRescalingIntQuant` takes its fused path (the default)."""
    return _ENABLED


@contextmanager
def brevitas_reference() -> Iterator[None]:
    """Run every :class:`FastRescalingIntQuant` through Brevitas's own operations.

    Inside the block the quantizers compute exactly what ``RescalingIntQuant`` computes
    (and a ReLU runs as its own module): the reference the fused path is tested and
    benchmarked against, on the same model. Not thread-safe (a module-level switch).
    """
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


# -- the tensor --------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float64)  # others (AMP's half types) run Brevitas's operations


def _neighbour(value: float, direction: float, dtype: torch.dtype) -> float:
    """The ``dtype`` number next to ``value`` (itself a ``dtype`` number) towards ``direction``."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(direction, dtype=dtype)))


@functools.lru_cache(maxsize=64)
def _mask_bounds(lo: float, hi: float, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Open interval ``(a, b)`` of ``v`` (of ``dtype``) with ``lo <= round_half_even(v) <= hi``.

    ``round(v) >= lo`` ⟺ ``v > lo - 1/2`` for odd ``lo`` (``lo - 1/2`` rounds to the even
    ``lo - 1``) and ``v >= lo - 1/2`` for even ``lo``; symmetrically at ``hi``. ``lo ± 1/2``
    are exact float32 and float64 numbers for grids up to 2**23.
    """
    a, b = lo - 0.5, hi + 0.5
    if lo % 2 == 0:
        a = _neighbour(a, -math.inf, dtype)
    if hi % 2 == 0:
        b = _neighbour(b, math.inf, dtype)
    return a, b


def _flat(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` as 1-D views in one element order (no copy for two tensors of one
    dense layout, e.g. both ``channels_last``; a sum does not depend on the order)."""
    dense = a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))
    if dense and a.shape == b.shape and a.stride() == b.stride():
        n = a.numel()
        return a.as_strided((n,), (1,)), b.as_strided((n,), (1,))
    return a.reshape(-1), b.reshape(-1)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


class _FakeQuant(torch.autograd.Function):
    """``y = s * clamp(round(x / s), lo, hi)``; gradients of a ``torch.where`` clamp (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, lo: float, hi: float, relu: bool) -> Tensor:
        v = x / scale
        q = torch.round(v).clamp_(0.0 if relu else lo, hi)
        ctx.save_for_backward(v, q, scale)
        a, b = _mask_bounds(lo, hi, v.dtype)
        ctx.bounds = (0.0, b) if relu else (a, b)
        return q * scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, q, scale = ctx.saved_tensors
        gm = torch.ops.aten.hardtanh_backward(g, v, *ctx.bounds)
        grad_s = None
        if ctx.needs_input_grad[1]:
            if scale.numel() == 1:  # two dot products: no product tensor is materialised
                dot = torch.dot(*_flat(g, q)) - torch.dot(*_flat(gm, v))
                grad_s = dot.reshape(scale.shape)
            else:
                grad_s = _sum_to(g * q - gm * v, scale.shape)
        return (gm if ctx.needs_input_grad[0] else None), grad_s, None, None, None


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


# -- the scale ---------------------------------------------------------------------------
class _LearnedScale(torch.autograd.Function):
    """``s = max(|t|, c) / N`` (training) or ``max(|t| / N, c)`` (eval); ``dL/dt = dL/ds / N * sign(t)``."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, n: Tensor, c: float | None, clamp_last: bool) -> Tensor:
        a = t.abs()
        if clamp_last:
            s = a / n
            s = s.clamp_min(c) if c is not None else s
        else:
            s = (a.clamp_min(c) if c is not None else a) / n
        ctx.save_for_backward(t, n)
        return s

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        t, n = ctx.saved_tensors
        return (g / n) * torch.sign(t), None, None, None


class _StatsScale(torch.autograd.Function):
    """``s = max(a, c) / N`` for ``a = max|W| >= 0``; ``dL/da = dL/ds / N`` (``* sign(a)**2`` without ``c``)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, n: Tensor, c: float | None) -> Tensor:
        ctx.save_for_backward(a, n)
        ctx.clamped = c is not None
        return (a.clamp_min(c) if c is not None else a.abs()) / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a, n = ctx.saved_tensors
        grad = g / n
        if not ctx.clamped:  # two torch.abs in Brevitas's chain: gradient 0 at a == 0
            sign = torch.sign(a)
            grad = grad * sign * sign
        return grad, None, None


def _min_val(clamp: nn.Module) -> tuple[bool, float | None]:
    """``(recognised, c)`` for a clamp module that is Identity or a ``ScalarSignedClampMinSte``."""
    if type(clamp) is Identity:
        return True, None
    if type(clamp) is ScalarSignedClampMinSte:
        return True, float(clamp.min_val)
    return False, None


def _restrict_is(module: nn.Module, impl: type) -> bool:
    return type(getattr(module, "restrict_value_impl", None)) is impl


def _learned_threshold_min_val(impl: nn.Module) -> tuple[bool, float | None]:
    """Whether ``impl`` is a ``ParameterFromRuntimeStatsScaling`` with float restrictions."""
    if type(impl) is not ParameterFromRuntimeStatsScaling:
        return False, None
    ok, c = _min_val(getattr(impl.clamp_scaling, "clamp_min_ste", None))
    return (
        ok
        and _restrict_is(impl.restrict_scaling, FloatRestrictValue)
        and _restrict_is(impl.restrict_threshold, FloatRestrictValue)
        and type(impl.restrict_threshold_pre) is Abs
        and _restrict_is(impl.restrict_scale_threshold, Identity)
    ), c


def _weight_stats_min_val(impl: nn.Module) -> tuple[bool, float | None]:
    """Whether ``impl`` is an ``AbsMax`` ``StatsFromParameterScaling`` with float restrictions."""
    if type(impl) is not StatsFromParameterScaling:
        return False, None
    st = impl.stats_scaling_impl
    stats = getattr(getattr(impl.parameter_list_stats, "stats", None), "stats_impl", None)
    ok1, c1 = _min_val(getattr(st.clamp_scaling, "clamp_min_ste", None))
    ok2, c2 = _min_val(getattr(st.restrict_clamp_scaling, "clamp_ste", None))
    ok3, c3 = _min_val(getattr(st.restrict_clamp_threshold, "clamp_ste", None))
    ok4, c4 = _min_val(getattr(st.restrict_clamp_scale_threshold, "clamp_ste", None))
    return (
        type(stats) is AbsMax
        and ok1 and ok2 and ok3 and ok4 and c1 == c2 and c3 is None and c4 is None
        and type(st.affine_rescaling) is Identity
        and type(st.restrict_scaling_pre) is Abs
        and type(st.restrict_threshold_pre) is Abs
        and _restrict_is(st.restrict_clamp_scaling, FloatRestrictValue)
        and _restrict_is(st.restrict_clamp_threshold, FloatRestrictValue)
        and _restrict_is(st.restrict_clamp_scale_threshold, Identity)
    ), c1


# -- the quantizer -----------------------------------------------------------------------
class FastRescalingIntQuant(RescalingIntQuant):
    """:class:`~brevitas.core.quant.RescalingIntQuant` computed with fused autograd functions.

    Same constructor, submodules and outputs. The fused tensor path is taken when the
    integer quantizer is Brevitas's plain one (``RoundSte``, ``TensorClamp`` or
    ``TensorClampSte``, identity input view, no quantization delay, zero zero-point), the
    fused scale when the scaling module is one of the two configurations of the module
    docstring; anything else runs through Brevitas's modules.
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
        self._learned, self._learned_c = _learned_threshold_min_val(scaling_impl)
        self._stats, self._stats_c = _weight_stats_min_val(scaling_impl)
        self._grid_of: tuple[Tensor, int] | None = None  # (bit-width tensor, its _version)
        self._grid: tuple[float, float, Tensor] | None = None

    @property
    def fast(self) -> bool:
        """Whether the fused tensor path applies to this quantizer."""
        return self._fast_kind is not None

    def grid(self, bit_width: Tensor) -> tuple[float, float, Tensor]:
        """``(lo, hi, N)``: integer range and threshold at ``bit_width`` (cached per buffer version)."""
        seen = self._grid_of
        if seen is None or seen[0] is not bit_width or seen[1] != bit_width._version or self._grid is None:
            iq = self.int_quant
            with torch.no_grad():
                n = self.int_scaling_impl(bit_width)
            self._grid = (float(iq.min_int(bit_width)), float(iq.max_int(bit_width)), n)
            # Holding the tensor keeps its id from being reused by another one.
            self._grid_of = (bit_width, bit_width._version)
        return self._grid

    def _learned_phase(self) -> bool:
        impl = self.scaling_impl
        return self._learned and impl.counter > impl.collect_stats_steps

    def can_fuse_relu(self) -> bool:
        """Whether ``forward(x, relu=True)`` may replace ``forward(relu(x))`` now.

        Only on the fused path with a learned threshold: while Brevitas collects
        statistics (calibration, its first training steps) they must be of ``relu(x)``.
        """
        return _ENABLED and self._fast_kind == "clamp" and not self.observer_only and self._learned_phase()

    def forward(self, x: Tensor, relu: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, scale, zero_point, bit_width)`` as ``RescalingIntQuant``; ``relu`` only when
        :meth:`can_fuse_relu` (the caller checks)."""
        if self._fast_kind is None or not _ENABLED or x.dtype not in _DTYPES:
            return super().forward(x)
        bit_width = self.msb_clamp_bit_width_impl()
        lo, hi, n = self.grid(bit_width)
        impl = self.scaling_impl
        if self._learned_phase():
            scale = _LearnedScale.apply(impl.value, n, self._learned_c, not impl.training)
        elif self._stats:
            scale = _StatsScale.apply(impl.parameter_list_stats(x), n, self._stats_c)
        else:
            scale = impl(x, n)
        zero_point = self.zero_point_impl(x, scale, bit_width)
        if self.observer_only:
            y = x
        elif self._fast_kind == "clamp":
            y = _FakeQuant.apply(x, scale, lo, hi, relu)
        else:
            y = _FakeQuantSTE.apply(x, scale, lo, hi)
        return y, scale, zero_point, bit_width


class _FusedReLUQuant(FusedActivationQuantProxy):
    """``tensor_quant(relu(x))`` computed as one fused fake-quantize (module doc)."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype in _DTYPES and self.tensor_quant.can_fuse_relu():
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
    is replaced, and again after every ``load_state_dict`` (which rebuilds it).
    """
    proxy = ActQuantProxyFromInjector(quant_layer, quant_injector)
    _fuse_relu(proxy)
    proxy.register_load_state_dict_post_hook(_fuse_relu)
    return proxy
