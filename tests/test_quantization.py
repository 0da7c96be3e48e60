"""Tests for qtemperate.quantization: module replacement, BN folding, calibration, bit widths."""

from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtemperate.models import build_model
from qtemperate.quantization import (
    QuantAvgPoolRequant,
    QuantConfig,
    QuantResidualAdd,
    ResidualAddMarker,
    fold_batch_norms,
    get_bit_widths,
    get_quant_config,
    quantize,
    set_bit_width,
)
from tests.numerics import gamma, output_tolerance

torch.set_num_threads(1)


# --------------------------------------------------------------------------- fixtures
class ResidualAdd(nn.Module):
    """Local stand-in recognised by class name."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class MarkedAdd(ResidualAddMarker, nn.Module):
    """Recognised through the marker mixin."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class TinyResNet(nn.Module):
    def __init__(self, add: type[nn.Module] = ResidualAdd, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.add = add()
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(x)))))
        x = self.relu3(self.add(y, x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()




def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, seed: int):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y) - bs + 1, bs):
        idx = perm[i : i + bs]
        yield x[idx], y[idx]


def _train(model: nn.Module, x, y, steps: int, lr: float = 1e-2, seed: int = 0) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for xb, yb in _batches(x, y, 64, seed + epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    return losses


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return F.cross_entropy(model(x), y).item()


@pytest.fixture(scope="module")
def trained_float(digits) -> nn.Module:
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    _train(model, xtr, ytr, steps=150)
    return model.eval()


def _int_levels(layer: nn.Module) -> int:
    qw = layer.quant_weight()
    return int(torch.unique(torch.round(qw.value / qw.scale)).numel())


# --------------------------------------------------------------------------- structure
def test_layers_replaced_bn_folded_and_input_untouched() -> None:
    model = _randomize_bn(TinyResNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model)
    assert isinstance(q.conv1, qnn.QuantConv2d) and isinstance(q.conv3, qnn.QuantConv2d)
    assert isinstance(q.fc, qnn.QuantLinear)
    assert all(isinstance(getattr(q, f"relu{i}"), qnn.QuantReLU) for i in (1, 2, 3))
    assert isinstance(q.add, QuantResidualAdd)
    assert isinstance(q.pool, QuantAvgPoolRequant)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert all(q.get_submodule(f"conv{i}").bias is not None for i in (1, 2, 3))
    # the model input is quantized by the first conv only, at 8 bits
    assert q.conv1.input_quant.is_quant_enabled
    assert not q.conv2.input_quant.is_quant_enabled
    assert get_bit_widths(q)["conv1"]["input"] == 8
    assert q.eval()(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    # the original model is unchanged
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.conv1, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_marker_mixin_is_recognised_as_residual_add() -> None:
    q = quantize(_randomize_bn(TinyResNet(add=MarkedAdd)))
    assert isinstance(q.add, QuantResidualAdd)


def _assert_within_rounding(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``max |model(x) - ref| <= tol``."""
    err = float((model(x) - ref).abs().max())
    assert err <= tol, f"max |folded - unfolded| = {err:.3g} > {tol:.3g}"


@pytest.mark.numerics
def test_bn_folding_matches_float_model_exactly() -> None:
    model = _randomize_bn(TinyResNet())
    x = torch.randn(8, 1, 8, 8)
    ref = model(x)
    # folded vs conv + BatchNorm: the same reductions; the 4 roundings a folded weight and
    # bias carry (sqrt, divide, multiply, add) stand where the BatchNorm's 4 were, so both
    # are within γ_L max|y| of the exact value, L of the unfolded network (tests.numerics)
    tol = output_tolerance(model, x, ref)
    pairs = fold_batch_norms(model)
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _assert_within_rounding(model, x, ref, tol)


@pytest.mark.numerics
def test_bn_folding_falls_back_to_child_order_for_untraceable_models() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow defeats FX
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = _randomize_bn(Untraceable())
    x = torch.rand(2, 1, 5, 5)
    ref = model(x)
    tol = output_tolerance(model, x, ref)  # as in test_bn_folding_matches_float_model_exactly
    with pytest.warns(UserWarning, match="not FX-traceable"):
        fold_batch_norms(model)
    assert isinstance(model.bn, nn.Identity)
    _assert_within_rounding(model, x, ref, tol)


def test_first_last_layers_get_first_last_bits_and_per_tensor_option() -> None:
    q = quantize(
        _randomize_bn(TinyResNet()), weight_bits=4, act_bits=5, first_last_bits=6, per_channel=False
    )
    bits = get_bit_widths(q)
    assert bits["conv1"]["weight"] == 6 and bits["fc"]["weight"] == 6
    assert bits["conv2"]["weight"] == 4 and bits["conv3"]["weight"] == 4
    assert bits["relu1"]["act"] == 5 and bits["add.input_quant"]["act"] == 5
    assert bits["pool.requant"]["act"] == 5
    assert q.conv2.quant_weight().scale.numel() == 1
    assert get_quant_config(q) == QuantConfig(4, 5, 6, per_channel=False)


def test_residual_add_shares_one_quantizer_and_sum_is_on_its_grid() -> None:
    q = quantize(_randomize_bn(TinyResNet()), calibration_loader=[torch.randn(16, 1, 8, 8)])
    q.eval()
    add = q.add
    quantizers = [m for m in add.modules() if isinstance(m, qnn.QuantIdentity)]
    assert len(quantizers) == 1
    # add(y, x): y (conv3 output) is quantized; x (relu1 output) is already on its grid
    assert add.quantize_inputs == (True, False)
    a, b = torch.randn(2, 8, 4, 4), 3 * torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        scale = add.input_quant.act_quant.scale()
        k = (add(a, b) - b) / scale  # eval must not raise
        torch.testing.assert_close(k, torch.round(k), atol=1e-3, rtol=0)
        add.quantize_inputs = (True, True)  # both quantized: the sum is on the one grid
        k = add(a, b) / scale
    torch.testing.assert_close(k, torch.round(k), atol=1e-3, rtol=0)


@pytest.mark.parametrize("bad", [0, 1, 9, 16, 32, 2.5, True])
def test_bad_bits_raise_value_error(bad) -> None:
    model = TinyResNet()
    for kwargs in ({"weight_bits": bad}, {"act_bits": bad}, {"first_last_bits": bad}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            quantize(model, **kwargs)
    q = quantize(model)
    with pytest.raises(ValueError, match="weight_bits"):
        set_bit_width(q, bad, 4)
    with pytest.raises(ValueError, match="act_bits"):
        set_bit_width(q, 4, bad)


def test_32_bits_tells_to_skip_quantization_and_double_quantize_fails() -> None:
    with pytest.raises(ValueError, match="float"):
        quantize(TinyResNet(), weight_bits=32)
    q = quantize(TinyResNet())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q)
    with pytest.raises(ValueError, match="not quantized"):
        set_bit_width(TinyResNet(), 4, 4)


# --------------------------------------------------------------------------- real data
def test_calibrated_model_is_close_to_float_accuracy_before_training(digits, trained_float) -> None:
    xtr, _, xte, yte = digits
    float_acc = _accuracy(trained_float, xte, yte)
    assert float_acc > 0.85
    loader = [xtr[i : i + 64] for i in range(0, 512, 64)]
    q = quantize(trained_float, calibration_loader=loader, calibration_batches=8)
    q_acc = _accuracy(q, xte, yte)
    assert q_acc > 0.8  # chance is 0.1
    assert q_acc >= float_acc - 0.03


def test_qat_loss_drops_over_50_steps(digits) -> None:
    xtr, ytr, xte, yte = digits
    torch.manual_seed(1)
    float_model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    _train(float_model, xtr, ytr, steps=10)
    q = quantize(float_model, calibration_loader=[xtr[:256]], calibration_batches=1)
    before = _loss(q, xte, yte)
    losses = _train(q, xtr, ytr, steps=50, lr=5e-3)
    assert all(math.isfinite(v) for v in losses)
    assert _loss(q, xte, yte) < 0.7 * before
    assert sum(losses[-10:]) < sum(losses[:10])


def test_switch_to_4_bits_reduces_levels_keeps_training_and_round_trips(
    digits, trained_float
) -> None:
    xtr, ytr, xte, yte = digits
    q = quantize(trained_float, calibration_loader=[xtr[:256]], calibration_batches=1)
    inner = [
        n
        for n in ("conv2", "block.conv1", "block.conv2")
        if isinstance(q.get_submodule(n), qnn.QuantConv2d)
    ]
    assert len(inner) == 3
    assert all(_int_levels(q.get_submodule(n)) > 16 for n in inner)
    thresholds = {
        n: p.detach().clone()
        for n, p in q.named_parameters()
        if "act_quant" in n or "input_quant" in n
    }
    weights = {n: p.detach().clone() for n, p in q.named_parameters() if n.endswith("weight")}

    assert set_bit_width(q, 4, 4) is q
    # learned weights and activation thresholds are kept
    assert all(torch.equal(p, thresholds[n]) for n, p in q.named_parameters() if n in thresholds)
    assert all(torch.equal(p, weights[n]) for n, p in q.named_parameters() if n in weights)
    for n in inner:
        assert _int_levels(q.get_submodule(n)) <= 15  # narrow signed 4-bit: -7..7
    # first/last layer weights and the model input stay at 8 bits
    assert _int_levels(q.conv1) > 16 and _int_levels(q.fc) > 16
    bits = get_bit_widths(q)
    assert bits["conv1"] == {"weight": 8, "act": None, "input": 8}
    assert bits["fc"]["weight"] == 8 and bits["block.conv1"]["weight"] == 4
    assert bits["relu1"]["act"] == 4 and bits["block.add.input_quant"]["act"] == 4
    # a 4-bit unsigned ReLU output takes at most 16 values on its grid
    q.eval()
    with torch.no_grad():
        act = q.relu1(torch.randn(4096) * 3)
        scale = q.relu1.act_quant.scale()
    assert torch.unique(torch.round(act / scale)).numel() <= 16

    losses = _train(q, xtr, ytr, steps=50, lr=2e-3, seed=7)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert _accuracy(q, xte, yte) > 0.5

    # state_dict round trip: a fresh 8-bit quantized model becomes 4-bit on load
    fresh = quantize(trained_float)
    assert get_bit_widths(fresh)["block.conv1"]["weight"] == 8
    fresh.load_state_dict(q.state_dict())
    assert get_bit_widths(fresh) == get_bit_widths(q)
    assert get_quant_config(fresh) == QuantConfig(4, 4, 8)
    fresh.eval()
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(xte[:64]), q(xte[:64]))
    assert all(_int_levels(fresh.get_submodule(n)) <= 15 for n in inner)


@pytest.mark.numerics
def test_biases_are_rounded_to_the_int32_grid_of_the_export(digits, trained_float) -> None:
    """Forward uses s_b * round(b / s_b), s_b = s_x * s_w (what the ONNX int32 bias holds)."""
    import copy

    from qtemperate.quantization import QuantConv2d, quantize_bias

    xtr, _, _, _ = digits
    q = quantize(trained_float, calibration_loader=[xtr[:128]], calibration_batches=1).eval()
    set_bit_width(q, 4, 4)
    conv = q.block.conv2  # reads block.relu1
    assert isinstance(conv, QuantConv2d) and isinstance(conv, qnn.QuantConv2d)
    # no extra state: keys are those of the plain Brevitas model
    assert not any("scale_source" in k for k in q.state_dict())
    seen: dict[str, torch.Tensor] = {}
    q.block.relu1.act_quant.register_forward_hook(lambda m, i, o: seen.update(s_x=o.scale))
    conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        q(xtr[:16])
    qw = conv.quant_weight()
    s_b = (seen["s_x"] * qw.scale.reshape(-1)).reshape(-1)
    b_q = torch.round(conv.bias.double() / s_b.double()).float() * s_b
    assert not torch.equal(b_q, conv.bias)  # the float bias is off the grid
    expected = F.conv2d(seen["x"], qw.value, b_q, conv.stride, conv.padding)
    # one convolution, fan-in n = C_in k_h k_w (+1 bias): 2 γ_n Σ|terms| (tests.numerics)
    terms = F.conv2d(seen["x"].abs(), qw.value.abs(), b_q.abs(), conv.stride, conv.padding)
    n = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    assert ((seen["y"] - expected).abs() <= 2 * gamma(n) * terms).all()
    # straight-through: the gradient reaches the float bias unchanged
    b = conv.bias.detach().clone().requires_grad_(True)
    quantize_bias(b, seen["s_x"], qw.scale).sum().backward()
    assert torch.equal(b.grad, torch.ones_like(b))
    # a deep copy (and a fresh quantize + load_state_dict) computes the same
    with torch.no_grad():
        ref = q(xtr[:32])
        assert torch.equal(copy.deepcopy(q)(xtr[:32]), ref)
        q2 = quantize(trained_float)
        q2.load_state_dict(q.state_dict())
        assert torch.equal(q2.eval()(xtr[:32]), ref)


# --------------------------------------------------------------------------- residual adds from the graph
class _Plus(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ResidualAdd(nn.Module):  # the right name, the wrong graph: not an add
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class _TwoBranch(nn.Module):
    def __init__(self, join: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 1)
        self.join = join
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.join(self.a(x), self.b(x)), 1))


def test_residual_add_is_found_from_the_graph_not_the_class_name() -> None:
    from qtemperate.quantization import QuantResidualAdd

    q = quantize(_TwoBranch(_Plus()))
    assert isinstance(q.join, QuantResidualAdd)
    q2 = quantize(_TwoBranch(ResidualAdd()))
    assert not isinstance(q2.join, QuantResidualAdd)
    x = torch.randn(2, 1, 8, 8)
    assert q2(x).shape == (2, 3)
