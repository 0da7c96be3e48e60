"""Bit-width facts, written once: the float sentinel, the quantized range and their checks.

A bit width is either :data:`FLOAT_BITS` (32: the layer or stage is not quantized) or an
integer in ``[MIN_BITS, MAX_BITS]`` (2..8). A stage is *quantized* when its weights or
its activations are (:func:`is_quantized`); recipes additionally require both to be
float or both quantized, which :func:`check_stage_bits` enforces.

Every module that validates or interprets bit widths (recipes, the joint scheduler,
quantization, sizes, the planner) imports these names instead of repeating them.
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "FLOAT_BITS",
    "MAX_BITS",
    "MIN_BITS",
    "QUANT_BITS",
    "check_bits",
    "check_stage_bits",
    "halvings",
    "is_quantized",
]

FLOAT_BITS = 32
"""The bit width that means "float" (not quantized)."""

MIN_BITS = 2
"""Smallest quantized bit width."""

MAX_BITS = 8
"""Largest quantized bit width."""

QUANT_BITS = range(MIN_BITS, MAX_BITS + 1)
"""The quantized bit widths, 2..8."""


def check_bits(name: str, value: object, allow_float: bool = True) -> int:
    """Validate one bit width and return it as an ``int``.

    Args:
        name: The field or argument name used in the error message.
        value: The bit width to check.
        allow_float: Accept :data:`FLOAT_BITS` (32) as "float".

    Returns:
        ``value`` as an ``int``.

    Raises:
        ValueError: for a non-integer (bools included) or a value outside
            ``2..8`` (or ``32`` when ``allow_float``), naming ``name``.
    """
    allowed = f"{MIN_BITS}..{MAX_BITS}" + (f" or {FLOAT_BITS} (float)" if allow_float else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    bits = int(value)
    if bits == FLOAT_BITS:
        if allow_float:
            return bits
        raise ValueError(
            f"{name}={FLOAT_BITS} means float: skip quantization for a float stage; "
            f"quantized bit widths are {MIN_BITS}..{MAX_BITS}"
        )
    if bits not in QUANT_BITS:
        raise ValueError(f"{name} must be {allowed}, got {bits}")
    return bits


def is_quantized(weight_bits: int, act_bits: int) -> bool:
    """The one definition of a quantized stage: weights or activations below float."""
    return weight_bits != FLOAT_BITS or act_bits != FLOAT_BITS


def check_stage_bits(weight_bits: object, act_bits: object) -> tuple[int, int]:
    """Validate a stage's ``(weight_bits, act_bits)``: both float or both 2..8.

    Raises:
        ValueError: naming the bad field, or the float/quantized mix.
    """
    w = check_bits("weight_bits", weight_bits)
    a = check_bits("act_bits", act_bits)
    if (w == FLOAT_BITS) != (a == FLOAT_BITS):
        raise ValueError(
            f"weight_bits and act_bits must both be {FLOAT_BITS} (float) or both "
            f"{MIN_BITS}..{MAX_BITS}, got {w} and {a}"
        )
    return w, a


def halvings(weight_bits: int, act_bits: int, reference_bits: int = FLOAT_BITS) -> float:
    """Halvings of precision of a stage: ``max(0, log2(reference / min(weight_bits, act_bits)))``.

    0 for float, 2 for W8A8, 3 for W4A4 (the joint scheduler's coupling variable).
    """
    return max(0.0, math.log2(reference_bits / min(weight_bits, act_bits)))
