"""Functional operations in a forward become modules, so each can get its own quantizer.

``quantize`` replaces *modules*; a forward that calls ``F.relu6(x)``, ``torch.cat``,
``x * y`` or ``x + y`` has nothing to replace. :func:`functional_to_modules` traces the
model with ``torch.fx`` and rewrites such calls into modules:

* unary activations and pools (``F.relu``, ``F.relu6``, ``F.silu``, ``F.gelu``,
  ``F.hardswish``, ``F.hardsigmoid``, ``torch.sigmoid``, ``torch.tanh``, ``F.max_pool2d``,
  ``F.avg_pool2d``, ``F.adaptive_avg_pool2d`` ..., and the methods ``x.relu()``,
  ``x.sigmoid()``, ``x.tanh()``) with Brevitas's graph transforms
  (``brevitas.graph.base.FnToModule`` / ``MethodToModule``, the same machinery as
  ``brevitas.graph.standardize.TorchFunctionalToModule``);
* a stateless module called at several places (one ``self.relu`` reused) is duplicated
  (``brevitas.graph.standardize.DuplicateSharedStatelessModule``) so every call site has
  its own quantizer;
* ``a + b`` / ``a * b`` between two tensors, ``torch.cat``, ``x.mean(dim)`` and
  ``F.interpolate`` become :class:`~qtemperate.quantization.ops.Add`,
  :class:`~qtemperate.quantization.ops.Mul`, :class:`~qtemperate.quantization.ops.Concat`,
  :class:`~qtemperate.quantization.ops.Mean` and ``nn.Upsample``.

An addition or product involving a non-tensor (``x * 0.5``, ``x.shape[0] * 2``) is left
alone; the quantization report lists what stays float. The rewritten model is a
``torch.fx.GraphModule`` with the original submodule names; a model that needs no
rewrite is returned as is (its class preserved).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qtemperate.quantization.ops import Add, Concat, Mean, Mul

__all__ = ["FN_TO_MODULE", "METHOD_TO_MODULE", "functional_to_modules", "tensor_valued"]

FN_TO_MODULE: tuple[tuple[Any, type[nn.Module]], ...] = (
    (F.relu, nn.ReLU),
    (F.relu_, nn.ReLU),
    (torch.relu, nn.ReLU),
    (torch.relu_, nn.ReLU),
    (F.relu6, nn.ReLU6),
    (F.hardtanh, nn.Hardtanh),
    (F.leaky_relu, nn.LeakyReLU),
    (F.elu, nn.ELU),
    (F.silu, nn.SiLU),
    (F.mish, nn.Mish),
    (F.gelu, nn.GELU),
    (F.hardswish, nn.Hardswish),
    (F.hardsigmoid, nn.Hardsigmoid),
    (torch.sigmoid, nn.Sigmoid),
    (F.sigmoid, nn.Sigmoid),
    (torch.tanh, nn.Tanh),
    (F.tanh, nn.Tanh),
    (F.max_pool1d, nn.MaxPool1d),
    (F.max_pool2d, nn.MaxPool2d),
    (F.avg_pool1d, nn.AvgPool1d),
    (F.avg_pool2d, nn.AvgPool2d),
    (F.adaptive_avg_pool1d, nn.AdaptiveAvgPool1d),
    (F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d),
    (F.dropout, nn.Dropout),
)
"""Functions rewritten into modules (Brevitas ``FnToModule``)."""

METHOD_TO_MODULE: tuple[tuple[str, type[nn.Module]], ...] = (
    ("relu", nn.ReLU),
    ("relu_", nn.ReLU),
    ("sigmoid", nn.Sigmoid),
    ("tanh", nn.Tanh),
)
"""Tensor methods rewritten into modules (Brevitas ``MethodToModule``)."""

_ADD_FNS = (operator.add, operator.iadd, torch.add)
_MUL_FNS = (operator.mul, operator.imul, torch.mul)
_CAT_FNS = (torch.cat, torch.concat, torch.concatenate)
_NON_TENSOR_METHODS = {
    "size",
    "dim",
    "numel",
    "nelement",
    "ndimension",
    "item",
    "tolist",
    "__len__",
}
_NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


def tensor_valued(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Whether each node produces a tensor (False for shapes, sizes and arithmetic on them).

    Placeholders, parameters and module outputs are tensors; ``x.size()``, ``x.shape``,
    ``x.dim()`` and anything computed only from such values are not.
    """
    out: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op in ("placeholder", "get_attr", "call_module"):
            out[node] = True
        elif node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
            out[node] = False
        elif node.op == "call_function" and node.target is getattr:
            out[node] = not (len(node.args) > 1 and node.args[1] in _NON_TENSOR_ATTRS)
        elif node.op == "call_function" and node.target is len:
            out[node] = False
        elif node.op == "output":
            continue
        else:
            # a tensor op on at least one tensor gives a tensor; arithmetic on sizes does not
            out[node] = any(out.get(i, True) for i in inputs) if inputs else False
    return out


