"""torch.ao QAT models for the tests: a conv-bn-relu net prepared eagerly or with FX, trained on digits."""

from __future__ import annotations

import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import quantize_fx


class AoNet(nn.Module):
    """conv-bn-relu x2, pool, fc; QuantStub/DeQuantStub for the eager flow."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


def train_ao(model: nn.Module, digits, steps: int = 30, seed: int = 0) -> nn.Module:  # type: ignore[no-untyped-def]
    """``steps`` SGD steps on batches of 64 digits (seeded), in train mode."""
    xtr, ytr, _, _ = digits
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=torch.Generator().manual_seed(seed + step))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def prepared_ao(flow: str, digits) -> nn.Module:  # type: ignore[no-untyped-def]
    """AoNet prepared for QAT (``"eager"``: fused, ``prepare_qat``; ``"fx"``: ``prepare_qat_fx``)
    with the ``x86`` qconfig and trained 30 steps."""
    torch.manual_seed(0)
    m = AoNet().train()
    if flow == "eager":
        m.qconfig = tq.get_default_qat_qconfig("x86")
        tq.fuse_modules_qat(m, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]], inplace=True)
        return train_ao(tq.prepare_qat(m), digits)
    mapping = tq.get_default_qat_qconfig_mapping("x86")
    return train_ao(quantize_fx.prepare_qat_fx(m, mapping, (digits[0][:1],)), digits)
