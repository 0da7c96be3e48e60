"""torch.ao quantization models: read their bit widths, switch them, count their bytes.

Two kinds of torch.ao models are understood:

* **prepared** for QAT (eager ``torch.ao.quantization.prepare_qat`` or FX
  ``quantize_fx.prepare_qat_fx``): weight layers carry a ``weight_fake_quant`` and
  activations pass through ``FakeQuantize`` / observer modules
  (``activation_post_process``). A quantizer's bit width is read from its integer range,
  ``b = ceil(log2(quant_max - quant_min + 1))`` (so an ``x86`` activation with
  ``reduce_range`` — range 0..127 — is 7 bits: that is its resolution), and
  :func:`set_ao_bit_width` writes a new range (``[-2^(b-1), 2^(b-1) - 1]`` for signed
  dtypes, ``[0, 2^b - 1]`` for unsigned) into the fake-quant module and its observer and
  re-derives scale and zero point from the observed min/max;
* **converted** (``convert`` / ``convert_fx``): weight layers hold packed integer
  weights (``layer.weight()`` is a ``qint8`` tensor: 8 bits) and float biases; they
  have no ``nn.Parameter`` at all. Their bit widths cannot change (re-run ``convert``
  on a prepared model at other bits); :func:`set_ao_bit_width` says so.

A QAT-prepared model below 8 bits is deployed through qtemperate, not through torch.ao's
``convert``: ``convert`` / ``convert_fx`` keep a fake-quant's scale and zero point but not
its range (weights saturate at ``qint8``'s [-128, 127], outputs at ``quint8``'s [0, 255]),
so the model converted from a 4-bit one is another model (issue 20: 87.5 % / 89.1 % top-1
agreement). :func:`set_ao_bit_width` warns about it, and
:func:`~qtemperate.export.export_onnx` writes the prepared model itself as the exact QDQ
graph of its fake-quants (:mod:`qtemperate.export.torch_ao`).

The first/last-layer and input-quantizer policy is the one of
:func:`~qtemperate.quantization.set_bit_width`: the first and last weight layers and the
quantizer of the model input (``QuantStub`` / the first FX fake-quant) keep their bits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from qtemperate.errors import QtemperateWarning

__all__ = [
    "AoWeight",
    "ao_bit_widths",
    "ao_kind",
    "ao_weights",
    "frozen_observers",
    "is_torch_ao",
    "range_bits",
    "set_ao_bit_width",
]

_QUANTIZED_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_PER_CHANNEL = (
    torch.per_channel_symmetric,
    torch.per_channel_affine,
    torch.per_channel_affine_float_qparams,
)
_QUANTIZED_DTYPE_BITS = {
    torch.qint8: 8,
    torch.quint8: 8,
    torch.qint32: 32,
    torch.quint4x2: 4,
    torch.quint2x4: 2,
}


def _is_packed_layer(m: nn.Module) -> bool:
    """A converted torch.ao conv/linear (packed integer weight behind ``weight()``)."""
    return type(m).__module__.startswith(_QUANTIZED_PREFIXES) and callable(
        getattr(m, "weight", None)
    )


def ao_kind(model: nn.Module) -> str | None:
    """``"prepared"`` (fake-quant/observer modules), ``"converted"`` (packed weights) or None."""
    kind: str | None = None
    for m in model.modules():
        if isinstance(m, FakeQuantizeBase | ObserverBase):
            return "prepared"
        if type(m).__module__.startswith(_QUANTIZED_PREFIXES):
            kind = "converted"
    return kind


def is_torch_ao(model: nn.Module) -> bool:
    """Whether ``model`` is a torch.ao QAT-prepared or converted model."""
    return ao_kind(model) is not None


def range_bits(quant_min: int, quant_max: int) -> int:
    """Bits of an integer range: ``ceil(log2(quant_max - quant_min + 1))``."""
    return max(1, math.ceil(math.log2(int(quant_max) - int(quant_min) + 1)))


def _fq_bits(fq: nn.Module | None) -> int | None:
    if fq is None:
        return None
    lo, hi = getattr(fq, "quant_min", None), getattr(fq, "quant_max", None)
    if lo is None or hi is None:
        return None
    return range_bits(lo, hi)


def _act_fq(m: nn.Module) -> nn.Module | None:
    app = m._modules.get("activation_post_process")
    return app if isinstance(app, FakeQuantizeBase | ObserverBase) else None


def _is_symmetric(qscheme: torch.qscheme | None) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


@dataclass(frozen=True)
class AoWeight:
    """One torch.ao weight layer as stored.

    Attributes:
        weight_numel: Weight elements.
        bits: Weight bits (fake-quant range, or the packed dtype's width).
        n_scales: Weight scales (output channels when per-channel, else 1).
        zero_point_bytes: Bytes of non-zero weight zero points (0 when symmetric).
        bias_numel: Float bias elements (converted layers; prepared ones own ``bias``).
    """

    weight_numel: int
    bits: int
    n_scales: int
    zero_point_bytes: float
    bias_numel: int


def ao_weights(model: nn.Module) -> dict[str, AoWeight]:
    """Every torch.ao weight layer of ``model`` with how its weight is stored."""
    out: dict[str, AoWeight] = {}
    for name, m in model.named_modules():
        wfq = m._modules.get("weight_fake_quant")
        if isinstance(wfq, FakeQuantizeBase) and isinstance(
            getattr(m, "weight", None), torch.Tensor
        ):
            bits = _fq_bits(wfq) or 32
            per_channel = getattr(wfq, "qscheme", None) in _PER_CHANNEL
            n_scales = int(m.weight.shape[getattr(wfq, "ch_axis", 0)]) if per_channel else 1
            zp = 0.0 if _is_symmetric(getattr(wfq, "qscheme", None)) else n_scales * bits / 8
            out[name] = AoWeight(m.weight.numel(), bits, n_scales, zp, 0)
        elif _is_packed_layer(m):
            try:
                w = m.weight()
                b = m.bias() if callable(getattr(m, "bias", None)) else None
            except Exception:  # a quantized module without a packed weight (e.g. Quantize)
                continue
            if not isinstance(w, torch.Tensor):
                continue
            bits = _QUANTIZED_DTYPE_BITS.get(w.dtype, 32)
            if w.is_quantized and w.qscheme() in _PER_CHANNEL:
                n_scales = int(w.q_per_channel_scales().numel())
                nonzero = bool(torch.count_nonzero(w.q_per_channel_zero_points()))
            elif w.is_quantized:
                n_scales, nonzero = 1, int(w.q_zero_point()) != 0
            else:
                n_scales, nonzero = 0, False
            zp = n_scales * bits / 8 if nonzero else 0.0
            out[name] = AoWeight(w.numel(), bits, n_scales, zp, 0 if b is None else b.numel())
    return out


def _input_quantizers(model: nn.Module) -> set[str]:
    """Fake-quant modules that quantize the model input (QuantStub's, or the first FX one)."""
    out: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.ao.quantization.QuantStub):
            fq = _act_fq(m)
            if fq is not None:
                out.add(f"{name}.activation_post_process" if name else "activation_post_process")
    if isinstance(model, fx.GraphModule):
        modules = dict(model.named_modules())
        for node in model.graph.nodes:
            if node.op != "placeholder":
                continue
            for user in node.users:
                if user.op == "call_module" and isinstance(
                    modules.get(user.target), FakeQuantizeBase | ObserverBase
                ):
                    out.add(str(user.target))
    return out


def _weight_roles(model: nn.Module) -> dict[str, str]:
    """First/last weight layers in graph order (FX) or registration order (eager)."""
    names: list[str] = []
    if isinstance(model, fx.GraphModule):
        weights = ao_weights(model)
        names = [
            str(n.target)
            for n in model.graph.nodes
            if n.op == "call_module" and n.target in weights
        ]
    if not names:
        names = list(ao_weights(model))
    roles = {n: "inner" for n in names}
    if not names:
        return roles
    last = {names[-1]}
    if isinstance(model, fx.GraphModule):
        from qtemperate.quantization.graph import output_layers

        # Every head of a multi-output model is a last layer; fake-quant and observer
        # modules between a layer and the output are walked through.
        layer_ids = {id(model.get_submodule(n)) for n in names}
        last = output_layers(model, lambda m: id(m) in layer_ids) or last
    roles[names[0]] = "first"
    for n in last:
        roles[n] = "first_last" if roles[n] == "first" else "last"
    return roles


def ao_bit_widths(model: nn.Module) -> dict[str, dict[str, int | None]]:
    """:func:`~qtemperate.quantization.get_bit_widths` for a torch.ao model.

    Weight layers report ``weight`` (and ``act`` for the fake-quant on their output);
    stand-alone fake-quant modules (FX's ``activation_post_process_<n>``, a
    ``QuantStub``'s) report ``act``; converted quantized modules report 8 bits for
    their quantized (``quint8``) outputs.
    """
    out: dict[str, dict[str, int | None]] = {}
    weights = ao_weights(model)
    owned: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizeBase | ObserverBase):
            continue  # read through their owner below
        row: dict[str, int | None] = {"weight": None, "act": None, "input": None}
        if name in weights:
            row["weight"] = weights[name].bits
        fq = _act_fq(m)
        if fq is not None:
            row["act"] = _fq_bits(fq)
            owned.add(id(fq))
        elif type(m).__module__.startswith(_QUANTIZED_PREFIXES) and hasattr(m, "scale"):
            row["act"] = 8  # converted modules output quint8 tensors
        if row["weight"] is not None or row["act"] is not None:
            out[name] = row
    for name, m in model.named_modules():
        if (
            isinstance(m, FakeQuantizeBase)
            and id(m) not in owned
            and not name.endswith("weight_fake_quant")
        ):
            # a stand-alone fake-quant (FX inserts them between layers)
            out[name] = {"weight": None, "act": _fq_bits(m), "input": None}
    return out