def _is_tensor_pair(node: fx.Node, tensors: dict[fx.Node, bool]) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    return (
        isinstance(a, fx.Node)
        and isinstance(b, fx.Node)
        and tensors.get(a, False)
        and tensors.get(b, False)
    )


def _binary_kind(node: fx.Node, tensors: dict[fx.Node, bool]) -> type[nn.Module] | None:
    if node.op == "call_function" and node.target in _ADD_FNS and _is_tensor_pair(node, tensors):
        return Add
    if node.op == "call_function" and node.target in _MUL_FNS and _is_tensor_pair(node, tensors):
        return Mul
    if (
        node.op == "call_method"
        and node.target in ("add", "add_")
        and _is_tensor_pair(node, tensors)
    ):
        return Add
    if (
        node.op == "call_method"
        and node.target in ("mul", "mul_")
        and _is_tensor_pair(node, tensors)
    ):
        return Mul
    return None


def _cat_args(node: fx.Node, tensors: dict[fx.Node, bool]) -> tuple[list[fx.Node], int] | None:
    if node.op != "call_function" or node.target not in _CAT_FNS:
        return None
    xs = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(xs, list | tuple) or not isinstance(dim, int):
        return None
    if not all(isinstance(x, fx.Node) and tensors.get(x, False) for x in xs):
        return None
    return list(xs), dim


def _mean_args(node: fx.Node) -> tuple[fx.Node, Any, bool] | None:
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return None
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    extra = set(node.kwargs) - {"dim", "keepdim"}
    if dim is None or extra or isinstance(dim, fx.Node) or not isinstance(keepdim, bool):
        return None
    return node.args[0], tuple(dim) if isinstance(dim, list) else dim, keepdim


