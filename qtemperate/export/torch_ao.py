"""ONNX export of QAT-prepared torch.ao models: the exact QDQ graph of their fake-quantizers.

torch.ao's ``convert`` / ``convert_fx`` keep the scale and zero point of a fake-quant
but not its integer range: weights go through ``torch.quantize_per_channel(w, s, z, axis,
torch.qint8)`` (saturating at [-128, 127]) and quantized ops saturate their ``quint8``
outputs at [0, 255]. A fake-quant narrowed by ``set_bit_width`` to 4 bits
(``[-8, 7]`` / ``[0, 15]``) therefore converts to a *different* model: every value the
fake-quant clamped passes through unclamped (issue 20 measured 87.5 % (eager) / 89.1 %
(FX) top-1 agreement with the trained model). This module exports the model the user
trained instead. Every fake-quant (observers frozen, see
:func:`~qtemperate.quantization.torch_ao.frozen_observers`)

    fq(x) = (clamp(z + round(x / s), q_min, q_max) - z) * s

becomes ``QuantizeLinear(s, z) -> Clip(q_min, q_max) -> DequantizeLinear(s, z)`` with
int8 storage when ``q_min < 0`` and uint8 otherwise (no ``Clip`` for a full 8-bit range);
a weight's ``QuantizeLinear`` is evaluated at export with torch's own formula
``q = z + rint(w * (1 / s))`` (float32, half to even), so the stored integers are the
ones PyTorch's fake-quant produces, and weights of at most 4 bits are packed as ``INT4``
(opset 21, :mod:`qtemperate.export.qcdq`). The float parts (the batch-norm rescaling of
fused QAT conv-bn modules, float biases) are traced as they run: unlike
:func:`qtemperate.export.qcdq.postprocess_qcdq` on Brevitas graphs, biases stay float
because torch.ao's fake-quant model adds them in float.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantize, FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from qtemperate.export.qcdq import postprocess_qcdq
from qtemperate.quantization.torch_ao import frozen_observers

__all__ = ["export_ao_qdq", "qdq_twin"]

_STORAGE = {  # storage dtype of an integer range: (torch dtype, lowest, highest)
    "uint8": (torch.uint8, 0, 255),
    "int8": (torch.int8, -128, 127),
}


def _storage(quant_min: int, quant_max: int, where: str) -> str:
    """``"uint8"`` for a range inside [0, 255], ``"int8"`` inside [-128, 127]; else refuse."""
    for name, (_, lo, hi) in _STORAGE.items():
        if lo <= quant_min and quant_max <= hi:
            return name
    raise ValueError(
        f"{where}: integer range [{quant_min}, {quant_max}] fits neither int8 nor uint8, the "
        "storage of ONNX QuantizeLinear/DequantizeLinear; exportable torch.ao ranges have at most 8 bits"
    )


class _QDQFunction(torch.autograd.Function):
    """torch.ao's fake-quant forward, exported as ``QuantizeLinear -> [Clip] -> DequantizeLinear``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
        quant_min: int, quant_max: int, axis: int,
    ) -> torch.Tensor:
        zp = zero_point.to(torch.int32)
        if axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, quant_min, quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, quant_min, quant_max)

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, x, scale, zero_point, quant_min: int, quant_max: int, axis: int
    ):
        kw = {"axis_i": axis} if axis >= 0 else {}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        dtype, lo, hi = _STORAGE[_storage(quant_min, quant_max, "fake-quant")]
        if (quant_min, quant_max) != (lo, hi):
            q = g.op(
                "Clip", q,
                g.op("Constant", value_t=torch.tensor(quant_min, dtype=dtype)),
                g.op("Constant", value_t=torch.tensor(quant_max, dtype=dtype)),
            )
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _QDQFakeQuant(nn.Module):
    """A frozen torch.ao fake-quant: fixed scale, zero point (in its storage dtype) and range."""

    def __init__(self, fq: FakeQuantize, where: str) -> None:
        super().__init__()
        app = getattr(fq, "activation_post_process", None)
        # FakeQuantize.forward clamps with its observer's range (set_bit_width writes both)
        self.quant_min = int(getattr(app, "quant_min", fq.quant_min))
        self.quant_max = int(getattr(app, "quant_max", fq.quant_max))
        dtype, lo, hi = _STORAGE[_storage(self.quant_min, self.quant_max, where)]
        per_channel = bool(getattr(fq, "is_per_channel", False))
        self.axis = int(fq.ch_axis) if per_channel else -1
        scale = fq.scale.detach().float().clone()
        zp = fq.zero_point.detach().to(torch.int64).clone()
        if not per_channel:
            if scale.numel() != 1:
                raise ValueError(f"{where}: per-tensor fake-quant with {scale.numel()} scales")
            scale, zp = scale.reshape(()), zp.reshape(())
        if not bool(((zp >= lo) & (zp <= hi)).all()):
            raise ValueError(
                f"{where}: zero point {zp.tolist()} outside its {_storage(self.quant_min, self.quant_max, where)} storage"
            )
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQFunction.apply(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.axis
        )


