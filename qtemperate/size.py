"""Model size, compression and MACs for float, Brevitas-quantized and torch.ao models.

Byte counts (``b_w`` = a layer's weight bit width, 32 for float layers):

    float_bytes     = 4 * params
    quantized_bytes = sum_quant layers [ n_weight * b_w / 8 + 4 * n_weight_scales
                                         + zero_point_bytes + bias_bytes ]
                    + sum_float params  4 * n
                    + sum_act quantizers 4 * n_scale_params

with ``n_weight_scales`` = number of output channels (per-channel) or 1 (per-tensor),
``bias_bytes`` = ``4 * n_bias`` (biases stay float32 in :mod:`qtemperate.quantization`;
an int-quantized Brevitas bias counts at its bit width, e.g. 32 for ``Int32Bias``), and
``zero_point_bytes`` = 0 for symmetric quantizers (zero point 0: every Brevitas preset here
and torch.ao's symmetric weight schemes), else ``n_weight_scales * b_w / 8``.
``compression_ratio`` is ``quantized_bytes / float_bytes``: a fraction, below 1 when
quantization shrinks the model (about 0.25 for an 8-bit model, 0.125 for 4 bits),
exactly 1.0 for a float model.

A weight counts at ``b_w`` only where it is really quantized:

* Brevitas layers at the live bit width of their enabled ``weight_quant`` — any
  Brevitas model, not only those from :func:`~qtemperate.quantization.quantize`;
  a quantized layer whose weight its parent reads directly (a ``QuantLinear`` put
  inside a float ``nn.MultiheadAttention``, which reads ``out_proj.weight``; a
  ``get_attr`` of the weight in the traced forward) bypasses its quantizer and counts
  as float;
* torch.ao QAT-prepared layers at the range of their ``weight_fake_quant``
  (``ceil(log2(quant_max - quant_min + 1))`` bits); converted layers at the width of
  their packed integer weight, with their float bias (they own no ``nn.Parameter``:
  their weight and bias count as params here);
* everything else (LayerNorm/GroupNorm affine parameters, embeddings, unfused
  BatchNorm, ...) at 32 bits.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qtemperate.bits import FLOAT_BITS

__all__ = ["SizeReport", "bypassed_weight_layers", "count_macs", "model_size"]

_QUANTIZER_ATTRS = ("weight_quant", "bias_quant", "input_quant", "output_quant", "act_quant")


@dataclass(frozen=True)
class SizeReport:
    """Size of a model at float and at its real (quantized) precision.

    Attributes:
        float_bytes: ``4 * params``.
        quantized_bytes: bytes at the real bit widths (see module docstring).
        compression_ratio: ``quantized_bytes / float_bytes`` (1.0 for a float model).
        params: number of weight + bias (and other non-quantizer) parameters.
        macs: multiply-accumulates per sample of conv/linear layers, None without an example input.
        bits: ``{layer_name: weight_bits}`` for every layer owning a weight (32 = float).
    """

    float_bytes: int
    quantized_bytes: float
    compression_ratio: float
    params: int
    macs: int | None = None
    bits: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logging)."""
        return asdict(self)


def _is_quantizer_param(name: str) -> bool:
    return any(part in _QUANTIZER_ATTRS for part in name.split("."))


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates per sample of every conv and linear layer (forward-hook pass).

    For a convolution with output ``(N, C_out, *S)``: ``C_out * prod(S) * C_in/groups * prod(k)``;
    for a linear layer with output ``(N, ..., F_out)``: ``prod(out.shape[1:]) * F_in``.
    Brevitas ``QuantConv*``/``QuantLinear`` subclass the torch layers and are counted the same.
    Other ops (adds, pools, activations) are not counted.

    Args:
        model: float or quantized model (run in eval mode under ``no_grad``; mode restored).
        example_input: a batch; the count is divided by its batch size.

    Returns:
        MACs per sample.
    """
    total = 0
    batch = int(example_input.shape[0])

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        out_t = out.value if hasattr(out, "value") else out
        per_sample = out_t.numel() // max(batch, 1)
        if hasattr(mod, "in_features"):
            total += per_sample * mod.in_features
        else:
            k = 1
            for s in mod.kernel_size:
                k *= int(s)
            total += per_sample * (mod.in_channels // mod.groups) * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) or _is_packed_conv_linear(m)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input.to(_device(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def _device(model: nn.Module) -> torch.device:
    """Where the model lives (CPU for a model without parameters or buffers, e.g. converted torch.ao)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_packed_conv_linear(m: nn.Module) -> bool:
    """A converted torch.ao conv or linear layer (counted by :func:`count_macs` like a float one)."""
    return type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")) and (
        hasattr(m, "in_features") or hasattr(m, "kernel_size")
    )


