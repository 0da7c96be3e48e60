"""Multi-head attention found in a model's module tree, so pruning removes whole heads.

timm, Hugging Face and most hand-written transformers keep the head count in an attribute
of the attention module and reshape with it (and with the head size) in ``forward``:

* timm ``Attention``: one fused ``qkv`` Linear of ``3 * attn_dim`` outputs, ``num_heads``,
  ``head_dim``, ``attn_dim = num_heads * head_dim``, ``scale = head_dim ** -0.5``, and
  ``F.scaled_dot_product_attention`` when ``fused_attn``;
* Hugging Face ``*SelfAttention``: separate ``query``/``key``/``value`` Linears,
  ``num_attention_heads``, ``attention_head_size`` and ``all_head_size``;
* hand-written blocks: ``q``/``k``/``v`` (or ``q_proj``/``k_proj``/``v_proj``, ``to_q`` ...)
  Linears with ``num_heads`` and ``head_dim``.

Removing whole heads keeps the head size ``d`` (so ``scale`` stays right) and changes the
count ``h -> h'``; every attribute the forward reads must follow: the count becomes ``h'``
and the attention width ``h * d`` becomes ``h' * d`` (:func:`write_head_count`).
``nn.MultiheadAttention`` is not listed: its attention width is its ``embed_dim``, the width
of its input and output too, so torch-pruning shrinks its head size instead, consistently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "AttentionHeads",
    "attention_like",
    "find_attention",
    "head_count",
    "write_head_count",
]

#: Attributes holding the head count, first match wins.
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
#: Attributes holding the head size: unchanged by whole-head pruning, checked for consistency.
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "dim_head", "d_head")
#: Attributes holding the attention width ``heads * head_dim``.
WIDTH_ATTRS = ("attn_dim", "all_head_size", "inner_dim")
#: Names of a fused q/k/v Linear (``3 * heads * head_dim`` outputs).
FUSED_QKV_NAMES = ("qkv", "in_proj", "c_attn", "qkv_proj", "Wqkv", "to_qkv")
#: Names of separate q, k, v Linears.
SEPARATE_QKV_NAMES = (
    ("q", "k", "v"),
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("to_q", "to_k", "to_v"),
    ("wq", "wk", "wv"),
)


@dataclass(frozen=True)
class AttentionHeads:
    """One attention module and the Linears whose outputs are its heads.

    Attributes:
        module: Qualified name of the attention module (``""`` for the model itself).
        layers: Qualified names of its q/k/v Linears, or of its one fused qkv Linear.
        heads: Head count ``h``.
        head_dim: Head size ``d``: ``out_features = h * d`` (``3 * h * d`` fused).
        found: Whether it was found in the module tree (else given by the user).
    """

    module: str
    layers: tuple[str, ...]
    heads: int
    head_dim: int
    found: bool = True


def head_count(module: nn.Module) -> int | None:
    """The module's head count: the first of :data:`HEAD_COUNT_ATTRS` that is an int >= 1."""
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _int_attrs(module: nn.Module, names: Iterable[str]) -> dict[str, int]:
    out = {}
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[attr] = value
    return out


def _qkv_children(module: nn.Module) -> tuple[tuple[str, ...], int] | None:
    """``(child names, attention width)`` of the module's q/k/v or fused qkv Linears."""
    children = dict(module.named_children())
    for name in FUSED_QKV_NAMES:
        layer = children.get(name)
        if isinstance(layer, nn.Linear) and layer.out_features % 3 == 0:
            return (name,), layer.out_features // 3
    for names in SEPARATE_QKV_NAMES:
        layers = [children.get(n) for n in names]
        if all(isinstance(m, nn.Linear) for m in layers):
            widths = {m.out_features for m in layers}  # type: ignore[union-attr]
            if len(widths) == 1:  # grouped-query attention (narrower k/v) is not followed
                return names, widths.pop()
    return None


def find_attention(model: nn.Module) -> list[AttentionHeads]:
    """Every attention module of ``model`` whose heads can be removed whole.

    A module qualifies when it has a head count ``h`` (:func:`head_count`), q/k/v Linears
    as direct children (a fused ``qkv``-named one, or a ``q``/``k``/``v``-named trio of equal
    widths; :data:`FUSED_QKV_NAMES`, :data:`SEPARATE_QKV_NAMES`) whose attention width ``w``
    splits into ``h`` heads of ``d = w / h``, and every head-size or width attribute it has
    agrees (``head_dim == d``, ``attn_dim == w``). A module where any of this fails is left
    out rather than guessed at.

    Args:
        model: The model (not modified).

    Returns:
        The attention modules in ``named_modules`` order.
    """
    out: list[AttentionHeads] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            continue
        h = head_count(module)
        qkv = _qkv_children(module) if h is not None else None
        if h is None or qkv is None:
            continue
        children, width = qkv
        if width % h:
            continue
        d = width // h
        if any(v != d for v in _int_attrs(module, HEAD_DIM_ATTRS).values()):
            continue
        if any(v != width for v in _int_attrs(module, WIDTH_ATTRS).values()):
            continue
        prefix = f"{name}." if name else ""
        out.append(AttentionHeads(name, tuple(prefix + c for c in children), h, d))
    return out


def attention_like(model: nn.Module) -> list[str]:
    """Names of modules that look like attention (a head count, or ``nn.MultiheadAttention``):
    whether advice about attention heads applies to this model at all."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) or head_count(m) is not None
    ]


def write_head_count(module: nn.Module, before: int, after: int, head_dim: int) -> list[str]:
    """Give an attention module its head count after whole heads were removed.

    Every attribute of :data:`HEAD_COUNT_ATTRS` equal to ``before`` becomes ``after``; every
    one of :data:`WIDTH_ATTRS` equal to ``before * head_dim`` becomes ``after * head_dim``.
    The head size, and so a ``scale = head_dim ** -0.5``, is unchanged.

    Args:
        module: The attention module (modified in place).
        before: Head count it holds now.
        after: Head count after pruning.
        head_dim: Head size ``d``.

    Returns:
        The names of the attributes changed.
    """
    if after == before:
        return []
    changed = []
    for attr, value in _int_attrs(module, HEAD_COUNT_ATTRS).items():
        if value == before:
            setattr(module, attr, after)
            changed.append(attr)
    for attr, value in _int_attrs(module, WIDTH_ATTRS).items():
        if value == before * head_dim:
            setattr(module, attr, after * head_dim)
            changed.append(attr)
    return changed
