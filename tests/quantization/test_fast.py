"""The fused fake-quantize against Brevitas's own operations: same outputs, same gradients.

What is compared, and how exactly:

* forward outputs: bit-identical (``torch.equal``; only the sign of a zero may differ,
  and ``-0.0 == 0.0``);
* weight-quantizer gradients (weights, biases): bit-identical (the backward repeats
  Brevitas's float operations);
* activation-quantizer gradients: the same formulas in fewer float32 operations, so
  equal up to float32 rounding, with these bounds:

  - ``dL/dx``: ``g * m`` instead of ``((g * s) * m) / s``: two roundings, so
    ``|Δ| <= 2**-22 |g|`` per element (``_assert_input_grad``);
  - ``dL/ds`` (and the learned threshold ``t``, ``s = t / N``): dot products instead of
    element-wise products and sums. Both the fused and Brevitas's float32 results are
    checked against the float64 value of ``Σ g (q - m v)`` within the classic bound of
    float32 summation, ``n · 2**-24 · Σ |g| (|q| + |m v|)`` (``_threshold_oracle``): a
    threshold gradient is a sum over a whole activation tensor that can cancel to nearly
    0, so a tolerance relative to its own value would be meaningless.
  - In whole models every gradient inherits those differences through the backward pass.
    A parameter's gradient is a sum of ``n_p`` terms (a threshold's: one per element of
    the activation it quantizes; a conv or linear weight's and a bias's: one per output
    position, ``N · H_out · W_out``), so the two are compared within the float summation
    bound of :mod:`tests.numerics`, ``2 γ_{n_p} M`` with ``γ_n = n 2**-24 / (1 - n 2**-24)``
    and ``M`` the largest gradient of the same kind (the tensor's own largest entry; for
    thresholds, which can cancel to nearly 0, the largest threshold gradient of the
    model) (``_gradient_bounds``).
"""

from __future__ import annotations

import copy
import math

import brevitas.nn as qnn
import pytest
import torch
from brevitas.core.quant import RescalingIntQuant
from brevitas.inject.enum import BitWidthImplType
from brevitas.proxy.runtime_quant import FusedActivationQuantProxy
from brevitas.quant.scaled_int import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from torch import nn

from qtemperate import build_model, model_size, quantize, set_bit_width
from qtemperate.export import export_onnx
from qtemperate.quantization import (
    Int8ActPerTensorFloatStatefulBitWidth,
    Int8WeightPerChannelFloatStatefulBitWidth,
    Int8WeightPerTensorFloatStatefulBitWidth,
    Uint8ActPerTensorFloatStatefulBitWidth,
)
from qtemperate.quantization.fast import (
    FastRescalingIntQuant,
    _FusedReLUQuant,
    _mask_bounds,
    brevitas_reference,
    fake_quant,
    fake_quant_ste,
)
from tests.numerics import U32, rounding_bound

EPS32 = U32  # float32 unit roundoff


# -- the current (Brevitas) quantizers, built independently of qtemperate's presets ------
class RefInt8Act(Int8ActPerTensorFloat):
    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class RefUint8Act(Uint8ActPerTensorFloat):
    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class RefWeightPerChannel(Int8WeightPerChannelFloat):
    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


class RefWeightPerTensor(Int8WeightPerTensorFloat):
    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST


def _assert_input_grad(fast: torch.Tensor, ref: torch.Tensor, g: torch.Tensor) -> None:
    """``|Δ| <= 2**-22 |g|`` element-wise: ``g * m`` vs ``((g * s) * m) / s``."""
    assert ((fast - ref).abs() <= 4 * EPS32 * g.abs()).all()


def _threshold_oracle(
    x: torch.Tensor, s: torch.Tensor, g: torch.Tensor, lo: float, hi: float, relu: bool
) -> tuple[float, float]:
    """``dL/ds`` in float64 and the float32 summation bound ``n · eps · Σ|terms|``."""
    x64, s64, g64 = x.detach().double(), s.detach().double(), g.double()
    if relu:
        x64 = torch.relu(x64)
    v = x64 / s64
    r = torch.round(v)
    q = r.clamp(lo, hi)
    m = ((r >= lo) & (r <= hi)).double()
    if relu:
        m = m * (x64 > 0).double()
    terms = g64 * (q - m * v)
    mags = g64.abs() * (q.abs() + (m * v).abs())
    return float(terms.sum()), float(x.numel() * EPS32 * mags.sum())