def model_size(model: nn.Module, example_input: torch.Tensor | None = None) -> SizeReport:
    """Compute the :class:`SizeReport` of a float or quantized model.

    Args:
        model: any ``nn.Module``; Brevitas layers are counted at their live bit widths.
        example_input: optional batch for :func:`count_macs`; ``macs`` is None without it.

    Returns:
        The size report.

    Example:
        >>> import torch.nn as nn
        >>> r = model_size(nn.Linear(10, 2))
        >>> (r.params, r.float_bytes, r.compression_ratio)
        (22, 88, 1.0)
    """
    live_bits: dict[str, dict[str, int | None]] = {}
    bypassed: set[str] = set()
    ao: dict[str, Any] = {}
    # Without Brevitas imported no model holds its layers, and a torch.ao model holds
    # torch.ao modules: a float model is sized without importing either (planning).
    if "brevitas" in sys.modules or _has_torch_ao_modules(model):
        from qtemperate.quantization import get_bit_widths
        from qtemperate.quantization.torch_ao import ao_kind, ao_weights

        live_bits = get_bit_widths(model)
        bypassed = bypassed_weight_layers(model)
        if ao_kind(model) is not None:
            ao = ao_weights(model)
    params = 0
    qbytes = 0.0
    bits: dict[str, int] = {}
    for name, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        packed = ao.get(name)
        if not own and packed is not None:
            # a converted torch.ao layer: packed integer weight + float bias, no Parameters
            params += packed.weight_numel + packed.bias_numel
            bits[name] = packed.bits
            qbytes += packed.weight_numel * packed.bits / 8 + 4 * packed.n_scales
            qbytes += packed.zero_point_bytes + 4 * packed.bias_numel
            continue
        if not own:
            continue
        if _is_quantizer_param(name):
            # learned activation thresholds / scales: one float32 each, not model params
            qbytes += 4 * sum(p.numel() for p in own.values())
            continue
        params += sum(p.numel() for p in own.values())
        w_bits = None if name in bypassed else live_bits.get(name, {}).get("weight")
        if packed is not None:
            w_bits = packed.bits
        weight = own.get("weight")
        if weight is not None:
            bits[name] = w_bits if w_bits is not None else FLOAT_BITS
        for pname, p in own.items():
            if pname == "weight" and w_bits is not None and packed is not None:
                qbytes += p.numel() * w_bits / 8 + 4 * packed.n_scales + packed.zero_point_bytes
            elif pname == "weight" and w_bits is not None:
                n_scales = _weight_scale_count(mod)
                qbytes += p.numel() * w_bits / 8 + 4 * n_scales
            elif pname == "bias" and _bias_bits(mod) is not None and name not in bypassed:
                qbytes += p.numel() * _bias_bits(mod) / 8
            else:
                qbytes += 4 * p.numel()
    float_bytes = 4 * params
    ratio = qbytes / float_bytes if float_bytes else 1.0
    macs = count_macs(model, example_input) if example_input is not None else None
    return SizeReport(
        float_bytes=float_bytes,
        quantized_bytes=qbytes,
        compression_ratio=ratio,
        params=params,
        macs=macs,
        bits=bits,
    )


def _weight_scale_count(mod: nn.Module) -> int:
    """Number of float32 weight scales: read from the quantizer's configuration.

    Computing ``quant_weight()`` just to count its scales cost ~70 ms per ResNet-50
    layer (4 s per model) — too slow for the planner's dry run.
    """
    injector = getattr(getattr(mod, "weight_quant", None), "quant_injector", None)
    try:
        shape = tuple(injector.scaling_shape)  # type: ignore[union-attr]
    except Exception:  # an unusual quantizer: fall back to the exact, slow path
        with torch.no_grad():
            return int(mod.quant_weight().scale.numel())
    return math.prod(shape) if shape else 1


def _bias_bits(mod: nn.Module) -> int | None:
    if "brevitas" not in sys.modules:  # no Brevitas layer can exist: not imported for that
        return None
    from qtemperate.quantization.proxies import enabled_proxy, proxy_bits

    return proxy_bits(enabled_proxy(mod, "bias_quant"))


def _has_torch_ao_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds a torch.ao quantization module (fake-quant, observer, quantized layer)."""
    return any(type(m).__module__.startswith("torch.ao.") for m in model.modules())


def bypassed_weight_layers(model: nn.Module) -> set[str]:
    """Quantized weight layers whose parent reads their weight directly, bypassing the quantizer.

    Two patterns are recognised: the children of a float ``nn.MultiheadAttention``
    (its forward passes ``out_proj.weight`` to ``F.multi_head_attention_forward``), and a
    weight that the traced forward reads as an attribute (``F.linear(x, self.fc.weight)``).
    """
    from qtemperate.quantization.config import ROLE_ATTR
    from qtemperate.quantization.proxies import enabled_proxy  # imports Brevitas

    modules = dict(model.named_modules())
    quantized = {n for n, m in modules.items() if enabled_proxy(m, "weight_quant") is not None}
    if not quantized:
        return set()
    out: set[str] = set()
    for name, m in modules.items():
        if type(m) is nn.MultiheadAttention:
            prefix = f"{name}." if name else ""
            out |= {n for n in quantized if n.startswith(prefix)}
    if all(hasattr(modules[n], ROLE_ATTR) for n in quantized):
        return out  # built by quantize(), which only replaces layers the forward calls
    from qtemperate.quantization.graph import _trace

    gm = _trace(model)
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and isinstance(node.target, str):
                owner, _, attr = node.target.rpartition(".")
                if attr in ("weight", "bias") and owner in quantized:
                    out.add(owner)
    return out
