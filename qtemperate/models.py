"""Model zoo: CIFAR ResNets, torchvision-compatible ImageNet ResNets and a tiny CNN.

Every model here is built so that the later stages of the pipeline can work on it
without special cases:

* every residual addition goes through a :class:`ResidualAdd` module, so the
  quantizer can swap it for an add that quantizes both inputs with one shared
  quantizer;
* every ReLU is its own :class:`torch.nn.ReLU` instance (no reused module, no
  functional ``relu``), so each activation can get its own quantizer;
* shortcuts that change shape are 1x1 conv + BatchNorm projections (never the
  zero-padding "option A" slicing shortcut), which torch-pruning's DepGraph can
  follow.

The ImageNet ``resnet18`` / ``resnet50`` use exactly torchvision's parameter and
buffer names and shapes, so a torchvision checkpoint loads with ``strict=True``
without torchvision being installed.

Names that are not registered are resolved as ``torchvision.models.<name>`` (when
torchvision is importable) or as a dotted import path ``pkg.module:factory`` /
``pkg.module.factory``; :func:`resolve_model` can search extra folders first (a
recipe's folder and the working directory, see
:func:`qtemperate.training.architecture.model_search_path`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from os import PathLike

import torch
from torch import nn

from qtemperate.registry import Registry

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "CifarBasicBlock",
    "CifarResNet",
    "ImageNetResNet",
    "ResidualAdd",
    "SmallCNN",
    "TinyDetector",
    "build_model",
    "list_models",
    "resolve_model",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class ResidualAdd(nn.Module):
    """Element-wise sum of a residual branch and its shortcut, as a module.

    Having the addition as a module lets the quantizer replace it with an add that
    quantizes both operands with one shared quantizer.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return ``a + b``."""
        return a + b


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut when the shape changes, else ``None`` (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, unit/zero affine for norms (torchvision's scheme)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut (torchvision ``BasicBlock`` parameter names).

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of the projection shortcut).
        downsample: Optional shortcut module (``None`` = identity).
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.add = ResidualAdd()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, identity))


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck, stride on the 3x3 conv (torchvision ResNet v1.5).

    Args:
        inplanes: Input channels.
        planes: Bottleneck width; the block outputs ``planes * 4`` channels.
        stride: Stride of ``conv2`` (and of the projection shortcut).
        downsample: Optional shortcut module (``None`` = identity).
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.add = ResidualAdd()
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.add(out, identity))


class CifarBasicBlock(BasicBlock):
    """CIFAR ResNet basic block: like :class:`BasicBlock` with a projection shortcut
    built automatically whenever the shape changes.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the first conv.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, stride, _projection(in_ch, out_ch, stride))


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2) with projection shortcuts.

    Three stages of ``width``, ``2 * width`` and ``4 * width`` channels with ``n``
    basic blocks each; global average pooling makes it input-size agnostic (28x28
    grayscale, 32x32 colour, ...).

    Args:
        n: Blocks per stage (3 -> ResNet-20, 5 -> ResNet-32, 9 -> ResNet-56).
        num_classes: Classifier outputs.
        in_channels: Input image channels.
        width: Channels of the first stage (16 in the paper).
    """

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        _check_positive(n=n, num_classes=num_classes, in_channels=in_channels, width=width)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Sequential] = []
        in_ch = width
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ImageNetResNet(nn.Module):
    """ImageNet ResNet with torchvision's exact parameter/buffer names and shapes.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: Classifier outputs.
        in_channels: Input image channels.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_weights(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        out_ch = planes * block.expansion
        mods = [block(self.inplanes, planes, stride, _projection(self.inplanes, out_ch, stride))]
        self.inplanes = out_ch
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """A tiny conv-bn-relu network with one residual block, for tests and quickstarts.

    ``stem (w) -> conv stride 2 (2w) -> residual block (2w) -> GAP -> linear``; works
    on any input of at least 2x2 pixels (8x8 digits, 28x28 Fashion-MNIST, ...).

    Args:
        num_classes: Classifier outputs.
        in_channels: Input image channels.
        width: Channels of the stem.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, 2 * width, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU(inplace=True)
        self.block = BasicBlock(2 * width, 2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.block(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyDetector(nn.Module):
    """A toy single-object detector with three heads, for multi-output pipelines.

    ``3 conv-bn-relu (strides 1, 2, 2) -> 3x3 adaptive avg pool -> flatten`` feeds three
    linear heads and :meth:`forward` returns ``{"features": (B, feature_dim),
    "logits": (B, num_classes), "boxes": (B, 4)}``: an embedding (distilled as a
    feature head), the class logits and the box ``(cx, cy, w, h)`` regressed in units
    of the image size. The 3x3 pool keeps coarse position, which the box head needs.

    Args:
        num_classes: Classes of the class head.
        in_channels: Input image channels.
        width: Channels of the first conv (then ``2 * width``).
        feature_dim: Width of the feature head.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 16, feature_dim: int = 32):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, 2 * width, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(2 * width, 2 * width, stride=2)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(3)
        flat = 2 * width * 9
        self.features = nn.Linear(flat, feature_dim)
        self.logits = nn.Linear(flat, num_classes)
        self.boxes = nn.Linear(flat, 4)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the ``features``, ``logits`` and ``boxes`` heads."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(self.pool(x), 1)
        return {"features": self.features(x), "logits": self.logits(x), "boxes": self.boxes(x)}


