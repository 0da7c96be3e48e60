"""A small_cnn trained about a second on digits, float and calibrated 8-bit (shared by export tests).

The 8-bit model is quantized for the detected deployment target (``target="auto"``), so
the agreement tests check the property that holds on every CPU class: a student trained
for the CPU it runs on is exact in onnxruntime's deployed (optimized) session there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtemperate.models import build_model
from qtemperate.quantization import quantize


@pytest.fixture(scope="module")
def trained(digits) -> tuple[nn.Module, nn.Module]:  # type: ignore[no-untyped-def]
    """A small_cnn trained ~1 s on digits and its calibrated 8-bit quantization."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(120):
        idx = torch.randint(0, len(ytr), (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    q = quantize(
        model,
        calibration_loader=[xtr[i : i + 64] for i in range(0, 256, 64)],
        calibration_batches=4,
        target="auto",
    )
    return model, q.eval()
