"""The bit width of one Brevitas quantizer, read and changed in place on any Brevitas model.

A Brevitas layer holds its quantizers as *proxies* (``weight_quant``, ``bias_quant``,
``input_quant``, ``output_quant``, ``act_quant``). A proxy's bit width comes from one of
three implementations, and each is changed differently:

==========================  ===============================================================
bit-width implementation    how :func:`set_proxy_bits` changes it
==========================  ===============================================================
``BitWidthStatefulConst``   qtemperate's presets: the bit width is a buffer; it is written.
``BitWidthConst``           stock presets (``Int8WeightPerTensorFloat``,
                            ``Int8ActPerTensorFloat``, ``Uint8ActPerTensorFloat`` ...): the
                            bit width is re-injected into the proxy's injector
                            (``quant_injector.let(bit_width=b)``), the quantizer is rebuilt
                            from it, and every stateful part of the old quantizer (learned
                            thresholds/scales, statistics and their step counters) is moved
                            into the rebuilt one, so the learned range is kept and only the
                            scale is re-derived: ``s = t / (2^(b-1) - 1)`` (signed) or
                            ``t / (2^b - 1)`` (unsigned) for a learned threshold ``t``.
``BitWidthParameter``       a *learned* bit width: refused (it is a trained parameter).
==========================  ===============================================================

Quantizers without an integer bit width (binary, ternary, minifloat) are refused too.
Every refusal is a :class:`BitWidthError` naming the layer and the reason: a bit width
is never silently left unchanged.
"""

from __future__ import annotations

from brevitas.core.bit_width.const import BitWidthConst, BitWidthStatefulConst
from brevitas.core.bit_width.parameter import BitWidthParameter
from brevitas.core.quant.binary import BinaryQuant, ClampedBinaryQuant
from brevitas.core.quant.float import FloatQuant
from brevitas.core.quant.ternary import TernaryQuant
from brevitas.proxy.quant_proxy import QuantProxyFromInjector
from torch import nn

__all__ = [
    "PROXY_ATTRS",
    "BitWidthError",
    "check_proxy_settable",
    "enabled_proxy",
    "proxy_bits",
    "quant_proxies",
    "set_proxy_bits",
]

PROXY_ATTRS = ("weight_quant", "bias_quant", "input_quant", "output_quant", "act_quant")
"""Attributes under which Brevitas layers hold their quantizer proxies."""

_NON_INTEGER = (BinaryQuant, ClampedBinaryQuant, TernaryQuant, FloatQuant)
_BIT_WIDTH_IMPLS = (BitWidthStatefulConst, BitWidthConst, BitWidthParameter)


class BitWidthError(ValueError):
    """A quantizer whose bit width cannot be read or set as an integer; the message names it."""


def quant_proxies(module: nn.Module) -> dict[str, QuantProxyFromInjector]:
    """``{attr: proxy}`` of the Brevitas quantizer proxies a layer holds directly."""
    out: dict[str, QuantProxyFromInjector] = {}
    for attr in PROXY_ATTRS:
        proxy = module._modules.get(attr)
        if isinstance(proxy, QuantProxyFromInjector):
            out[attr] = proxy
    return out


def enabled_proxy(module: nn.Module | None, attr: str) -> QuantProxyFromInjector | None:
    """The proxy ``module.<attr>`` when it exists and quantizes, else None."""
    if module is None:
        return None
    proxy = module._modules.get(attr)
    if isinstance(proxy, QuantProxyFromInjector) and proxy.is_quant_enabled:
        return proxy
    return None


def _holder(proxy: nn.Module) -> nn.Module | None:
    """The module whose ``tensor_quant`` child does the quantization (act or parameter proxy)."""
    fused = getattr(proxy, "fused_activation_quant_proxy", None)
    if isinstance(fused, nn.Module):
        return fused
    return proxy if isinstance(getattr(proxy, "tensor_quant", None), nn.Module) else None


def _bit_width_impl(proxy: nn.Module) -> nn.Module | None:
    for m in proxy.modules():
        if isinstance(m, _BIT_WIDTH_IMPLS):
            return m
    return None


def _non_integer(proxy: nn.Module) -> nn.Module | None:
    for m in proxy.modules():
        if isinstance(m, _NON_INTEGER):
            return m
    return None


def proxy_bits(proxy: nn.Module | None) -> int | None:
    """Bit width of an enabled Brevitas proxy, None when absent, disabled or not integer."""
    if proxy is None or not getattr(proxy, "is_quant_enabled", False):
        return None
    if _non_integer(proxy) is not None:
        return None
    impl = _bit_width_impl(proxy)
    if impl is None:
        return None
    if isinstance(impl, BitWidthStatefulConst):
        return int(impl.bit_width.item())
    return round(float(impl().detach()))