def _to_brevitas(model: nn.Module) -> nn.Module:
    """A copy whose quantizers are Brevitas's own classes (what the presets used to build)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, FastRescalingIntQuant):
            m.__class__ = RescalingIntQuant
        elif isinstance(m, _FusedReLUQuant):
            m.__class__ = FusedActivationQuantProxy
    return ref


# -- closed forms -----------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lo,hi", [(-128, 127), (-127, 127), (0, 255), (-8, 7), (-7, 7), (0, 15), (-2, 1)])
def test_mask_bounds_select_exactly_the_values_that_round_into_range(lo: int, hi: int, dtype: torch.dtype) -> None:
    a, b = _mask_bounds(lo, hi, dtype)
    edges = [lo - 0.5, hi + 0.5, lo, hi, lo - 1.5, hi + 1.5, 0.0]
    v = torch.tensor(edges, dtype=dtype)
    near = torch.cat([v, torch.nextafter(v, v - 1), torch.nextafter(v, v + 1),
                      torch.linspace(lo - 3, hi + 3, 997, dtype=dtype)])
    r = torch.round(near)
    expected = ((r >= lo) & (r <= hi)).to(dtype)
    got = torch.ops.aten.hardtanh_backward(torch.ones_like(near), near, a, b)
    assert torch.equal(got, expected)


def test_half_precision_runs_brevitas_operations() -> None:
    """The mask bounds are exact in float32/float64 only: other dtypes take Brevitas's path."""
    q = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloatStatefulBitWidth, bit_width=8, return_quant_tensor=False)
    ref = qnn.QuantIdentity(act_quant=RefInt8Act, bit_width=8, return_quant_tensor=False)
    q, ref = q.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(q(x), ref(x))


@pytest.mark.numerics
@pytest.mark.parametrize("relu", [False, True])
def test_fake_quant_is_the_closed_form_and_its_gradients(relu: bool) -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 3).requires_grad_()
    s = torch.tensor(0.05, requires_grad=True)
    lo, hi = (0.0, 15.0) if relu else (-8.0, 7.0)
    y = fake_quant(x, s, lo, hi, relu=relu)
    xin = torch.relu(x) if relu else x
    v = xin.detach() / s.detach()
    q = torch.clamp(torch.round(v), lo, hi)
    assert torch.equal(y.detach(), q * s.detach())
    g = torch.randn_like(x)
    y.backward(g)
    m = ((torch.round(v) >= lo) & (torch.round(v) <= hi)).float()
    if relu:
        m = m * (x.detach() > 0).float()
    assert torch.equal(x.grad, g * m)
    exact, bound = _threshold_oracle(x, s, g, lo, hi, relu)  # a sum of 300 terms that cancel
    for grad in (s.grad, (g * (q - m * v)).sum()):  # fused, and the element-wise closed form
        assert abs(float(grad) - exact) <= bound, f"dL/ds {float(grad)} vs exact {exact}: > {bound:.3g}"


def test_fake_quant_ste_matches_brevitas_operations_bit_for_bit() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    s = (w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 7).requires_grad_()
    fake_quant_ste(w, s, -7.0, 7.0).backward(g := torch.randn_like(w))
    w2, s2 = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    # Brevitas's chain: x / s + 0, round (STE), clamp (STE), - 0, * s
    r = w2 / s2 + 0.0
    q = r + (torch.clamp(torch.round(r), -7, 7) - r).detach()
    ((q - 0.0) * s2).backward(g)
    assert torch.equal(w.grad, w2.grad) and torch.equal(s.grad, s2.grad)


# -- layers against independently built Brevitas layers -------------------------------
def _act_pair(fast_preset, ref_preset, bits: int, relu: bool) -> tuple[nn.Module, nn.Module]:
    cls = qnn.QuantReLU if relu else qnn.QuantIdentity
    fast = cls(act_quant=fast_preset, bit_width=bits, return_quant_tensor=False)
    ref = cls(act_quant=ref_preset, bit_width=bits, return_quant_tensor=False)
    return fast, ref


def _int_threshold(bits: int, signed: bool) -> float:
    return float(2 ** (bits - 1) if signed else 2**bits - 1)