def _write_range(fq: nn.Module, bits: int, where: str) -> None:
    """Give a fake-quant (and its observer) a ``bits``-wide range; re-derive scale/zero point."""
    dtype = getattr(fq, "dtype", None)
    signed = dtype in (torch.qint8, torch.qint32, torch.int8, torch.int16, torch.int32)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    storage = _QUANTIZED_DTYPE_BITS.get(dtype, 8) if dtype is not None else 8
    if bits > storage:
        raise ValueError(f"{where}: {bits} bits do not fit its {dtype} storage ({storage} bits)")
    targets = [fq]
    obs = getattr(fq, "activation_post_process", None)
    if isinstance(obs, ObserverBase):
        targets.append(obs)
    for t in targets:
        t.quant_min, t.quant_max = lo, hi
        if hasattr(t, "has_customized_qrange"):
            t.has_customized_qrange = True
    observed = isinstance(obs, ObserverBase) and hasattr(fq, "scale") and hasattr(obs, "min_val")
    if observed and obs.min_val.numel() > 0 and torch.isfinite(obs.min_val).all():
        scale, zp = obs.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zp.shape).copy_(zp.to(fq.zero_point.dtype))


def set_ao_bit_width(model: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    """Switch a QAT-prepared torch.ao model's fake-quant ranges in place (see module docstring).

    Warns:
        QtemperateWarning: when a range goes below 8 bits, that torch.ao's ``convert``
            drops it (deploy with :func:`~qtemperate.export.export_onnx` instead).

    Raises:
        ValueError: for a converted model (packed weights cannot change width), a model
            prepared for post-training quantization (observers only), or a bit width wider
            than a quantizer's storage dtype, naming the layer.
    """
    if ao_kind(model) == "converted":
        raise ValueError(
            "this torch.ao model is converted: its weights are packed integer tensors and "
            "cannot change bit width; call set_bit_width on the QAT-prepared model "
            "(before torch.ao.quantization.convert / convert_fx) and convert again"
        )
    if not any(isinstance(m, FakeQuantizeBase) for m in model.modules()):
        # Observers only (prepare / prepare_fx): the forward runs in float and the weight
        # observers are created by convert from the qconfig, so nothing here sets a width.
        raise ValueError(
            "this torch.ao model is prepared for post-training quantization (observers, no "
            "fake-quant): its forward runs in float and its weights are observed only at "
            "convert, so set_bit_width cannot change it; set quant_min/quant_max in its "
            "qconfig before prepare, or prepare it for QAT (prepare_qat / prepare_qat_fx)"
        )
    roles = _weight_roles(model)
    inputs = _input_quantizers(model)
    changes: list[tuple[nn.Module, int, str]] = []
    for name, m in model.named_modules():
        wfq = m._modules.get("weight_fake_quant")
        if isinstance(wfq, FakeQuantizeBase) and roles.get(name, "inner") == "inner":
            changes.append((wfq, weight_bits, f"{name}.weight_fake_quant"))
    for name, m in model.named_modules():
        if (
            not isinstance(m, FakeQuantizeBase)
            or name.endswith("weight_fake_quant")
            or name in inputs
        ):
            continue
        parent = name.rpartition(".")[0]
        if parent and isinstance(model.get_submodule(parent), FakeQuantizeBase):
            continue  # an observer inside a fake-quant: written with it
        changes.append((m, act_bits, name))
    for fq, bits, where in changes:
        dtype = getattr(fq, "dtype", None)
        storage = _QUANTIZED_DTYPE_BITS.get(dtype, 8) if dtype is not None else 8
        if bits > storage:
            raise ValueError(
                f"{where}: {bits} bits do not fit its {dtype} storage ({storage} bits)"
            )
    for fq, bits, where in changes:
        _write_range(fq, bits, where)
    narrow = "/".join(str(b) for b in sorted({bits for _, bits, _ in changes if bits < 8}))
    if narrow:
        warnings.warn(
            f"torch.ao's convert / convert_fx keep the scales of these {narrow}-bit fake-quants "
            "but not their ranges (weights saturate at qint8's [-128, 127], activations at "
            "quint8's [0, 255]): the converted model is not the model trained; deploy the "
            "prepared model with qtemperate.export_onnx (the exact QDQ graph of its fake-quants)",
            QtemperateWarning,
            stacklevel=3,
        )
    return model


@contextmanager
def frozen_observers(model: nn.Module) -> Iterator[nn.Module]:
    """Run a torch.ao QAT model as one fixed function: its fake-quants stop observing.

    A ``FakeQuantize`` observes every forward pass, in train *and* eval mode, while its
    ``observer_enabled`` flag is set, and re-derives its scale from a moving min/max: two
    calls on the same batch then differ, and a verification would compare a file with a
    model that moved while it was checked. Inside the block every fake-quant's observer
    is off (``disable_observer``); the flags are restored after. Any other model is
    yielded untouched.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, FakeQuantizeBase):
            # FakeQuantize keeps the flag in observer_enabled, _LearnableFakeQuantize in static_enabled
            for attr in ("observer_enabled", "static_enabled"):
                flag = getattr(m, attr, None)
                if isinstance(flag, torch.Tensor):
                    saved.append((flag, flag.clone()))
            m.disable_observer()
    try:
        yield model
    finally:
        for flag, value in saved:
            flag.copy_(value)


def check_ao_exportable(model: nn.Module) -> None:
    """Refuse a torch.ao model prepared for post-training quantization (observers only).

    Its forward runs in float (observers only record ranges), so an export would be a
    float model; it becomes an integer model only through ``convert``. QAT-prepared
    models (fake-quant modules) are exported as the exact QDQ graph of their fake-quants
    (:mod:`qtemperate.export.torch_ao`); converted ones as integer ONNX operators.

    Raises:
        ValueError: for an observer-only prepared model.
    """
    if ao_kind(model) == "prepared" and not any(
        isinstance(m, FakeQuantizeBase) for m in model.modules()
    ):
        fx_model = isinstance(model, fx.GraphModule)
        convert = (
            "torch.ao.quantization.quantize_fx.convert_fx(model.eval())"
            if fx_model
            else "torch.ao.quantization.convert(model.eval())"
        )
        raise ValueError(
            "this torch.ao model is prepared for post-training quantization (observers, no "
            "fake-quant): its forward runs in float; calibrate it, convert it with "
            f"{convert} and export the converted model"
        )