def _interpolate_module(node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
    if node.op != "call_function" or node.target is not F.interpolate:
        return None
    names = (
        "input",
        "size",
        "scale_factor",
        "mode",
        "align_corners",
        "recompute_scale_factor",
        "antialias",
    )
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    x = bound.pop("input", None)
    if not isinstance(x, fx.Node) or bound.pop("antialias", False):
        return None
    if any(isinstance(v, fx.Node) for v in bound.values()):
        return None  # a size computed at run time
    return x, nn.Upsample(**bound)


def _shared_stateless(gm: fx.GraphModule) -> bool:
    counts: dict[str, int] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(node.target)
            if (
                mod is not None
                and next(mod.parameters(), None) is None
                and next(mod.buffers(), None) is None
            ):
                counts[node.target] = counts.get(node.target, 0) + 1
    return any(c > 1 for c in counts.values())


def _needs_rewrite(gm: fx.GraphModule) -> bool:
    tensors = tensor_valued(gm)
    fns = {fn for fn, _ in FN_TO_MODULE}
    methods = {m for m, _ in METHOD_TO_MODULE}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in fns:
            return True
        if node.op == "call_method" and node.target in methods:
            return True
        if _binary_kind(node, tensors) or _cat_args(node, tensors) or _mean_args(node):
            return True
        if _interpolate_module(node) is not None:
            return True
    return _shared_stateless(gm)


def _unique(gm: fx.GraphModule, base: str) -> str:
    names = dict(gm.named_modules())
    name, k = base, 0
    while name in names or hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
    name = _unique(gm, node.name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args=args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def functional_to_modules(model: nn.Module, traced: fx.GraphModule | None = None) -> tuple[nn.Module, bool]:
    """Rewrite the functional operations of ``model``'s forward into modules (module docstring).

    Args:
        model: A float model (modified only through the returned copy of its graph).
        traced: ``model`` already traced with :func:`~qtemperate.quantization.graph._trace`
            (saves a trace); traced here when None.

    Returns:
        ``(model, False)`` when nothing needs rewriting or the model is not FX-traceable,
        else ``(graph_module, True)``.
    """
    from qtemperate.quantization.graph import _trace

    gm = traced if traced is not None else _trace(model)
    if gm is None or not _needs_rewrite(gm):
        return model, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # brevitas.fx is deprecated: Brevitas's own warning
        from brevitas.graph.base import FnToModule, MethodToModule
        from brevitas.graph.standardize import DuplicateSharedStatelessModule

    class _FnToModule(FnToModule):
        def move_node_args_to_kwargs(self, node: fx.Node) -> None:
            super().move_node_args_to_kwargs(node)
            # builtins resolve through torch's testing signatures, which add ``out=None``
            if node.kwargs.get("out", 0) is None:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}

    before = set(gm._modules)
    gm = DuplicateSharedStatelessModule().apply(gm)
    for fn, cls in FN_TO_MODULE:
        gm = _FnToModule(fn, cls).apply(gm)
    for method, cls in METHOD_TO_MODULE:
        gm = MethodToModule(method, cls).apply(gm)
    tensors = tensor_valued(gm)
    for node in list(gm.graph.nodes):
        new: fx.Node | None = None
        kind = _binary_kind(node, tensors)
        cat = _cat_args(node, tensors)
        mean = _mean_args(node)
        interp = _interpolate_module(node)
        if kind is not None:
            new = _replace(gm, node, kind(), tuple(node.args))
        elif cat is not None:
            new = _replace(gm, node, Concat(cat[1]), tuple(cat[0]))
        elif mean is not None:
            new = _replace(gm, node, Mean(mean[1], mean[2]), (mean[0],))
        elif interp is not None:
            new = _replace(gm, node, interp[1], (interp[0],))
        if new is not None:
            tensors[new] = True
    created = set(gm._modules) - before
    _positional_inputs(gm, created)
    _move_into_owners(gm, created)
    gm.graph.lint()
    gm.recompile()
    return gm, True


def _positional_inputs(gm: fx.GraphModule, created: set[str]) -> None:
    """``module(input=x)`` (how ``FnToModule`` calls the new modules) becomes ``module(x)``."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in created and not node.args:
            kwargs = dict(node.kwargs)
            x = kwargs.pop("input", None)
            if isinstance(x, fx.Node):
                node.args, node.kwargs = (x,), kwargs


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _move_into_owners(gm: fx.GraphModule, created: set[str]) -> None:
    """Register each new module inside the module whose forward made the call.

    ``x * s`` written in ``block1.se.forward`` becomes ``block1.se.mul``, so the
    quantization report and ``state_dict`` keys name the op where it is written.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in created:
            continue
        owner = _owner_path(node)
        if not owner:
            continue
        try:
            parent = gm.get_submodule(owner)
        except AttributeError:
            # a parameter-free module the trace inlined: recreate it as a plain container
            gm.add_submodule(owner, nn.Module())
            parent = gm.get_submodule(owner)
        base, name, k = str(node.target), str(node.target), 0
        while name in parent._modules or hasattr(parent, name):
            k += 1
            name = f"{base}_{k}"
        parent.add_module(name, gm._modules.pop(base))
        node.target = f"{owner}.{name}"
