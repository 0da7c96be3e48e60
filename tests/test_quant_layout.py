"""quant_layout: the bytes of quantize(model) read off the float model, against the quantized model.

Every check is ``layout.size(model, ...) == model_size(quantize(model, ...))`` on the whole
:class:`SizeReport` (bytes, params, per-layer bits), for the model zoo, a model holding every
module type the layout covers, and channel-pruned students (whose layout is the teacher's).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtemperate.models import ResidualAdd, build_model
from qtemperate.pruning import prune
from qtemperate.quant_layout import quant_layout
from qtemperate.quantization import ResidualAddMarker, quantize
from qtemperate.size import model_size

CONFIGS = [(8, 8, 8, True), (4, 4, 8, True), (4, 4, 4, False), (2, 3, 6, True)]


class MarkedAdd(ResidualAddMarker, nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class KitchenSink(nn.Module):
    """Every covered module type, folded and unfolded BatchNorms, a conv with two users."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Identity(), nn.Conv2d(1, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # two users: its BN is not folded
        self.bn_branch = nn.BatchNorm2d(8)
        self.add = ResidualAdd()
        self.marked = MarkedAdd()
        self.grouped = nn.Conv2d(8, 8, 1, groups=4)
        self.drop = nn.Dropout(0.1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(6)
        self.mp1d = nn.MaxPool1d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 12)
        self.bn_fc = nn.BatchNorm1d(12)  # after a linear: stays float
        self.head = nn.Linear(12, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b = self.branch(x)
        x = self.add(self.bn_branch(b), b)
        x = self.marked(x, self.grouped(self.drop(x)))
        x = self.avg(self.pool(x))
        s = x.flatten(2)  # (N, 8, HW)
        s = self.mp1d(self.bn1d(self.seq(s)))
        x = self.flat(self.gap(s.unsqueeze(-1)))
        return self.head(self.bn_fc(self.fc(x)))


class SharedReLU(nn.Module):
    """One ReLU module called after two convolutions; a linear reading a linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu, self.gap = nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.c2(self.relu(self.c1(x))))
        return self.fc2(self.fc1(self.gap(x).flatten(1)))


def _zoo() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [
        ("resnet20", build_model("resnet20", num_classes=10, in_channels=1)),
        ("resnet8", build_model("resnet8", num_classes=10, in_channels=1, width=16)),
        ("small_cnn", build_model("small_cnn", num_classes=10, in_channels=1, width=8)),
        ("kitchen_sink", KitchenSink()),
        ("shared_relu", SharedReLU()),
    ]


@pytest.mark.parametrize("name,model", _zoo(), ids=lambda v: v if isinstance(v, str) else "")
def test_layout_size_is_the_quantized_models_size(name: str, model: nn.Module) -> None:
    model.eval()
    model(torch.randn(2, 1, 16, 16))  # the model runs
    layout = quant_layout(model)
    assert layout is not None, name
    for wb, ab, fl, pc in CONFIGS:
        expected = model_size(quantize(model, wb, ab, first_last_bits=fl, per_channel=pc))
        assert layout.size(model, wb, ab, fl, pc) == expected, (name, wb, ab, fl, pc)


def test_resnet50_layout_matches_at_the_recipes_bits() -> None:
    model = build_model("resnet50", num_classes=1000, in_channels=3).eval()
    layout = quant_layout(model)
    assert layout is not None
    for wb, ab, fl, pc in [(4, 4, 8, True), (8, 8, 8, False)]:
        assert layout.size(model, wb, ab, fl, pc) == model_size(quantize(model, wb, ab, first_last_bits=fl, per_channel=pc))


def test_a_pruned_student_has_its_teachers_layout() -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, in_channels=1).eval()
    layout = quant_layout(teacher)
    student, _ = prune(teacher, torch.randn(1, 1, 28, 28), target_params_ratio=0.4, iterative_steps=1, round_to=8)
    for wb, ab, fl, pc in CONFIGS[:2]:
        assert layout.size(student, wb, ab, fl, pc) == model_size(quantize(student, wb, ab, first_last_bits=fl, per_channel=pc))


class _LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


@pytest.mark.parametrize(
    "model",
    [
        _LayerNormNet(),  # a parametrised layer the layout does not mirror
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()),  # a parameter-free layer quantize() might convert
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),  # quantize() refuses it
    ],
)
def test_modules_the_layout_does_not_mirror_give_no_layout(model: nn.Module) -> None:
    assert quant_layout(model) is None


def test_a_quantized_model_gives_no_layout() -> None:
    q = quantize(build_model("small_cnn", num_classes=10, in_channels=1, width=8), 8, 8)
    assert quant_layout(q) is None


class _Functional(SharedReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu(self.c2(self.relu(self.c1(x))))  # rewritten by quantize()
        return self.fc2(self.fc1(self.gap(x).flatten(1)))


def test_what_the_layout_does_not_mirror_gets_no_layout() -> None:
    """A functional op quantize() rewrites, an uncalled ReLU, an untraceable forward: no
    layout, so the planner counts bytes on the quantized model instead (never a guess)."""
    unused = SharedReLU()
    unused.spare = nn.ReLU()

    class Untraceable(SharedReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.c1(x)) if x.sum() > 0 else self.c1(x)  # data-dependent control flow
            return self.fc2(self.fc1(self.gap(self.relu(self.c2(x))).flatten(1)))

    for model in (_Functional(), unused, Untraceable()):
        assert quant_layout(model.eval()) is None, type(model).__name__