def qdq_twin(model: nn.Module) -> nn.Module:
    """A copy of a QAT-prepared torch.ao model whose fake-quants are frozen QDQ modules.

    Each enabled :class:`~torch.ao.quantization.FakeQuantize` (fused, fixed-qparams and
    plain) becomes a fixed-qparam module computing the same fake quantization (and
    exporting as Q/DQ); disabled ones (``fake_quant_enabled == 0``) and stand-alone
    observers (their forward is the identity) become ``nn.Identity``. The copy is in eval
    mode; ``model`` is not changed.

    Raises:
        ValueError: for a fake-quant of another kind (e.g. ``_LearnableFakeQuantize``,
            whose zero point is a float parameter), naming it, or a range wider than 8 bits.
    """
    twin = copy.deepcopy(model).eval()
    # FX shares one fake-quant between ops that keep the quantization of their input
    # (flatten, pools): every name bound to it gets the same replacement
    new: dict[int, nn.Module] = {}
    sites: list[tuple[str, int]] = []
    inside: list[str] = []
    for name, m in twin.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside):
            continue  # the observer inside a fake-quant goes with it
        if isinstance(m, FakeQuantizeBase | ObserverBase):
            inside.append(name)
            sites.append((name, id(m)))
        if id(m) in new or not isinstance(m, FakeQuantizeBase | ObserverBase):
            continue
        if isinstance(m, ObserverBase):
            new[id(m)] = nn.Identity()
        elif not isinstance(m, FakeQuantize):
            raise ValueError(
                f"{name}: {type(m).__name__} is not a torch.ao FakeQuantize; qtemperate "
                "exports FakeQuantize, FusedMovingAvgObsFakeQuantize and "
                "FixedQParamsFakeQuantize modules"
            )
        else:
            enabled = int(m.fake_quant_enabled[0]) == 1
            new[id(m)] = _QDQFakeQuant(m, name) if enabled else nn.Identity()
    for name, key in sites:
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, new[key])
    return twin


def _fold_constant_quantize(model: onnx.ModelProto) -> None:
    """Replace ``QuantizeLinear`` of a constant (a weight) by its integers, computed as torch does.

    ``q = saturate(z + rint(w * (1 / s)))`` in float32 (torch's fake-quant kernels multiply
    by the float32 reciprocal; ONNX divides, which can differ by one unit in the last
    place and so round a tie the other way): the stored integers are those of PyTorch.
    """
    keep: list[onnx.NodeProto] = []
    for n in model.graph.node:  # Constant nodes (the Clip bounds) become initializers first
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and value is not None:
            t = copy.deepcopy(value)
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or not all(i in inits for i in n.input[:3]):
            keep.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        z = numpy_helper.to_array(inits[n.input[2]])
        if s.ndim == 1 and s.size > 1:  # per axis: broadcast along the node's axis
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = s.size
            s, z = s.reshape(shape), z.reshape(shape)
        info = np.iinfo(z.dtype)
        q = np.rint(w * (np.float32(1.0) / s)).astype(np.int64) + z.astype(np.int64)
        q = np.clip(q, info.min, info.max).astype(z.dtype)
        model.graph.initializer.append(numpy_helper.from_array(q, n.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)


def export_ao_qdq(
    model: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], allow_int4: bool
) -> onnx.ModelProto:
    """The QDQ ONNX graph of a QAT-prepared torch.ao model (see the module docstring).

    Args:
        model: A QAT-prepared torch.ao model (eager or FX); not changed.
        x: Example input on the model's device.
        kwargs: ``torch.onnx.export`` keywords (names, dynamic axes, opset; TorchScript exporter).
        allow_int4: Store weights of at most 4 bits as packed ``INT4`` (opset 21).
    """
    with frozen_observers(model):
        twin = qdq_twin(model)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, (x,), buf, **kwargs)
    graph = onnx.load_model_from_string(buf.getvalue())
    _fold_constant_quantize(graph)
    graph = postprocess_qcdq(graph, allow_int4=allow_int4, quantize_biases=False)
    onnx.checker.check_model(graph)
    return graph

