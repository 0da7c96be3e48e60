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
    is_quantized,
)
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Int8WeightPerChannelFloatStatefulBitWidth,
    Int8WeightPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.targets import attach_target, capped_weight_bits, resolve_target

__all__ = ["calibrate", "quantize"]


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
    target: str | None = None,
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
        target: deployment target (:mod:`qtemperate.quantization.targets`): ``"auto"`` (the
            CPU running this), ``"x86-avx2"``, ``"x86-vnni"``, ``"arm64"``, ``"generic"``, or
            ``None`` (no target: bits exactly as given). On ``x86-avx2`` / ``generic`` every
            weight width, first and last layers included, is capped at 7 bits so the
            exported int8 graph cannot saturate those CPUs' int16 pair sums. The model
            records its target (``get_quant_config(q).target``).

    Returns:
        The quantized model, in the same train/eval mode as ``model``.

    Raises:
        ValueError: for bit widths outside 2..8 (32 = float: do not call quantize), for an
            already quantized model, for ``calibration_batches < 1`` or an unknown target.
    """
    QuantConfig(weight_bits, act_bits, first_last_bits, per_channel)  # validates the bits
    target = resolve_target(target)
    weight_bits = capped_weight_bits(weight_bits, target)
    first_last_bits = capped_weight_bits(first_last_bits, target)
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
            new = QuantResidualAdd(act_bits, _residual_inputs_to_quantize(gm, modules, name))
        elif isinstance(mod, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
            new = QuantAvgPoolRequant(
                mod, act_bits, signed=not _pool_input_is_relu(gm, modules, name)
            )
        else:
            continue
        _set_submodule(qmodel, name, new)
    _link_bias_scale_sources(qmodel, bias_sources)
    attach_target(qmodel, target)
    if calibration_loader is not None:
        calibrate(qmodel, calibration_loader, calibration_batches)
    return qmodel.train(was_training)