@pytest.mark.numerics
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("calibrated", [True, False])
def test_activation_quantizer_outputs_and_gradients_match_brevitas(bits: int, relu: bool, calibrated: bool) -> None:
    from brevitas.graph.calibrate import calibration_mode

    fast_p, ref_p = (
        (Uint8ActPerTensorFloatStatefulBitWidth, RefUint8Act) if relu else (Int8ActPerTensorFloatStatefulBitWidth, RefInt8Act)
    )
    cls = qnn.QuantReLU if relu else qnn.QuantIdentity
    fast, ref = (cls(act_quant=p, bit_width=bits, return_quant_tensor=True) for p in (fast_p, ref_p))
    torch.manual_seed(1)
    if calibrated:  # the learned-threshold phase (what QAT runs after quantize(calibration_loader=...))
        calib = torch.randn(64, 8, 6, 6) * 2
        for m in (fast, ref):
            with torch.no_grad(), calibration_mode(m):
                m(calib)
    assert set(fast.state_dict()) == set(ref.state_dict())
    if calibrated:  # (an uncalibrated quantizer has no threshold in its state dict yet)
        ref.load_state_dict(fast.state_dict())
    lo, hi = (0.0, 2.0**bits - 1) if relu else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    for step in range(3):  # uncalibrated: Brevitas's statistics phase (scale from x), then learned
        x = (torch.randn(16, 8, 6, 6) * 3).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn(16, 8, 6, 6)
        y, y_ref = fast.train()(x), ref.train()(x_ref)
        assert torch.equal(y.value, y_ref.value), f"step {step}: outputs differ"
        assert torch.equal(y.scale, y_ref.scale)
        y.value.backward(g)
        y_ref.value.backward(g)
        _, bound_s = _threshold_oracle(x, y.scale, g, lo, hi, relu)
        if calibrated:
            _assert_input_grad(x.grad, x_ref.grad, g)
            t, t_ref = (m.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value for m in (fast, ref))
            exact_s, _ = _threshold_oracle(x, y.scale, g, lo, hi, relu)
            n_int = _int_threshold(bits, signed=not relu)
            for grad in (t.grad, t_ref.grad):  # both within float32 summation error of the truth
                assert abs(float(grad) - exact_s / n_int) <= bound_s / n_int + EPS32 * abs(exact_s / n_int)
            t.grad = t_ref.grad = None
        else:  # the scale is a statistic of x: its gradient reaches x at the percentile element(s)
            assert ((x.grad - x_ref.grad).abs() <= 4 * EPS32 * g.abs() + 2 * bound_s).all()
    if calibrated and relu:
        assert isinstance(fast.act_quant.fused_activation_quant_proxy, _FusedReLUQuant)
        assert fast.act_quant.fused_activation_quant_proxy.tensor_quant.can_fuse_relu()


@pytest.mark.numerics
def test_values_on_rounding_ties_and_range_edges_match_brevitas() -> None:
    """Inputs exactly at ``(k + 1/2) s`` and at the clamping edges, signed and unsigned."""
    for fast_p, ref_p, relu in ((Int8ActPerTensorFloatStatefulBitWidth, RefInt8Act, False),
                                (Uint8ActPerTensorFloatStatefulBitWidth, RefUint8Act, True)):
        cls = qnn.QuantReLU if relu else qnn.QuantIdentity
        fast, ref = (cls(act_quant=p, bit_width=4, return_quant_tensor=True) for p in (fast_p, ref_p))
        from brevitas.graph.calibrate import calibration_mode

        for m in (fast, ref):
            with torch.no_grad(), calibration_mode(m):
                m(torch.linspace(-8, 8, 1001))
        ref.load_state_dict(fast.state_dict())
        s = float(fast(torch.ones(1)).scale.detach())
        k = torch.arange(-20, 21, dtype=torch.float32)
        x = torch.cat([(k + 0.5) * s, k * s, torch.nextafter((k + 0.5) * s, torch.tensor(0.0))]).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = fast(x).value, ref(x_ref).value
        assert torch.equal(y, y_ref)
        g = torch.linspace(-1, 1, x.numel())
        y.backward(g)
        y_ref.backward(g)
        _assert_input_grad(x.grad, x_ref.grad, g)
        assert torch.equal(x.grad == 0, x_ref.grad == 0)  # the same mask


