"""Reading and switching the bit widths of a quantized model in place.

Works on every quantized model a user may hand over:

* models from :func:`~qtemperate.quantization.quantize` (stateful bit widths, roles tagged);
* models built from stock ``brevitas.nn`` layers and presets (constant bit widths: the
  quantizer is rebuilt at the new width keeping its learned scales, see
  :mod:`qtemperate.quantization.proxies`; roles derived from the graph, see
  :mod:`qtemperate.quantization.foreign`);
* torch.ao QAT-prepared models (fake-quant ranges) and converted ones (read only), see
  :mod:`qtemperate.quantization.torch_ao`.

A quantizer whose bit width cannot be set raises an error naming it, before anything is
changed: a call never silently leaves a quantizer at its old width.
"""

from __future__ import annotations

from torch import nn

from qtemperate.bits import MAX_BITS
from qtemperate.quantization.config import INPUT_ACT_BITS, QuantConfig, _check_bits
from qtemperate.quantization.foreign import layer_roles
from qtemperate.quantization.layers import is_quantized
from qtemperate.quantization.proxies import (
    BitWidthError,
    check_proxy_settable,
    enabled_proxy,
    proxy_bits,
    set_proxy_bits,
)
from qtemperate.quantization.targets import (
    attach_target,
    capped_weight_bits,
    model_target,
    resolve_target,
)
from qtemperate.quantization.torch_ao import ao_bit_widths, ao_kind, set_ao_bit_width

__all__ = ["get_bit_widths", "get_quant_config", "set_bit_width"]


def _read_bits(module: nn.Module | None) -> int | None:
    """Bit width of a Brevitas proxy (or None)."""
    return proxy_bits(module)


def _row(m: nn.Module) -> dict[str, int | None] | None:
    weight = enabled_proxy(m, "weight_quant")
    act = enabled_proxy(m, "act_quant")
    inp = enabled_proxy(m, "input_quant")
    out = enabled_proxy(m, "output_quant")
    if weight is None and act is None and inp is None and out is None:
        return None
    # a weight layer's output quantizer is the activation quantizer of its output
    return {
        "weight": proxy_bits(weight),
        "act": proxy_bits(act if act is not None else out),
        "input": proxy_bits(inp),
    }


def get_bit_widths(qmodel: nn.Module) -> dict[str, dict[str, int | None]]:
    """Per-layer bit widths read from the live quantizers.

    Returns:
        ``{name: {"weight": bits|None, "act": bits|None, "input": bits|None}}`` for every
        layer holding an enabled quantizer: conv/linear layers (``weight``; ``input`` for
        a layer with its own input quantizer, ``act`` for one with an output quantizer),
        activation quantizers (QuantReLU,
        QuantIdentity, QuantSigmoid ...: ``act``). Residual adds, concatenations,
        requantizing pools and activations appear under the name of their inner
        ``QuantIdentity``. torch.ao models report their fake-quant ranges (prepared)
        or packed widths (converted). A float model gives ``{}``.
    """
    if ao_kind(qmodel) is not None:
        return ao_bit_widths(qmodel)
    out: dict[str, dict[str, int | None]] = {}
    for name, m in qmodel.named_modules():
        row = _row(m)
        if row is not None:
            out[name] = row
    return out


def _planned_changes(
    qmodel: nn.Module, weight_bits: int, act_bits: int, target: str | None = None
) -> list[tuple[nn.Module, int, str]]:
    """``(proxy, bits, "layer.attr")`` for every quantizer the policy switches; weight
    widths capped by the deployment ``target`` (first/last layers too)."""
    roles = layer_roles(qmodel)
    changes: list[tuple[nn.Module, int, str]] = []
    for name, m in qmodel.named_modules():
        weight = enabled_proxy(m, "weight_quant")
        if weight is not None and roles.role(name) == "inner":
            changes.append((weight, capped_weight_bits(weight_bits, target), f"{name}.weight_quant"))
        elif weight is not None and (bits := proxy_bits(weight)) is not None and (
                capped_weight_bits(bits, target) < bits):
            changes.append((weight, capped_weight_bits(bits, target), f"{name}.weight_quant"))  # retargeted
        inp = enabled_proxy(m, "input_quant")
        model_input = (
            weight is not None and roles.reads_model_input(name)
        ) or name in roles.input_quantizers
        if inp is not None and not model_input:
            changes.append((inp, act_bits, f"{name}.input_quant"))
        act = enabled_proxy(m, "act_quant")
        if act is not None and name not in roles.input_quantizers:
            changes.append((act, act_bits, f"{name}.act_quant"))
        out = enabled_proxy(m, "output_quant")
        if out is not None:
            changes.append((out, act_bits, f"{name}.output_quant"))
    return changes


