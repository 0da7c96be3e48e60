"""The bit-width configuration of a quantized model and the role of each layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qtemperate.bits import check_bits

__all__ = ["INPUT_ACT_BITS", "ROLE_ATTR", "QuantConfig"]

INPUT_ACT_BITS = 8
"""Bit width of the model-input quantizer; it never changes with :func:`set_bit_width`."""

ROLE_ATTR = "qtemperate_role"
"""Attribute set on quantized layers: ``"first"``, ``"last"``, ``"first_last"`` or ``"inner"``."""


@dataclass(frozen=True)
class QuantConfig:
    """Bit-width configuration of a quantized model.

    Attributes:
        weight_bits: weight bit width of inner conv/linear layers (2..8).
        act_bits: activation bit width (ReLU, residual add, pool requant), 2..8.
        first_last_bits: weight bit width of the first and last conv/linear layers (2..8).
        per_channel: per-output-channel weight scales if True, else one per tensor.
        input_bits: bit width of the model-input quantizer (always 8).
        target: deployment target the model was trained for
            (:mod:`qtemperate.quantization.targets`), ``None`` when none was given.
    """

    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int = 8
    per_channel: bool = True
    input_bits: int = INPUT_ACT_BITS
    target: str | None = None

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_bits("first_last_bits", self.first_last_bits)
        _check_bits("input_bits", self.input_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logging)."""
        return asdict(self)


def _check_bits(name: str, value: int) -> None:
    check_bits(name, value, allow_float=False)

