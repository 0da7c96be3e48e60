"""Facts read off a float model's FX graph without Brevitas: which layers read the model's
input, which produce its outputs, and which modules are plain residual adds.

The first and last layers of the first/last bit policy are found one way for every caller: :func:`~qtemperate.quantization.quantize`, the roles of a user's
Brevitas model, the size planner's quantized layout, and pruning (output layers keep
their widths). Output layers are every conv/linear whose output reaches a model output
with no other such layer between — the classifier of a classifier, each head of a model
returning a dict or tuple; input layers are those the model input reaches through
operations that do not compute new values.

A layer is a layer by class, not by where the class is defined: :class:`LayerLeafTracer`
keeps every subclass of a torch layer (timm's ``Linear``, ``BatchNormAct2d``, Brevitas's
``QuantConv2d``) as one graph node, where FX's default tracer steps inside any module not
defined in ``torch.nn`` and so loses the classifier of a timm model. When FX cannot trace a
model at all, :func:`output_producers` reads the same fact off the autograd graph of one
forward pass through the real module tree.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "LayerLeafTracer",
    "call_model",
    "flatten_outputs",
    "forward_is_add",
    "input_layers",
    "output_layer_names",
    "output_layers",
    "output_producers",
]

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


#: Layer classes kept whole by :class:`LayerLeafTracer`, subclasses included.
LEAF_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.PReLU,
)


class LayerLeafTracer(fx.Tracer):
    """An FX tracer that keeps every subclass of a torch layer as one ``call_module`` node.

    FX's default tracer treats a module as a leaf only when its class is defined in
    ``torch.nn``; timm's ``Linear`` (an ``nn.Linear`` subclass that only adds a cast) is
    traced through, so its ``F.linear`` call appears instead of the module and the walks of
    this module miss the real classifier. Here ``isinstance`` decides: any module that is an
    instance of :data:`LEAF_LAYER_TYPES` stays whole, whatever package defines it.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_LAYER_TYPES) or super().is_leaf_module(m, module_qualified_name)


def flatten_outputs(obj: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    r"""Every tensor of a (nested) model output with its path: ``output``, ``output[0]``,
    ``output['logits']``, ``output.last_hidden_state`` (attribute outputs: dataclasses and
    ``NamedTuple``\ s). Non-tensor leaves are skipped."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten_outputs(v, f"{path}[{k!r}]")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for k in obj._fields:
            yield from flatten_outputs(getattr(obj, k), f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten_outputs(v, f"{path}[{i}]")
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from flatten_outputs(getattr(obj, k, None), f"{path}.{k}")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``
    (as torch-pruning calls a model with its example inputs)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def output_producers(
    model: nn.Module, example_inputs: Any, is_layer: Callable[[nn.Module], bool]
) -> dict[str, set[str]]:
    """For each output tensor of one forward pass, the layers whose outputs reach it with no
    other layer between, read off the autograd graph (no FX needed).

    A forward hook on every layer (``is_layer``) records the autograd node that produced its
    output; the walk goes back from each model output through ``next_functions`` and stops
    at a recorded node. Gradients are switched on for the pass (parameters temporarily
    require grad, so a frozen model is walked too); no backward runs and nothing is kept.

    Args:
        model: The model (its training flag and ``requires_grad`` flags are restored).
        example_inputs: A tensor, a tuple/list of positional inputs or a dict of keyword inputs.
        is_layer: Whether a module is a (weight) layer.

    Returns:
        ``{output path (as flatten_outputs names it): layer names}``; an output that no
        layer reaches (an input passed through) maps to an empty set.
    """
    producer: dict[Any, str] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _inp: Any, out: Any) -> None:
            for _, t in flatten_outputs(out):
                if t.grad_fn is not None:
                    producer.setdefault(t.grad_fn, name)
        return record

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and is_layer(m)]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = list(flatten_outputs(call_model(model, example_inputs)))
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    result: dict[str, set[str]] = {}
    for path, t in outputs:
        found: set[str] = set()
        frontier = [t.grad_fn] if t.grad_fn is not None else []
        seen = set(frontier)
        while frontier:
            fn = frontier.pop()
            if fn in producer:
                found.add(producer[fn])
                continue
            for nxt, _ in fn.next_functions:
                if nxt is not None and nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        result[path] = found
    return result


def output_layer_names(
    model: nn.Module, is_layer: Callable[[nn.Module], bool], example_inputs: Any = None
) -> set[str] | None:
    """:func:`output_layers` of ``model`` traced with :class:`LayerLeafTracer`.

    A model FX cannot trace is walked through the autograd graph of one forward pass on
    ``example_inputs`` (:func:`output_producers`, the real module tree); ``None`` when it
    is not traceable and no inputs are given, or the forward pass fails.
    """
    try:
        gm = fx.GraphModule(model, LayerLeafTracer().trace(model))
    except Exception:  # not FX-traceable: the autograd graph of a real forward pass
        if example_inputs is None:
            return None
        try:
            return set().union(*output_producers(model, example_inputs, is_layer).values())
        except Exception:  # the forward itself fails: the caller falls back to its own rule
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
