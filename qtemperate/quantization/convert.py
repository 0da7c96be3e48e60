"""Float model → Brevitas QAT model: module replacement, input quantizer, calibration."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import brevitas.nn as qnn
import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from qtemperate.quantization.config import INPUT_ACT_BITS, ROLE_ATTR, QuantConfig
from qtemperate.quantization.coverage import graph_facts, needs_input_quant, replacement
from qtemperate.quantization.functional import functional_to_modules
from qtemperate.quantization.graph import (
    _first_last_layers,
    _input_quantizer_sources,
    _link_bias_scale_sources,
    _pool_input_is_relu,
    _residual_inputs_to_quantize,
    _set_submodule,
    _trace,
    fold_batch_norms,
)
from qtemperate.quantization.layers import (
    _QUANT_WBIOL,
    QuantAvgPoolRequant,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantResidualAdd,
    _is_residual_add,
)
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Int8WeightPerChannelFloatStatefulBitWidth,
    Int8WeightPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.report import QuantizationReport, quantization_report, refuse_quantized
from qtemperate.quantization.targets import attach_target, capped_weight_bits, resolve_target

__all__ = ["calibrate", "quantize"]


def _quant_layer(
    mod: nn.Module,
    weight_bits: int,
    per_channel: bool,
    input_quant: bool,
    input_bits: int = INPUT_ACT_BITS,
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
        kwargs["input_bit_width"] = input_bits
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
    device = next((t.device for t in (*qmodel.parameters(), *qmodel.buffers())), torch.device("cpu"))
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
    *,
    strict: bool = False,
    return_report: bool = False,
    target: str | None = None,
) -> nn.Module | tuple[nn.Module, QuantizationReport]:
    """Return a Brevitas QAT copy of ``model`` (the input model is not modified).

    Steps: deep copy; fold BatchNorm into convolutions (:func:`fold_batch_norms`); turn
    functional calls of the forward (``F.relu6``, ``torch.cat``, ``x * y``, ``x + y`` ...)
    into modules (:mod:`~qtemperate.quantization.functional`; the model becomes a
    ``torch.fx.GraphModule`` with the same submodule names when there are any); replace
    Conv/Linear/ReLU/ResidualAdd/avg-pool modules by quantized ones (see module docstring)
    and every other operation vision models use by its quantized form (activations,
    concatenations, products, means, upsampling, normalizations, ``nn.MultiheadAttention``:
    :mod:`~qtemperate.quantization.coverage`); give the layers that read the model input an
    8-bit input quantizer and every other conv/linear whose input is not a quantizer output
    an ``act_bits`` one; optionally calibrate activation thresholds on
    ``calibration_batches`` batches (:func:`calibrate`). Only modules the forward calls are
    replaced (the projections inside ``nn.MultiheadAttention`` are not: it is replaced
    whole). Whatever stays float is listed by the quantization report
    (:func:`~qtemperate.quantization.quantization_report`).

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
        strict: raise :class:`~qtemperate.quantization.FloatLeftoverError` (naming every
            operation) when any operation stays float.
        return_report: also return the
            :class:`~qtemperate.quantization.QuantizationReport` of the quantized model.
        target: deployment target (:mod:`qtemperate.quantization.targets`): ``"auto"`` (the
            CPU running this), ``"x86-avx2"``, ``"x86-vnni"``, ``"arm64"``, ``"generic"``, or
            ``None`` (no target: bits exactly as given). On ``x86-avx2`` / ``generic`` every
            weight width, first and last layers included, is capped at 7 bits so the
            exported int8 graph cannot saturate those CPUs' int16 pair sums. The model
            records its target (``get_quant_config(q).target``).

    Returns:
        The quantized model, in the same train/eval mode as ``model``; with
        ``return_report=True`` the tuple ``(model, report)``.

    Raises:
        ValueError: for bit widths outside 2..8 (32 = float: do not call quantize), for an
            already quantized model (Brevitas: use :func:`set_bit_width`; torch.ao: use it
            as it is), for ``calibration_batches < 1`` or an unknown target.
        FloatLeftoverError: with ``strict=True``, when an operation stays float.
    """
    QuantConfig(weight_bits, act_bits, first_last_bits, per_channel)  # validates the bits
    target = resolve_target(target)
    weight_bits = capped_weight_bits(weight_bits, target)
    first_last_bits = capped_weight_bits(first_last_bits, target)
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
    refuse_quantized(model)
    was_training = model.training
    qmodel = copy.deepcopy(model).eval()
    fold_batch_norms(qmodel)
    gm = _trace(qmodel)
    qmodel, rewritten = functional_to_modules(qmodel, gm)  # F.relu6, torch.cat, x * y ...: modules
    if rewritten:
        gm = _trace(qmodel)
    first, last = _first_last_layers(qmodel, gm)
    modules = dict(qmodel.named_modules())
    bias_sources = _input_quantizer_sources(gm, modules)
    facts = graph_facts(gm, modules)
    replaced: list[str] = []
    for name, mod in list(modules.items()):
        if not name or not facts.called(name) or any(name.startswith(p + ".") for p in replaced):
            continue  # the forward never calls it (e.g. a child of nn.MultiheadAttention)
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Linear) and not isinstance(mod, _QUANT_WBIOL):
            is_first, is_last = name in first, name in last
            bits = first_last_bits if (is_first or is_last) else weight_bits
            requant = not is_first and needs_input_quant(name, facts, bias_sources)
            new = _quant_layer(
                mod, bits, per_channel, input_quant=is_first or requant,
                input_bits=INPUT_ACT_BITS if is_first else act_bits,
            )
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
            new = QuantResidualAdd(act_bits, _residual_inputs_to_quantize(gm, modules, name))
        elif isinstance(mod, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
            new = QuantAvgPoolRequant(
                mod, act_bits,
                signed=not (_pool_input_is_relu(gm, modules, name) or facts.input_unsigned(name)),
            )
        else:
            new = replacement(name, mod, facts, weight_bits, act_bits, per_channel)
            if new is None:
                continue
        _set_submodule(qmodel, name, new)
        replaced.append(name)
    _link_bias_scale_sources(qmodel, bias_sources)
    # The new activation quantizers are built on the CPU: join the model's device
    # before calibration runs batches on it (a CUDA student otherwise mixes devices).
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    qmodel.to(device)
    attach_target(qmodel, target)
    if calibration_loader is not None:
        calibrate(qmodel, calibration_loader, calibration_batches)
    qmodel.train(was_training)
    if strict or return_report:
        report = quantization_report(qmodel)
        if strict:
            report.raise_on_float()
        if return_report:
            return qmodel, report
    return qmodel

