"""Facts read off a float model's FX graph without Brevitas: which layers read the model's
input, which produce its outputs, and which modules are plain residual adds.

The first and last layers of the first/last bit policy are found one way for every caller: :func:`~qtemperate.quantization.quantize`, the roles of a user's
Brevitas model, the size planner's quantized layout, and pruning (output layers keep
their widths). Output layers are every conv/linear whose output reaches a model output
with no other such layer between — the classifier of a classifier, each head of a model
returning a dict or tuple; input layers are those the model input reaches through
operations that do not compute new values.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn

__all__ = ["forward_is_add", "input_layers", "output_layer_names", "output_layers"]

_ADD_TARGETS = (operator.add, torch.add)


def forward_is_add(module: nn.Module) -> bool:
    """Whether ``module``'s FX graph is ``output(add(input_0, input_1))``: a residual add."""
    try:
        nodes = list(fx.symbolic_trace(module).graph.nodes)
    except Exception:  # not traceable: not a plain add
        return False
    inputs = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op not in ("placeholder", "output")]
    outputs = [n for n in nodes if n.op == "output"]
    if len(inputs) != 2 or len(calls) != 1 or len(outputs) != 1:
        return False
    add = calls[0]
    return (
        add.op == "call_function" and add.target in _ADD_TARGETS and not add.kwargs
        and len(add.args) == 2 and set(add.args) == set(inputs) and outputs[0].args[0] is add
    )


def output_layers(gm: fx.GraphModule, is_layer: Callable[[nn.Module], bool]) -> set[str]:
    """Names of the layers whose outputs reach a model output with no such layer between.

    Walks back from the graph's output node (every entry of a dict/tuple output) through
    any operation that is not a layer (``is_layer``); each layer met ends its path. A
    detector's ``features``, ``logits`` and ``boxes`` heads are all output layers, and so
    are both convolutions of a residual sum the model returns; a classifier has one.

    Args:
        gm: The model traced with FX.
        is_layer: Whether a module is a (weight) layer.

    Returns:
        The qualified module names of the output layers.
    """
    modules = dict(gm.named_modules())
    out: set[str] = set()
    frontier = [n for n in gm.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set(frontier)
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            mod = modules.get(str(arg.target)) if arg.op == "call_module" else None
            if mod is not None and is_layer(mod):
                out.add(str(arg.target))
            else:
                frontier.append(arg)
    return out


def output_layer_names(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> set[str] | None:
    """:func:`output_layers` of ``model`` traced with FX; ``None`` when it is not traceable."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # not FX-traceable: the caller falls back to its own rule
        return None
    return output_layers(gm, is_layer)


def input_layers(
    gm: fx.GraphModule,
    is_layer: Callable[[nn.Module], bool],
    passes: Callable[[fx.Node, nn.Module], bool],
) -> tuple[set[str], list[fx.Node]]:
    """The layers the model input reaches, walking forward from every placeholder.

    The walk goes through function and method calls (reshapes, the input quantization of
    a user's model ...) except ``torch.add`` (a residual sum mixes in computed values) and
    through the modules ``passes`` accepts (Identity, Dropout, pooling, quantizers: the
    caller's list); each layer met ends its path.

    Args:
        gm: The model traced with FX.
        is_layer: Whether a module is a (weight) layer.
        passes: Whether the walk continues through ``(node, module)``.

    Returns:
        The qualified names of the input layers, and the module nodes walked through.
    """
    modules = dict(gm.named_modules())
    first: set[str] = set()
    through: list[fx.Node] = []
    frontier = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            mod = modules.get(str(user.target)) if user.op == "call_module" else None
            if mod is not None and is_layer(mod):
                first.add(str(user.target))
            elif mod is not None and passes(user, mod):
                through.append(user)
                frontier.append(user)
            elif mod is None and user.op in ("call_method", "call_function") and user.target not in (torch.add,):
                frontier.append(user)
    return first, through
