"""Tests for qtemperate.fx_graph: layers kept whole by class, outputs found without FX."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx, nn

from qtemperate.fx_graph import (
    LayerLeafTracer,
    flatten_outputs,
    output_layer_names,
    output_producers,
)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d)


class CastLinear(nn.Linear):
    """What timm's ``Linear`` does: an ``nn.Linear`` subclass calling ``F.linear`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = CastLinear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Branchy(Net):
    """Not FX-traceable: the branch depends on a tensor's value."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x)).mean((2, 3))
        if h.sum() > -1e9:
            h = h * 2
        return {"logits": self.fc(h), "features": h}


def test_a_linear_subclass_is_one_node_and_the_output_layer() -> None:
    default = [n.target for n in fx.symbolic_trace(Net()).graph.nodes if n.op == "call_module"]
    assert default == ["conv"]  # FX's own tracer steps inside CastLinear: the classifier is lost
    nodes = [n.target for n in LayerLeafTracer().trace(Net()).nodes if n.op == "call_module"]
    assert nodes == ["conv", "fc"]
    assert output_layer_names(Net(), _is_layer) == {"fc"}


def test_an_untraceable_model_is_walked_on_its_autograd_graph() -> None:
    model, x = Branchy(), torch.randn(2, 1, 6, 6)
    assert output_layer_names(model, _is_layer) is None  # no inputs: nothing to run
    assert output_producers(model, x, _is_layer) == {"output['logits']": {"fc"}, "output['features']": {"conv"}}
    assert output_layer_names(model, _is_layer, x) == {"fc", "conv"}


def test_a_frozen_model_is_walked_and_left_frozen() -> None:
    model = Net()
    model.requires_grad_(False)
    assert output_producers(model, torch.randn(1, 1, 6, 6), _is_layer) == {"output": {"fc"}}
    assert not any(p.requires_grad for p in model.parameters())


def test_flatten_outputs_names_every_tensor() -> None:
    class Pair(NamedTuple):
        a: torch.Tensor
        b: list[torch.Tensor]

    t = torch.zeros(1)
    out = {"x": (t, [t, "not a tensor"]), "y": Pair(t, [t])}
    assert [p for p, _ in flatten_outputs(out)] == [
        "output['x'][0]", "output['x'][1][0]", "output['y'].a", "output['y'].b[0]",
    ]
