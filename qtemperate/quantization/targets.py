"""The per-target range policy of a quantized model, and the target it carries.

A student is trained for a deployment target (:mod:`qtemperate.export.targets`): on a
target whose int8 kernels sum u8 x s8 pairs into int16 (``x86-avx2``, ``generic``) every
weight quantizer, first and last layers included, is capped at the target's
``max_weight_bits`` (7: weights in -63..63), so the exported graph is exact there;
activations keep their full 8-bit range. On ``x86-vnni`` and ``arm64`` nothing is capped.

The target travels with the model: :func:`attach_target` adds a parameter-free child
module, :class:`DeploymentTargetTag`, whose target is an int8 buffer in ``state_dict``, so a reloaded ``student.pt`` or training checkpoint knows its target and
:func:`~qtemperate.quantization.set_bit_width` keeps the cap (``set_bit_width(8)`` on an
``x86-avx2`` student gives 7-bit weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtemperate.export.targets import TARGETS, resolve_target

__all__ = [
    "TARGET_ATTR",
    "DeploymentTargetTag",
    "attach_target",
    "capped_weight_bits",
    "model_target",
    "resolve_target",
    "state_dict_target",
]

TARGET_ATTR = "qtemperate_target"
"""Name of the :class:`DeploymentTargetTag` child of a quantized model."""


_TARGET_CODES: dict[str | None, int] = {
    None: 0, "x86-avx2": 1, "x86-vnni": 2, "arm64": 3, "generic": 4,
}
"""File format of the tag's buffer: never renumber (saved checkpoints hold these codes)."""
_CODE_TARGETS = {v: k for k, v in _TARGET_CODES.items()}


class DeploymentTargetTag(nn.Module):
    """Holds the deployment target of a quantized model in its ``state_dict``.

    The target is a one-element int8 buffer (``code``; a tensor, so TorchScript tracing
    and ``torch.save(weights_only=True)`` handle it). It has no parameters; ``forward``
    is the identity, so a tag that ends up inside an ``nn.Sequential`` changes nothing.
    A ``state_dict`` without the entry (saved before targets existed) loads and leaves
    the target unchanged.

    Args:
        target: A target name (:data:`qtemperate.export.targets.TARGETS`) or ``None``.
    """

    def __init__(self, target: str | None = None) -> None:
        super().__init__()
        self.register_buffer("code", torch.tensor([_code(target)], dtype=torch.int8))

    @property
    def target(self) -> str | None:
        """The target name, ``None`` when none was given."""
        code = int(self.code.item())
        if code not in _CODE_TARGETS:
            raise ValueError(f"state_dict: unknown deployment target code {code}")
        return _CODE_TARGETS[code]

    @target.setter
    def target(self, target: str | None) -> None:
        self.code.fill_(_code(target))

    def forward(self, x: Any) -> Any:  # identity: see class docstring
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        if prefix + "code" not in state_dict:
            return  # a state_dict from before targets existed: keep the current target
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        _ = self.target  # an unknown code fails here, at load time

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


def _code(target: str | None) -> int:
    if target not in _TARGET_CODES:
        raise ValueError(f"target: unknown target {target!r}; allowed: {', '.join(TARGETS)}")
    return _TARGET_CODES[target]


def model_target(qmodel: nn.Module) -> str | None:
    """The deployment target a quantized model was trained for (``None``: none recorded)."""
    tag = getattr(qmodel, TARGET_ATTR, None)
    return tag.target if isinstance(tag, DeploymentTargetTag) else None


def attach_target(qmodel: nn.Module, target: str | None) -> None:
    """Record ``target`` (already resolved: no ``auto``) on ``qmodel``."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"target: unknown target {target!r}; allowed: {', '.join(TARGETS)}")
    tag = getattr(qmodel, TARGET_ATTR, None)
    if isinstance(tag, DeploymentTargetTag):
        tag.target = target
    else:
        setattr(qmodel, TARGET_ATTR, DeploymentTargetTag(target))


def capped_weight_bits(bits: int, target: str | None) -> int:
    """``min(bits, max_weight_bits of target)``; ``bits`` itself without a target."""
    if target is None:
        return bits
    return min(bits, TARGETS[target].max_weight_bits)


def state_dict_target(state_dict: dict[str, Any], default: str | None) -> str | None:
    """The target a saved ``state_dict`` was trained for, else ``default``.

    A resumed run keeps the target it was trained for: ``auto`` resolved again on
    another CPU class would otherwise rebuild the quantizers with that class's ranges
    while the loaded tag still names the old target (a student claiming 7-bit weights
    that holds 8-bit ones).

    Raises:
        ValueError: for a code no target has (a corrupt or newer file).
    """
    code = state_dict.get(f"{TARGET_ATTR}.code")
    if code is None:  # a float-stage checkpoint, or one saved before targets existed
        return default
    value = int(torch.as_tensor(code).reshape(-1)[0])
    if value not in _CODE_TARGETS:
        raise ValueError(f"state_dict: unknown deployment target code {value}")
    return _CODE_TARGETS[value]
