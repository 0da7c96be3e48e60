"""Small versions of the architectures users bring, written the way their authors write them.

Every model takes ``(N, 1, 8, 8)`` inputs (sklearn digits) and returns 10 logits. They use
the functional forms real code uses (``x + self.conv(x)``, ``F.adaptive_avg_pool2d``,
``torch.cat``, ``x * self.gate(s)``, ``F.interpolate``), so quantization has to find them
in the traced graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, ReLU6, 3x3 depthwise, ReLU6, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(cin, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2ish(nn.Module):
    """A MobileNetV2 in miniature: inverted residuals, ReLU6, depthwise convs."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(1, 2 * w, 3, 1, 1, bias=False),
                nn.BatchNorm2d(2 * w),
                nn.ReLU6(inplace=True),
            ),
            InvertedResidual(2 * w, w, 1, 1),
            InvertedResidual(w, 2 * w, 2, 4),
            InvertedResidual(2 * w, 2 * w, 1, 4),
            nn.Sequential(
                nn.Conv2d(2 * w, 8 * w, 1, bias=False),
                nn.BatchNorm2d(8 * w),
                nn.ReLU6(inplace=True),
            ),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: pool, reduce, SiLU, expand, gate, ``x * gate``."""

    def __init__(self, c: int, reduced: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * s


class MBConv(nn.Module):
    """EfficientNet block: expand, SiLU, depthwise, SiLU, squeeze-excitation, project, residual."""

    def __init__(self, c: int, expand: int, gate: type[nn.Module]) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU()
        )
        self.se = SqueezeExcite(h, max(1, c // 2), gate)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class EfficientNetish(nn.Module):
    """Stem, two MBConv blocks (Hardsigmoid and Sigmoid gates), Hardswish head, GELU/Tanh MLP."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU()
        )
        self.block1 = MBConv(w, 4, nn.Hardsigmoid)
        self.block2 = MBConv(w, 4, nn.Sigmoid)
        self.head = nn.Sequential(
            nn.Conv2d(w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w), nn.Hardswish()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(4 * w, 4 * w)
        self.fc2 = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block2(self.block1(self.stem(x))))
        x = torch.flatten(self.pool(x), 1)
        x = torch.tanh(F.gelu(self.fc1(x)))
        return self.fc2(x)


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DenseUNet(nn.Module):
    """U-Net encoder/decoder with a dense block: concatenations, max pool, upsampling."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1 = _cbr(1, w)
        self.enc2 = _cbr(w, 2 * w)
        self.dense1 = _cbr(2 * w, w)
        self.dense2 = _cbr(3 * w, w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = _cbr(4 * w + w, 2 * w)
        self.head = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        d = self.enc2(F.max_pool2d(s1, 2))
        d = torch.cat([d, self.dense1(d)], 1)  # dense connections
        d = torch.cat([d, self.dense2(d)], 1)
        u = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
        u = self.dec(torch.cat([self.up(F.max_pool2d(u, 2)), s1], dim=1))  # U-Net skip
        return self.head(u).mean((2, 3))


class GroupNormCNN(nn.Module):
    """Conv + GroupNorm + ReLU stacks (2 channels per group in the first), residual, pool, fc."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.gn1 = nn.GroupNorm(w // 2, w)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.gn2 = nn.GroupNorm(8, 2 * w)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.gn3 = nn.GroupNorm(8, 2 * w)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.gn1(self.conv1(x)))
        x = self.relu2(self.gn2(self.conv2(x)))
        x = self.relu3(self.gn3(self.conv3(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


class _Tokens(nn.Module):
    """Conv patch embedding to ``(N, L, C)`` tokens with a learned position embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).flatten(2).transpose(1, 2) + self.pos


class MHAClassifier(nn.Module):
    """Patch tokens, LayerNorm, ``nn.MultiheadAttention`` with a residual, mean over tokens."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.tokens = _Tokens(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        h = self.norm1(t)
        a, _ = self.attn(h, h, h, need_weights=False)
        t = t + a
        return self.fc(self.norm2(t).mean(1))


class HandAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v/proj Linears, heads from ``num_heads``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class HandAttentionClassifier(nn.Module):
    """Patch tokens, LayerNorm, hand-written attention with a residual, an MLP, mean over tokens."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.tokens = _Tokens(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return self.fc(t.mean(1))


class TransposedUNet(nn.Module):
    """A U-Net decoder that upsamples with a transposed convolution."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1 = _cbr(1, w)
        self.enc2 = _cbr(w, 2 * w)
        self.up = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec = _cbr(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        u = self.up(self.enc2(F.max_pool2d(s1, 2)))
        return self.head(self.dec(torch.cat([u, s1], 1))).mean((2, 3))


class FusedQKVAttention(nn.Module):
    """timm-style attention: one qkv Linear, indexing into q/k/v, the width captured as ``c``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class FusedQKVClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.tokens = _Tokens(dim)
        self.attn = FusedQKVAttention(dim, heads)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        return self.fc((t + self.attn(t)).mean(1))