# ---------------------------------------------------------------------------
# Registered factories
# ---------------------------------------------------------------------------


@MODELS.register("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR-style ResNet-8 (1 block per stage, ~78 k params at width 16): the quickstart
    teacher — three resolutions deep, so it sees whole objects, yet cheap on a CPU."""
    return CifarResNet(1, num_classes, in_channels, width)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, ~0.27 M params at width 16)."""
    return CifarResNet(3, num_classes, in_channels, width)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage)."""
    return CifarResNet(5, num_classes, in_channels, width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage)."""
    return CifarResNet(9, num_classes, in_channels, width)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-18, torchvision-compatible state dict (11,689,512 params)."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-50 v1.5, torchvision-compatible state dict (25,557,032 params)."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallCNN:
    """Tiny residual CNN for tests and the quickstart."""
    return SmallCNN(num_classes, in_channels, width)


@MODELS.register("tiny_detector")
def tiny_detector(
    num_classes: int = 3, in_channels: int = 1, width: int = 16, feature_dim: int = 32
) -> TinyDetector:
    """Toy detector returning ``features``, ``logits`` and ``boxes`` heads (a dict)."""
    return TinyDetector(num_classes, in_channels, width, feature_dim)


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return MODELS.keys()


def _unknown(name: str, reason: str = "") -> KeyError:
    known = ", ".join(list_models())
    extra = f" ({reason})" if reason else ""
    return KeyError(f"unknown model {name!r}{extra}; known: {known}")


def _resolve_torchvision(attr: str) -> Callable[..., nn.Module] | None:
    try:
        models = importlib.import_module("torchvision.models")
    except Exception:  # not installed, or broken beside this torch
        return None
    factory = getattr(models, attr, None)
    return factory if callable(factory) else None


@contextmanager
def _searching(folders: Sequence[str | PathLike[str]]) -> Iterator[None]:
    """``folders`` in front of ``sys.path`` while importing (restored afterwards)."""
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()  # folders written after start-up (tests, notebooks)
    try:
        yield
    finally:
        for f in added:
            sys.path.remove(f)


def _resolve_import_path(
    name: str, search_path: Sequence[str | PathLike[str]] = ()
) -> Callable[..., nn.Module]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
    else:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise _unknown(name, "not an import path 'pkg.module:factory'")
    where = f"; searched {', '.join(str(f) for f in search_path)} and sys.path" if search_path else ""
    try:
        with _searching(search_path):
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _unknown(name, f"cannot import module {module_name!r}: {exc}{where}") from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _unknown(name, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _unknown(name, f"{name!r} is not callable")
    return obj


def resolve_model(
    name: str, search_path: Sequence[str | PathLike[str]] = ()
) -> Callable[..., nn.Module]:
    """The factory a model name stands for, without calling it.

    Resolution order: the :data:`MODELS` registry; ``torchvision.models.<name>`` (for
    names of that form, or bare names, when torchvision is importable); an import path
    ``pkg.module:factory`` or ``pkg.module.factory``, imported with the folders of
    ``search_path`` in front of ``sys.path``.

    Raises:
        ValueError: if ``name`` is not a non-empty string.
        KeyError: if ``name`` cannot be resolved; the message says why (unknown name
            listing the known ones, a module that cannot be imported and where it was
            searched, a missing attribute).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in MODELS:
        return MODELS.get(name)
    if name.startswith("torchvision.models."):
        tv_factory = _resolve_torchvision(name[len("torchvision.models.") :])
        if tv_factory is None:
            raise _unknown(name, "torchvision is not importable or has no such model")
        return tv_factory
    if "." not in name and ":" not in name:
        tv_factory = _resolve_torchvision(name)
        if tv_factory is None:
            raise _unknown(name)
        return tv_factory
    return _resolve_import_path(name, search_path)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by registered name, torchvision name or import path.

    Resolution order: the :data:`MODELS` registry; ``torchvision.models.<name>`` (for
    names of that form, or bare names, when torchvision is importable); an import
    path ``pkg.module:factory`` or ``pkg.module.factory``.

    Args:
        name: Model name, e.g. ``"resnet20"``, ``"torchvision.models.mobilenet_v2"``
            or ``"my_pkg.nets:make_net"``.
        **kwargs: Passed to the factory (``num_classes``, ``in_channels``, ...).

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: if ``name`` is not a non-empty string.
        KeyError: if ``name`` cannot be resolved; the message lists known names.
    """
    factory = resolve_model(name)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"name {name!r} resolved to a factory that returned {type(model)!r}")
    return model
