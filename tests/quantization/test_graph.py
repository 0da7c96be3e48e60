"""Output layers of multi-output models: every head keeps the first/last bit width.

A detector returning ``{"features", "logits", "boxes"}`` has three output layers; the
policy "first and last layers at ``first_last_bits``" must hold for each of them, for
models built by ``quantize``, stock Brevitas models and torch.ao FX-prepared models.
"""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
import torch.ao.quantization as tq
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
from torch import nn
from torch.ao.quantization import quantize_fx

from qtemperate.quantization import ROLE_ATTR, get_bit_widths, quantize, set_bit_width
from qtemperate.quantization.graph import _trace, output_layers

torch.set_num_threads(1)

HEADS = {"feat", "cls", "box"}


class Detector(nn.Module):
    """Backbone, then a feature head that the class and box heads read."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat = nn.Linear(16, 12)
        self.cls = nn.Linear(12, 5)
        self.box = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(torch.relu(self.c2(torch.relu(self.c1(x))))).flatten(1)
        f = torch.relu(self.feat(h))
        return {"features": f, "logits": self.cls(f), "boxes": self.box(f)}


class BrevitasDetector(nn.Module):
    """Stock Brevitas layers, two heads returned as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.qi = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat)
        self.c1 = qnn.QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFloat)
        self.r1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat)
        self.c2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFloat)
        self.r2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat)
        self.cls = qnn.QuantLinear(8, 5, bias=True, weight_quant=Int8WeightPerTensorFloat)
        self.box = qnn.QuantLinear(8, 4, bias=True, weight_quant=Int8WeightPerTensorFloat)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.r2(self.c2(self.r1(self.c1(self.qi(x))))).mean((2, 3))
        return self.cls(h), self.box(h)


def _weight_bits(model: nn.Module) -> dict[str, int | None]:
    return {n: b["weight"] for n, b in get_bit_widths(model).items() if b["weight"] is not None}


def test_output_layers_are_every_head_and_both_branches_of_a_returned_sum() -> None:
    gm = _trace(Detector())
    assert gm is not None
    assert output_layers(gm, lambda m: isinstance(m, nn.Linear | nn.Conv2d)) == HEADS

    class SumOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(1, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x))) + self.c(x)

    gm = _trace(SumOut())
    assert gm is not None
    assert output_layers(gm, lambda m: isinstance(m, nn.Conv2d)) == {"b", "c"}


def test_quantize_keeps_every_head_at_first_last_bits() -> None:
    q = quantize(Detector(), weight_bits=8, act_bits=8, first_last_bits=8)
    roles = {n: getattr(m, ROLE_ATTR) for n, m in q.named_modules() if hasattr(m, ROLE_ATTR)}
    assert roles == {"c1": "first", "c2": "inner", "feat": "last", "cls": "last", "box": "last"}
    set_bit_width(q, 4, 4)
    assert _weight_bits(q) == {"c1": 8, "c2": 4, "feat": 8, "cls": 8, "box": 8}


def test_stock_brevitas_heads_all_keep_their_bits() -> None:
    m = BrevitasDetector()
    set_bit_width(m, 4, 4)
    assert _weight_bits(m) == {"c1": 8, "c2": 4, "cls": 8, "box": 8}
    assert get_bit_widths(m)["qi"]["act"] == 8  # the model-input quantizer keeps its width


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_ao_fx_heads_all_keep_their_bits() -> None:
    x = torch.randn(2, 1, 8, 8)
    pm = quantize_fx.prepare_qat_fx(Detector().train(), tq.get_default_qat_qconfig_mapping("x86"), (x,))
    set_bit_width(pm, 4, 4)
    assert _weight_bits(pm) == {"c1": 8, "c2": 4, "feat": 8, "cls": 8, "box": 8}
