"""Turn a float (possibly pruned) PyTorch model into a Brevitas QAT model, and back between bit widths.

The conversion is explicit module replacement on a deep copy of the model:

=============================  ==========================================================
float module                   quantized replacement
=============================  ==========================================================
``nn.BatchNorm2d`` after conv  folded into the conv (conv gets a bias), replaced by Identity
``nn.Conv1d/2d``               :class:`QuantConv1d/2d` (Brevitas layers, signed narrow-range
                               weights, bias rounded to the int32 grid ``s_x * s_w``)
``nn.Linear``                  :class:`QuantLinear` (same)
``nn.ReLU``                    ``brevitas.nn.QuantReLU`` (unsigned per-tensor activations)
``ResidualAdd`` (see below)    :class:`QuantResidualAdd`: one shared signed quantizer for the
                               inputs that are not already quantized (an identity shortcut
                               from a ReLU is added as it is)
``nn.AdaptiveAvgPool2d`` /     :class:`QuantAvgPoolRequant`: the pool followed by a requantizing
``nn.AvgPool2d``               ``QuantIdentity`` so the classifier receives integer input
activations, ``cat``, ``a*b``,  :mod:`.ops` (:class:`QuantActivation`, :class:`QuantConcat`,
means, bilinear upsampling,     :class:`QuantMul`, :class:`QuantRequant`,
norms, multi-head attention     :class:`QuantNormInput`, Brevitas ``QuantMultiheadAttention``);
                                the decisions are in :mod:`.coverage`
=============================  ==========================================================

Functional calls of a forward (``F.relu6(x)``, ``torch.cat``, ``x * y``, ``x + y``) are
turned into modules first (:mod:`.functional`), and a conv/linear whose input is not the
output of a quantizer (a sum, a product, a normalized tensor) gets its own input quantizer.
:func:`quantization_report` lists every operation of any model — quantized or float, and
why — and ``quantize(..., strict=True)`` refuses float leftovers.

:func:`freeze_activation_ranges` fixes the learned activation ranges late in a stage
(:mod:`.freeze`; a faster step without a scale gradient).

:func:`get_bit_widths`, :func:`set_bit_width` and :func:`get_quant_config` also work on
models built from stock ``brevitas.nn`` layers (:mod:`.proxies`, :mod:`.foreign`) and
on torch.ao QAT models (:mod:`.torch_ao`).

The layers that read the model input get an 8-bit signed ``input_quant`` so the first
convolution already runs on integers in the exported ONNX graph.

Every quantizer uses a *stateful* constant bit width (Brevitas ``BitWidthStatefulConst``:
the bit width is a buffer), so bit widths travel with ``state_dict``: loading a 4-bit
checkpoint into a freshly :func:`quantize`-d 8-bit model restores 4 bits. Scales are the
usual Brevitas ones: weights use the per-channel (or per-tensor) maximum absolute value,

    s_w = max|W_c| / (2^(b_w - 1) - 1),   W_q = s_w * clamp(round(W / s_w), -(2^(b_w-1)-1), 2^(b_w-1)-1),

activations a learned threshold ``t`` (initialised from a high percentile of observed
values) with ``s_a = t / (2^(b_a-1) - 1)`` (signed) or ``s_a = t / (2^b_a - 1)`` (unsigned).
Because the learned parameter is the threshold ``t`` and not the scale, switching bit width
with :func:`set_bit_width` keeps the learned range and re-derives the scale.

Biases are stored as float32 parameters (Brevitas ``bias_quant=None``, so checkpoints hold
the float bias), but the forward pass of every quantized conv/linear whose input comes from a
quantizer rounds them to the int32 grid of the exported graph (straight-through estimator,
so QAT trains through the rounding):

    s_b = s_x * s_w,   b_q = s_b * round(b / s_b)

with ``s_x`` the scale of the quantizer producing the layer input and ``s_w`` the
(per-channel) weight scale. The ONNX export in :mod:`qtemperate.export` quantizes the float
bias with exactly this formula (int32 ``DequantizeLinear``; needed for onnxruntime to fuse
``QLinearConv``/``QGemm``, and onnxruntime would quantize a float bias itself anyway), so
PyTorch and the exported graph compute the same pre-activations. At 4 bits one activation
step is large, and a float bias that is off the int32 grid flips values near a rounding
boundary by a whole level. The input quantizer of a layer is found on the FX graph: the
layer's own ``input_quant`` (layers reading the model input), or a ``QuantReLU`` /
pool requantizer reached through Identity/Dropout/MaxPool/Flatten/reshape. Its scale is
recorded by a forward hook on that quantizer on every forward pass; layers without such a
quantizer (e.g. reading an un-requantized residual sum) keep the float bias.

Residual additions are recognised from the graph, so this module does not import
:mod:`qtemperate.models`: a parameter-free module with no children whose traced forward
is exactly one addition of its two inputs (``forward(a, b) = a + b``, as
``qtemperate.models.ResidualAdd``) is a residual add, and so is any instance of
:class:`ResidualAddMarker`.
"""


