"""Functional operations in a forward become modules (each then gets its own quantizer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from qtemperate.models import build_model
from qtemperate.quantization.functional import functional_to_modules
from qtemperate.quantization.ops import Add, Concat, Mean, Mul
from tests.quantization.architectures import (
    DenseUNet,
    EfficientNetish,
    GroupNormCNN,
    HandAttentionClassifier,
    MHAClassifier,
    MobileNetV2ish,
)


@pytest.mark.parametrize(
    "factory",
    [
        MobileNetV2ish,
        EfficientNetish,
        DenseUNet,
        GroupNormCNN,
        MHAClassifier,
        HandAttentionClassifier,
    ],
)
def test_rewrite_keeps_the_function(factory) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(4, 1, 8, 8)
    gm, changed = functional_to_modules(model)
    assert changed and isinstance(gm, fx.GraphModule)
    with torch.no_grad():
        assert torch.allclose(model(x), gm(x), atol=1e-6)


def test_new_modules_live_where_the_call_was_written() -> None:
    gm, _ = functional_to_modules(EfficientNetish().eval())
    names = dict(gm.named_modules())
    assert isinstance(names["block1.se.mul"], Mul)  # ``x * s`` in SqueezeExcite.forward
    assert isinstance(names["block1.add"], Add)  # ``x + self.project(...)`` in MBConv.forward
    assert isinstance(names["gelu"], nn.GELU) and isinstance(names["tanh"], nn.Tanh)
    dense, _ = functional_to_modules(DenseUNet().eval())
    kinds = [type(m) for m in dense.modules()]
    assert kinds.count(Concat) == 3 and kinds.count(Mean) == 1
    assert sum(isinstance(m, nn.Upsample) and m.mode == "bilinear" for m in dense.modules()) == 1


class _Arith(nn.Module):
    """Arithmetic on sizes and by constants is not an element-wise tensor op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] * 2
        y = self.act(self.fc(x)) * 0.5
        y = F.relu6(y + 1)
        return self.act(y.repeat(1, 1)[: n // 2])  # self.act used twice


def test_sizes_and_constants_stay_and_a_shared_activation_is_split() -> None:
    model = _Arith().eval()
    gm, changed = functional_to_modules(model)
    assert changed
    kinds = [type(m) for _, m in gm.named_modules()]
    assert Mul not in kinds and Add not in kinds  # ``* 0.5``, ``+ 1``, ``shape[0] * 2``
    assert kinds.count(nn.ReLU) == 2 and kinds.count(nn.ReLU6) == 1  # one ReLU per call site
    x = torch.randn(3, 4)
    assert torch.allclose(model(x), gm(x))


def test_models_without_functional_ops_are_returned_as_they_are() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    same, changed = functional_to_modules(model)
    assert same is model and not changed


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return F.relu6(self.fc(x))
        return self.fc(x)


def test_an_untraceable_model_is_returned_as_it_is() -> None:
    model = _Untraceable()
    same, changed = functional_to_modules(model)
    assert same is model and not changed