def set_bit_width(
    qmodel: nn.Module, weight_bits: int, act_bits: int, target: str | None = None
) -> nn.Module:
    """Switch a quantized model's bit widths in place, keeping weights and learned thresholds.

    Inner conv/linear weights go to ``weight_bits`` and every activation quantizer
    (activations, residual adds, concatenations, requantizing pools, layer input/output
    quantizers) to ``act_bits``; the first and last conv/linear layers keep their weight
    bits (``first_last_bits``) and the quantizers of the model input keep theirs (8 bits
    in models from :func:`~qtemperate.quantization.quantize`). Models from
    :func:`~qtemperate.quantization.quantize` store the bit widths as buffers (saved in
    and restored from ``state_dict``); stock Brevitas quantizers are rebuilt at the new
    width with their learned scales (their bit width is part of the code, not the state:
    a fresh model loading the ``state_dict`` has its own widths). torch.ao QAT-prepared
    models get new fake-quant ranges (:func:`~qtemperate.quantization.torch_ao.set_ao_bit_width`).
    Weight widths never exceed the model's deployment target's cap (7 bits on
    ``x86-avx2`` / ``generic``, first and last layers included;
    :mod:`qtemperate.quantization.targets`).

    Args:
        qmodel: A quantized model (qtemperate, stock Brevitas or torch.ao QAT).
        weight_bits: new inner weight bits, 2..8.
        act_bits: new activation bits, 2..8.
        target: retarget the model (``"auto"`` or a target name); ``None`` keeps the
            target it carries.

    Returns:
        ``qmodel`` (modified in place).

    Raises:
        ValueError: for bit widths outside 2..8, when ``qmodel`` is not quantized, for a
            converted torch.ao model, or (:class:`~qtemperate.quantization.proxies.BitWidthError`)
            for a quantizer whose width cannot be set (learned bit width, binary/minifloat
            quantizer), naming it; nothing is changed then.
    """
    _check_bits("weight_bits", weight_bits)
    _check_bits("act_bits", act_bits)
    if ao_kind(qmodel) is not None:
        return set_ao_bit_width(qmodel, weight_bits, act_bits)
    if not is_quantized(qmodel):
        raise ValueError("qmodel is not quantized; call quantize() first")
    if target is not None:
        attach_target(qmodel, resolve_target(target))
    changes = _planned_changes(qmodel, weight_bits, act_bits, model_target(qmodel))
    errors = []
    for proxy, _, where in changes:
        try:
            check_proxy_settable(proxy, where)
        except BitWidthError as exc:
            errors.append(str(exc))
    if errors:
        raise BitWidthError("set_bit_width changed nothing: " + "; ".join(errors))
    for proxy, bits, where in changes:
        set_proxy_bits(proxy, bits, where)
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
    roles = layer_roles(qmodel)
    inner, edge, acts, inputs = [], [], [], []
    per_channel: bool | None = None
    for name, m in qmodel.named_modules():
        weight = enabled_proxy(m, "weight_quant")
        bits = proxy_bits(weight)
        if bits is not None:
            (inner if roles.role(name) == "inner" else edge).append(bits)
            if per_channel is None:
                per_channel = m.quant_weight().scale.numel() > 1
        inp = proxy_bits(enabled_proxy(m, "input_quant"))
        if inp is not None:
            model_input = (
                weight is not None and roles.reads_model_input(name)
            ) or name in roles.input_quantizers
            (inputs if model_input else acts).append(inp)
        act = proxy_bits(enabled_proxy(m, "act_quant"))
        if act is not None:
            (inputs if name in roles.input_quantizers else acts).append(act)
        out = proxy_bits(enabled_proxy(m, "output_quant"))
        if out is not None:
            acts.append(out)
    edge_bits = min(edge) if edge else (min(inner) if inner else MAX_BITS)
    return QuantConfig(
        weight_bits=min(inner) if inner else edge_bits,
        act_bits=min(acts) if acts else MAX_BITS,
        first_last_bits=edge_bits,
        per_channel=True if per_channel is None else per_channel,
        input_bits=min(inputs) if inputs else INPUT_ACT_BITS,
        target=model_target(qmodel),
    )