@pytest.mark.numerics
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_outputs_and_weight_threshold_input_gradients_match_brevitas(bits: int, per_channel: bool) -> None:
    wq = (Int8WeightPerChannelFloatStatefulBitWidth, RefWeightPerChannel) if per_channel else (
        Int8WeightPerTensorFloatStatefulBitWidth, RefWeightPerTensor)
    layers = [
        qnn.QuantConv2d(4, 6, 3, padding=1, bias=True, weight_quant=w, weight_bit_width=bits,
                        input_quant=a, input_bit_width=bits, return_quant_tensor=False)
        for w, a in zip(wq, (Int8ActPerTensorFloatStatefulBitWidth, RefInt8Act))
    ]
    fast, ref = layers
    torch.manual_seed(2)
    from brevitas.graph.calibrate import calibration_mode

    with torch.no_grad(), calibration_mode(fast):  # calibrate the input threshold
        fast(torch.randn(8, 4, 7, 7))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(8, 4, 7, 7).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fast.train()(x), ref.train()(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(fast.weight.grad, ref.weight.grad)  # STE weight path: bit-exact
    assert torch.equal(fast.bias.grad, ref.bias.grad)
    qin = fast.input_quant(x.detach())  # the quantized input and its scale, to get dL/d(quantized input)
    xq = qin.detach().requires_grad_() if isinstance(qin, torch.Tensor) else qin.value.detach().requires_grad_()
    w_q = fast.quant_weight().value.detach()
    b_q = fast.bias.detach()
    torch.nn.functional.conv2d(xq, w_q, b_q, padding=1).backward(g)
    _assert_input_grad(x.grad, x_ref.grad, xq.grad)
    t, t_ref = (m.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value for m in (fast, ref))
    s_in = t.detach() / 2 ** (bits - 1)
    exact_s, bound_s = _threshold_oracle(x, s_in, xq.grad, -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1, False)
    n_int = 2.0 ** (bits - 1)
    for grad in (t.grad, t_ref.grad):
        assert abs(float(grad) - exact_s / n_int) <= bound_s / n_int + EPS32 * abs(exact_s / n_int)


# -- whole models: the fused path against Brevitas's own operations on the same model ---
@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(32, 1, 12, 12, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def qmodels(calib: list[torch.Tensor]) -> dict[bool, nn.Module]:
    """Calibrated W8A8 ResNet-8s (width 8), per-channel and per-tensor weight scales."""
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1, width=8)
    return {pc: quantize(model, 8, 8, per_channel=pc, calibration_loader=calib, calibration_batches=2)
            for pc in (True, False)}


def _qmodel(qmodels: dict[bool, nn.Module], bits: int, per_channel: bool) -> nn.Module:
    q = copy.deepcopy(qmodels[per_channel])
    return set_bit_width(q, bits, bits) if bits != 8 else q


def _gradient_bounds(model: nn.Module, x: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, ``2 γ_{n_p} M``: how far two float32 backward passes may put its gradient.

    ``n_p`` (the terms summed into one entry): for a quantizer threshold, the elements of
    the activation(s) its proxy quantizes in one forward; for a weight or bias, the
    output positions of its layer (``numel / channels``). ``M``: the tensor's largest
    ``|gradient|``; for thresholds, the model's largest threshold gradient (a threshold
    gradient cancels to nearly 0, its own value is no magnitude of its terms).
    """
    terms: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (FusedActivationQuantProxy, _FusedReLUQuant)):
            continue
        if name.endswith(("act_quant", "input_quant")) and hasattr(m, "fused_activation_quant_proxy"):
            def count_in(mod, args, name=name):  # type: ignore[no-untyped-def]
                terms[name] = terms.get(name, 0) + sum(a.numel() for a in args if isinstance(a, torch.Tensor))
            hooks.append(m.register_forward_pre_hook(count_in))
        elif any(True for _ in m.parameters(recurse=False)):
            def count_out(mod, args, out, name=name):  # type: ignore[no-untyped-def]
                out = getattr(out, "value", out)
                terms[name] = out.numel() // out.shape[1]
            hooks.append(m.register_forward_hook(count_out))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    thresholds = [n for n in grads if n.endswith("scaling_impl.value")]
    t_scale = max(float(grads[n].abs().max()) for n in thresholds)
    bounds = {}
    for n, g in grads.items():
        if n in thresholds:
            owner, scale = n.split(".fused_activation_quant_proxy")[0], t_scale
        else:
            owner, scale = n.rsplit(".", 1)[0], float(g.abs().max())
        bounds[n] = rounding_bound(scale, terms[owner])
    return bounds


@pytest.mark.numerics
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_model_outputs_and_every_gradient_match_brevitas_operations(
    qmodels: dict[bool, nn.Module], bits: int, per_channel: bool
) -> None:
    q = _qmodel(qmodels, bits, per_channel).train()
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    y_fast = q(x)
    y_fast.square().sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in q.named_parameters()}
    q.zero_grad(set_to_none=True)
    with brevitas_reference():
        y_ref = q(x)
        y_ref.square().sum().backward()
    assert torch.equal(y_fast, y_ref)
    assert any(isinstance(m, _FusedReLUQuant) for m in q.modules())
    ref_grads = {n: p.grad for n, p in q.named_parameters()}
    assert any(n.endswith("scaling_impl.value") for n in ref_grads)
    bounds = _gradient_bounds(q.eval(), x, ref_grads)
    assert set(bounds) == set(fast_grads)
    worst = max(float((fast_grads[n] - g).abs().max()) / bounds[n] for n, g in ref_grads.items())
    print(f"W{bits} per_channel={per_channel}: worst |fast - ref| / (2 γ_n M) = {worst:.3g}")
    for n, g in ref_grads.items():
        assert fast_grads[n].shape == g.shape, n
        err = float((fast_grads[n] - g).abs().max())
        assert err <= bounds[n], f"dL/d{n}: max |fast - ref| = {err:.3g} > 2 γ_n M = {bounds[n]:.3g}"


def test_bit_width_changes_reach_the_fused_path(qmodels: dict[bool, nn.Module]) -> None:
    """``set_bit_width`` and loading a checkpoint of other bits change the integer grid."""
    q8 = _qmodel(qmodels, 8, True).eval()
    q4 = _qmodel(qmodels, 4, True).eval()
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        before = q8(x)
        q8.load_state_dict(q4.state_dict())  # 4-bit checkpoint into the 8-bit model
        after = q8(x)
        with brevitas_reference():
            expected = q8(x)
    assert torch.equal(after, expected) and not torch.equal(after, before)
    assert torch.equal(after, q4(x))


def test_onnx_export_and_model_size_are_unchanged(
    qmodels: dict[bool, nn.Module], calib: list[torch.Tensor], tmp_path
) -> None:
    q = _qmodel(qmodels, 4, True).eval()
    ref = _to_brevitas(q)
    assert not any(isinstance(m, FastRescalingIntQuant | _FusedReLUQuant) for m in ref.modules())
    assert list(q.state_dict()) == list(ref.state_dict())
    x = calib[0][:2]
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    a = export_onnx(q, tmp_path / "fast.onnx", x).read_bytes()
    b = export_onnx(ref, tmp_path / "brevitas.onnx", x).read_bytes()
    assert a == b
    assert model_size(q, x) == model_size(ref, x)


def test_uncalibrated_model_collects_statistics_of_relu_outputs() -> None:
    """Before its threshold is learned a QuantReLU is not fused (statistics of relu(x))."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    q = quantize(model, 8, 8).train()
    ref = _to_brevitas(q)
    x = torch.randn(8, 1, 12, 12)
    for _ in range(2):
        assert torch.equal(q(x), ref(x))
    tq = next(m for m in q.modules() if isinstance(m, _FusedReLUQuant)).tensor_quant
    assert not tq.can_fuse_relu()
    assert math.isfinite(float(tq.scaling_impl.buffer))


@pytest.mark.numerics
def test_channels_last_tensors_give_the_same_values_and_gradients() -> None:
    """NHWC activations (the trainer's CPU layout): same outputs, masks and gradients."""
    torch.manual_seed(5)
    x = (torch.randn(4, 6, 5, 5) * 3).requires_grad_()
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    s, s_cl = (torch.tensor(0.2, requires_grad=True) for _ in range(2))
    g = torch.randn(4, 6, 5, 5)
    y, y_cl = fake_quant(x, s, -8, 7), fake_quant(x_cl, s_cl, -8, 7)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, y_cl)
    y.backward(g)
    y_cl.backward(g.contiguous(memory_format=torch.channels_last))
    assert torch.equal(x.grad, x_cl.grad)
    exact, bound = _threshold_oracle(x, s, g, -8, 7, False)
    for grad in (s.grad, s_cl.grad):  # summed in another element order: float32 rounding only
        assert abs(float(grad) - exact) <= bound