def _has_state(module: nn.Module) -> bool:
    """Parameters, buffers or a step counter anywhere below ``module``."""
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return True
    return any(hasattr(m, "counter") for m in module.modules())


def _contains_bit_width(module: nn.Module) -> bool:
    return any(isinstance(m, _BIT_WIDTH_IMPLS) for m in module.modules())


def _transplant(old: nn.Module, new: nn.Module) -> None:
    """Move every stateful child of ``old`` into the same place of ``new``.

    Children that hold the bit width are kept from ``new`` (that is the change);
    children with learned state and no bit width (scaling: thresholds, statistics,
    step counters) are the very objects of ``old``, so nothing learned is lost.
    """
    for name, new_child in list(new.named_children()):
        old_child = old._modules.get(name)
        if old_child is None or type(old_child) is not type(new_child):
            continue
        if isinstance(new_child, _BIT_WIDTH_IMPLS):
            continue
        if _contains_bit_width(old_child):
            _transplant(old_child, new_child)
        elif _has_state(old_child):
            new._modules[name] = old_child


def check_proxy_settable(proxy: nn.Module, where: str) -> None:
    """Raise :class:`BitWidthError` (naming ``where``) if the proxy's bit width cannot be set."""
    non_integer = _non_integer(proxy)
    if non_integer is not None:
        raise BitWidthError(
            f"{where}: the quantizer is not an integer quantizer "
            f"({type(non_integer).__name__}); its bit width cannot be set to an integer "
            "number of bits"
        )
    impl = _bit_width_impl(proxy)
    if impl is None:
        raise BitWidthError(f"{where}: no bit-width implementation found in the quantizer")
    if isinstance(impl, BitWidthParameter):
        raise BitWidthError(
            f"{where}: the bit width is learned (BitWidthParameter); set_bit_width would "
            "overwrite a trained parameter. Build the layer with a constant bit width "
            "(bit_width_impl_type=CONST) to switch it"
        )
    if not isinstance(impl, BitWidthStatefulConst) and _holder(proxy) is None:
        raise BitWidthError(f"{where}: the quantizer has no tensor quantizer to rebuild")


def set_proxy_bits(proxy: nn.Module, bits: int, where: str) -> None:
    """Set the bit width of an enabled Brevitas proxy in place (see the module docstring).

    Args:
        proxy: A Brevitas quantizer proxy (``layer.weight_quant``, ``layer.act_quant`` ...).
        bits: The new bit width (already validated by the caller).
        where: ``"layer.attr"`` for error messages.

    Raises:
        BitWidthError: for a learned bit width, a non-integer quantizer or a quantizer
            whose bit width cannot be found.
    """
    check_proxy_settable(proxy, where)
    if isinstance(_bit_width_impl(proxy), BitWidthStatefulConst):
        for m in proxy.modules():
            if isinstance(m, BitWidthStatefulConst):
                m.bit_width.fill_(float(bits))
        return
    if proxy_bits(proxy) == bits:
        return  # nothing to rebuild
    _rebuild_with_bits(proxy, bits, where)


def _rebuild_with_bits(proxy: nn.Module, bits: int, where: str) -> None:
    """Re-inject ``bit_width`` and rebuild the proxy's quantizer, keeping its learned state."""
    holder = _holder(proxy)
    assert holder is not None  # checked by check_proxy_settable
    training = proxy.training
    old_holder = holder
    old_tensor_quant = holder.tensor_quant
    old_act = getattr(holder, "activation_impl", None)
    injector = proxy.quant_injector
    try:
        proxy.quant_injector = injector.let(bit_width=int(bits))
        proxy.init_tensor_quant()
    except Exception as exc:  # a custom quantizer that cannot be rebuilt: say so
        proxy.quant_injector = injector
        raise BitWidthError(
            f"{where}: rebuilding the quantizer at {bits} bits failed ({type(exc).__name__}: {exc})"
        ) from exc
    new_holder = _holder(proxy)
    assert new_holder is not None
    _transplant(old_tensor_quant, new_holder.tensor_quant)
    if old_act is not None and _has_state(old_act) and new_holder is not old_holder:
        new_holder.activation_impl = old_act  # e.g. a learned PReLU slope
    proxy.train(training)
    for cache in ("_cached_act", "_cached_weight"):
        if hasattr(proxy, cache):
            setattr(proxy, cache, None)
    if proxy_bits(proxy) != bits:
        raise BitWidthError(
            f"{where}: the rebuilt quantizer reports {proxy_bits(proxy)} bits, not {bits}"
        )
