"""How each phase computes on its device: autocast dtype, memory format, host→device copies.

The recipe's ``precision`` section names a setting per phase — ``teacher`` (its
training and its logits for distillation), ``float_stage`` (student stages at 32 bits)
and ``qat`` (quantized stages) — each ``fp32``, ``bf16`` or ``auto``:

* ``bf16``: forward passes and losses run under :func:`torch.autocast` with
  bfloat16 (weights, optimizer state and gradients stay fp32; bf16 has fp32's
  exponent range, so no loss scaling is needed). On CPU this is supported but only
  fast on CPUs with AVX-512 BF16/AMX.
* ``auto``: ``bf16`` on a CUDA device that supports it, ``fp32`` anywhere else.
* ``fp32``: no autocast.

Defaults: ``teacher: auto``, ``float_stage: auto``, ``qat: fp32``. Brevitas QAT runs
under autocast (tested on CPU), but its fake-quantizers then see bf16 activations,
which moves values across quantization steps, so its logits are not the fp32 ones;
whether that pays is measured by ``bench/gpu_check.py`` (step time, top-1 agreement,
largest logit change) before it becomes a default. Evaluation always runs in fp32:
the accuracy reported is the fp32 model's, the model a user holds.

On CUDA, float models (the teacher, the float-stage student) run in ``channels_last``
memory format (NHWC is what tensor-core convolutions read); batches come from pinned
memory with non-blocking copies. Quantized models keep the default format (Brevitas
reshapes weights per output channel).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ComputePolicy", "amp_dtype", "policy_for"]


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device`` (``None``: fp32)."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {setting!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class ComputePolicy:
    """Device, autocast dtype and memory format of one model's training or inference.

    Attributes:
        device: Where the model and batches live.
        amp_dtype: Autocast dtype (``None``: fp32, no autocast).
        channels_last: Put the model and 4-D batches in NHWC memory format.
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def name(self) -> str:
        """``bf16`` or ``fp32`` (for logs)."""
        return "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.").replace("bfloat16", "bf16")

    def autocast(self) -> Any:
        """The autocast context of this policy (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device (non-blocking from pinned memory on CUDA), NHWC if asked."""
        non_blocking = self.device.type == "cuda"
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=non_blocking)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in this policy's memory format (in place; returned for chaining)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model


def policy_for(setting: str, device: torch.device, quantized: bool = False) -> ComputePolicy:
    """The policy of a phase: ``setting`` from the recipe's ``precision`` section.

    Args:
        setting: ``auto``, ``fp32`` or ``bf16``.
        device: The run's device.
        quantized: The model is a Brevitas QAT model (keeps the default memory format).
    """
    return ComputePolicy(device, amp_dtype(setting, device), channels_last=device.type == "cuda" and not quantized)
