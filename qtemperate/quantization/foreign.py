"""Brevitas models built by the user: which quantizer plays which role.

:func:`~qtemperate.quantization.quantize` tags every conv/linear it builds with its role
(``first``, ``last``, ``first_last``, ``inner``; :data:`ROLE_ATTR`). A model built from
stock ``brevitas.nn`` layers has no tags, so the same policy is derived from its graph:

* **model-input quantizers** — a quantizer module (``QuantIdentity`` ...) that reads the
  model input (possibly through Identity/Dropout/MaxPool/Flatten/reshape), or the
  ``input_quant`` of a weight layer that reads it — keep their bit width;
* **first** weight layers (reading the model input, possibly through a model-input
  quantizer) and the **last** weight layers (those producing a model output: every head
  of a multi-output model) keep theirs;
* every other weight layer is **inner** and every other activation quantizer an
  activation: :func:`~qtemperate.quantization.set_bit_width` switches those.

When the model is not FX-traceable, the first/last weight layers are the first/last in
registration order and a quantizer module registered before every weight layer is taken
as the model-input quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from qtemperate.quantization.config import ROLE_ATTR
from qtemperate.quantization.proxies import enabled_proxy

__all__ = ["LayerRoles", "layer_roles", "weight_layers"]

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd | nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv/linear layers whose weight a Brevitas quantizer quantizes, by name."""
    return {n: m for n, m in model.named_modules() if enabled_proxy(m, "weight_quant") is not None}


def _is_quantizer_module(m: nn.Module) -> bool:
    """A module whose job is to quantize its input (``QuantIdentity``-like, no weight)."""
    return enabled_proxy(m, "act_quant") is not None and not _is_weight_layer(m)


@dataclass
class LayerRoles:
    """The policy roles of a Brevitas model's quantizers.

    Attributes:
        roles: ``{weight layer: "first" | "last" | "first_last" | "inner"}``.
        input_quantizers: Names of quantizer modules that read the model input.
    """

    roles: dict[str, str] = field(default_factory=dict)
    input_quantizers: set[str] = field(default_factory=set)

    def role(self, name: str) -> str:
        return self.roles.get(name, "inner")

    def reads_model_input(self, name: str) -> bool:
        """Whether the ``input_quant`` of layer ``name`` quantizes the model input."""
        return self.role(name) in ("first", "first_last")


def _role(is_first: bool, is_last: bool) -> str:
    if is_first and is_last:
        return "first_last"
    return "first" if is_first else "last" if is_last else "inner"


def _graph_roles(model: nn.Module, gm: fx.GraphModule) -> tuple[set[str], set[str], set[str]]:
    from qtemperate.fx_graph import input_layers, output_layers

    modules = dict(model.named_modules())
    first, through = input_layers(
        gm, _is_weight_layer, lambda _n, m: _is_quantizer_module(m) or isinstance(m, _PASSTHROUGH))
    inputs = {str(n.target) for n in through if _is_quantizer_module(modules[str(n.target)])}
    ordered = [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and _is_weight_layer(modules.get(n.target, nn.Module()))
    ]
    last = output_layers(gm, _is_weight_layer) or ({ordered[-1]} if ordered else set())
    return first, last, inputs


def layer_roles(model: nn.Module) -> LayerRoles:
    """Roles of a Brevitas model's weight layers and input quantizers (see the module docstring).

    Layers tagged by :func:`~qtemperate.quantization.quantize` keep their tag; untagged
    ones get a role from the graph.
    """
    from qtemperate.quantization.graph import _trace

    layers = weight_layers(model)
    out = LayerRoles()
    untagged = {n for n, m in layers.items() if not hasattr(m, ROLE_ATTR)}
    for n, m in layers.items():
        if n not in untagged:
            out.roles[n] = getattr(m, ROLE_ATTR)
    tagged_model = bool(layers) and not untagged
    if tagged_model or not untagged:
        return out
    gm = _trace(model)
    first: set[str] = set()
    last: set[str] = set()
    if gm is not None:
        first, last, out.input_quantizers = _graph_roles(model, gm)
    if not first:
        names = [n for n, m in model.named_modules() if _is_weight_layer(m)]
        first, last = ({names[0]}, {names[-1]}) if names else (set(), set())
        for n, m in model.named_modules():
            if _is_weight_layer(m):
                break
            if _is_quantizer_module(m):
                out.input_quantizers.add(n)
                break
    for n in untagged:
        out.roles[n] = _role(n in first, n in last)
    return out