from __future__ import annotations

from qtemperate.bits import MAX_BITS as MAX_BITS
from qtemperate.bits import MIN_BITS as MIN_BITS
from qtemperate.quantization.bit_width import get_bit_widths as get_bit_widths
from qtemperate.quantization.bit_width import get_quant_config as get_quant_config
from qtemperate.quantization.bit_width import set_bit_width as set_bit_width
from qtemperate.quantization.config import INPUT_ACT_BITS as INPUT_ACT_BITS
from qtemperate.quantization.config import ROLE_ATTR as ROLE_ATTR
from qtemperate.quantization.config import QuantConfig as QuantConfig
from qtemperate.quantization.convert import calibrate as calibrate
from qtemperate.quantization.convert import quantize as quantize
from qtemperate.quantization.freeze import activation_ranges_frozen as activation_ranges_frozen
from qtemperate.quantization.freeze import freeze_activation_ranges as freeze_activation_ranges
from qtemperate.quantization.graph import fold_batch_norms as fold_batch_norms
from qtemperate.quantization.layers import QuantAvgPoolRequant as QuantAvgPoolRequant
from qtemperate.quantization.layers import QuantConv1d as QuantConv1d
from qtemperate.quantization.layers import QuantConv2d as QuantConv2d
from qtemperate.quantization.layers import QuantLinear as QuantLinear
from qtemperate.quantization.layers import QuantResidualAdd as QuantResidualAdd
from qtemperate.quantization.layers import ResidualAddMarker as ResidualAddMarker
from qtemperate.quantization.layers import is_quantized as is_quantized
from qtemperate.quantization.layers import quantize_bias as quantize_bias
from qtemperate.quantization.ops import QuantActivation as QuantActivation
from qtemperate.quantization.ops import QuantConcat as QuantConcat
from qtemperate.quantization.ops import QuantMul as QuantMul
from qtemperate.quantization.ops import QuantNormInput as QuantNormInput
from qtemperate.quantization.ops import QuantRequant as QuantRequant
from qtemperate.quantization.proxies import BitWidthError as BitWidthError
from qtemperate.quantization.quantizers import (
    Int8ActPerTensorFloatStatefulBitWidth as Int8ActPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.quantizers import (
    Int8WeightPerChannelFloatStatefulBitWidth as Int8WeightPerChannelFloatStatefulBitWidth,
)
from qtemperate.quantization.quantizers import (
    Int8WeightPerTensorFloatStatefulBitWidth as Int8WeightPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.quantizers import (
    Uint8ActPerTensorFloatStatefulBitWidth as Uint8ActPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.report import FloatLeftoverError as FloatLeftoverError
from qtemperate.quantization.report import LayerQuantization as LayerQuantization
from qtemperate.quantization.report import QuantizationReport as QuantizationReport
from qtemperate.quantization.report import quantization_report as quantization_report

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "BitWidthError",
    "FloatLeftoverError",
    "Int8ActPerTensorFloatStatefulBitWidth",
    "Int8WeightPerChannelFloatStatefulBitWidth",
    "Int8WeightPerTensorFloatStatefulBitWidth",
    "LayerQuantization",
    "QuantActivation",
    "QuantAvgPoolRequant",
    "QuantConcat",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantMul",
    "QuantNormInput",
    "QuantRequant",
    "QuantResidualAdd",
    "QuantizationReport",
    "ResidualAddMarker",
    "Uint8ActPerTensorFloatStatefulBitWidth",
    "activation_ranges_frozen",
    "calibrate",
    "fold_batch_norms",
    "freeze_activation_ranges",
    "get_bit_widths",
    "get_quant_config",
    "is_quantized",
    "quantization_report",
    "quantize",
    "quantize_bias",
    "set_bit_width",
]
