"""Reading and switching the bit widths of a quantized model in place."""

from __future__ import annotations

from brevitas.core.bit_width.const import BitWidthStatefulConst
from torch import nn

from qtemperate.bits import MAX_BITS
from qtemperate.quantization.config import INPUT_ACT_BITS, ROLE_ATTR, QuantConfig, _check_bits
from qtemperate.quantization.layers import _ACT_MODULES, _QUANT_WBIOL, is_quantized
from qtemperate.quantization.targets import (
    attach_target,
    capped_weight_bits,
    model_target,
    resolve_target,
)

__all__ = ["get_bit_widths", "get_quant_config", "set_bit_width"]


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


def set_bit_width(
    qmodel: nn.Module, weight_bits: int, act_bits: int, target: str | None = None
) -> nn.Module:
    """Switch a quantized model's bit widths in place, keeping weights and learned thresholds.

    Inner conv/linear weights go to ``weight_bits`` and every activation quantizer
    (ReLU, residual add, pool requant) to ``act_bits``; first/last layer weights keep
    ``first_last_bits`` and the model-input quantizer stays at 8 bits. The bit widths are
    buffers, so they are saved in and restored from ``state_dict``. Weight widths never
    exceed the model's deployment target's cap (7 bits on ``x86-avx2`` / ``generic``,
    first and last layers included; :mod:`qtemperate.quantization.targets`).

    Args:
        qmodel: model returned by :func:`quantize`.
        weight_bits: new inner weight bits, 2..8.
        act_bits: new activation bits, 2..8.
        target: retarget the model (``"auto"`` or a target name); ``None`` keeps the
            target it carries.

    Returns:
        ``qmodel`` (modified in place).

    Raises:
        ValueError: for bit widths outside 2..8, or when ``qmodel`` is not quantized.
    """
    _check_bits("weight_bits", weight_bits)
    _check_bits("act_bits", act_bits)
    if not is_quantized(qmodel):
        raise ValueError("qmodel is not quantized; call quantize() first")
    if target is not None:
        attach_target(qmodel, resolve_target(target))
    tgt = model_target(qmodel)
    for m in qmodel.modules():
        if isinstance(m, _QUANT_WBIOL):
            proxy = _weight_proxy(m)
            if getattr(m, ROLE_ATTR, "inner") == "inner":
                _write_bits(proxy, capped_weight_bits(weight_bits, tgt))
            elif (bits := _read_bits(proxy)) is not None and capped_weight_bits(bits, tgt) < bits:
                _write_bits(proxy, capped_weight_bits(bits, tgt))  # retargeted to a capped target
        elif isinstance(m, _ACT_MODULES):
            _write_bits(_act_proxy(m), act_bits)
    return qmodel


def get_quant_config(qmodel: nn.Module) -> QuantConfig:
    """Derive the :class:`QuantConfig` of a quantized model from its live quantizers.

    ``weight_bits`` / ``first_last_bits`` come from the inner / first-last layers (the
    minimum when they differ), ``act_bits`` from the activation quantizers,
    ``per_channel`` from the shape of the first layer's weight scale and ``target`` from
    the model's deployment-target tag.

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
        target=model_target(qmodel),
    )

