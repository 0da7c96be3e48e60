"""BatchNorm over the global batch of a data-parallel group, on any device.

With ``W`` processes each holding ``B/W`` samples of a step's global batch, plain
BatchNorm normalises every process's slice by its own statistics: the model then
computes something else than a single process with batch ``B`` would. Synchronised
BatchNorm normalises by the statistics of the whole global batch,

    μ = Σ_r Σ_i x_ri / N,   σ² = Σ_r Σ_i (x_ri − μ)² / N,   N = Σ_r n_r,

so forward, gradients and running statistics equal the single-process ones up to
floating-point summation order. ``torch.nn.SyncBatchNorm`` does this on GPUs only
(its fused kernels have no CPU implementation); :class:`GroupBatchNorm` does it with
autograd-aware all-reduces (whose backward sums the gradients of every rank: each
rank's statistics depend on every rank's samples), so gloo/CPU runs get the same
semantics.

:func:`convert_sync_batchnorm` swaps every BatchNorm for the device's synchronised
kind in place (sharing parameters and buffers, so optimizers and state dicts are
unaffected); :func:`revert_sync_batchnorm` puts the original classes back before
pruning, BN folding or export look for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GroupBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_ORIGINAL = "_qtemperate_bn_class"


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """``Σ_r t_r`` on every rank; the gradient of rank ``r``'s input is ``Σ_q g_q``
    (every rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)  # type: ignore[no-any-return]


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch.

    Two all-reduces per call (sums and count, then squared deviations: the two-pass
    variance, no cancellation). In eval mode, or without a process group of more
    than one process, it is exactly :class:`torch.nn.BatchNorm2d`'s computation.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _group_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()  # statistics in fp32 also under bf16 autocast
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.size(1)])
        sums = _all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return out.to(input.dtype)


def _swap(module: nn.Module, cls: type[nn.Module], **extra: object) -> nn.Module:
    new = cls(module.num_features, module.eps, module.momentum, module.affine,  # type: ignore[call-arg]
              module.track_running_stats, **extra)
    if module.affine:
        with torch.no_grad():
            new.weight = module.weight
            new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` by its synchronised kind, in place.

    CUDA gets :class:`torch.nn.SyncBatchNorm`, any other device :class:`GroupBatchNorm`.
    Parameters and buffers are shared with the originals. Returns ``module`` (or its
    replacement when ``module`` itself is a BatchNorm).
    """
    target: type[nn.Module] = nn.SyncBatchNorm if device.type == "cuda" else GroupBatchNorm

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm | GroupBatchNorm):
            new = _swap(m, target)
            setattr(new, _ORIGINAL, type(m))
            return new
        return None

    return _replace_modules(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (a no-op on a model without it)."""

    def revert(m: nn.Module) -> nn.Module | None:
        original = getattr(m, _ORIGINAL, None)
        return _swap(m, original) if original is not None else None

    return _replace_modules(module, revert)


def _replace_modules(module: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """``module`` with every submodule that ``replacement`` maps to a new module replaced in
    place (``None``: keep it and look inside); returns the replacement of ``module`` itself."""
    new = replacement(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _replace_modules(child, replacement)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
