"""Which layers produce a model's outputs, read off its FX graph (no Brevitas needed).

Used by pruning (output layers keep their widths), by the size planner's quantized layout
and by :func:`~qtemperate.quantization.quantize` (output layers take ``first_last_bits``):
every conv/linear whose output reaches a model output with no other such layer between —
the classifier of a classifier, each head of a model returning a dict or tuple.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

__all__ = ["output_layer_names", "output_layers"]


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
