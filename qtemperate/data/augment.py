"""Seeded augmentation on in-memory tensors: a pure function of ``(seed, epoch, index)``.

:class:`AugmentedTensorDataset` draws a random crop (after padding) and an optional
horizontal flip per sample from a generator seeded by :func:`epoch_seed`, so a run
resumed at epoch ``e`` sees exactly the samples an uninterrupted run would have
seen, whatever the worker count or batch order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["AugmentedTensorDataset", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for ``(seed, epoch)``: ``seed * 1000003 + epoch``."""
    return seed * 1000003 + epoch


class AugmentedTensorDataset(Dataset):
    """Random crop (with padding) and optional horizontal flip on in-memory tensors.

    The randomness of sample ``i`` is a pure function of ``(seed, epoch, i)``, so
    results do not depend on worker count, batch order or resumption. Padding uses
    the normalised value of a black pixel, like torchvision's zero padding before
    normalisation.

    The generator of sample ``i`` is seeded with
    ``(epoch_seed(seed, epoch) * 2654435761 + i) mod (2**63 - 1)`` and draws, in
    order, the crop offsets ``(dy, dx)`` in ``[0, 2 * pad]`` and a flip bit.

    Args:
        base: A :class:`TensorDataset` of normalised images ``(N, C, H, W)`` and labels.
        pad: Pixels of padding on each side before the random crop.
        hflip: Whether to flip horizontally with probability 1/2.
        seed: Base seed.
        pad_value: Per-channel fill value of the padding.
    """

    def __init__(
        self,
        base: TensorDataset,
        pad: int,
        hflip: bool,
        seed: int = 0,
        pad_value: Sequence[float] | None = None,
    ) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.base = base
        self.pad = pad
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        channels = base.tensors[0].shape[1]
        values = [0.0] * channels if pad_value is None else list(pad_value)
        if len(values) != channels:
            raise ValueError(f"pad_value has {len(values)} entries for {channels} channels")
        self._fill = torch.tensor(values, dtype=base.tensors[0].dtype).view(-1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        seed = (epoch_seed(self.seed, self.epoch) * 2654435761 + int(index)) % (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(0, 2 * self.pad + 1, (2,), generator=gen)
        flip = bool(torch.randint(0, 2, (1,), generator=gen).item()) and self.hflip
        if self.pad:
            c, h, w = x.shape
            canvas = self._fill.expand(c, h + 2 * self.pad, w + 2 * self.pad).clone()
            canvas[:, self.pad : self.pad + h, self.pad : self.pad + w] = x
            dy, dx = int(draws[0]), int(draws[1])
            x = canvas[:, dy : dy + h, dx : dx + w]
        if flip:
            x = x.flip(-1)
        return x.contiguous(), y
