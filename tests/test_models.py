"""Tests for qtemperate.models: shapes, torchvision compatibility, quantizer-friendliness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtemperate.models import MODELS, ResidualAdd, build_model, list_models

# Independently known torchvision facts (published parameter counts; key shapes read
# off torchvision's ResNet definition).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.num_batches_tracked": (),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.bn3.running_var": (1024,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
RESNET18_KEYS = {
    "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer4.1.bn2.weight": (512,),
    "fc.weight": (1000, 512),
}
# state-dict entries: convs + 2 params and 3 buffers per BN + fc weight/bias.
# resnet50: 53 convs, 53 BNs -> 53 + 5 * 53 + 2 = 320; resnet18: 20 convs -> 122.
STATE_DICT_LEN = {"resnet18": 122, "resnet50": 320}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_matches_torchvision_layout(name: str) -> None:
    model = build_model(name)
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    assert len(sd) == STATE_DICT_LEN[name]
    for key, shape in (RESNET50_KEYS if name == "resnet50" else RESNET18_KEYS).items():
        assert tuple(sd[key].shape) == shape, key
    # A checkpoint in this layout loads strictly into a fresh model, giving the same function.
    fresh = build_model(name)
    fresh.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_resnet50_stride_on_conv2_v1_5() -> None:
    model = build_model("resnet50")
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("resnet20", (2, 1, 28, 28), {"in_channels": 1}),
        ("resnet20", (2, 3, 32, 32), {}),
        ("resnet32", (2, 3, 32, 32), {"width": 4}),
        ("resnet56", (2, 1, 28, 28), {"in_channels": 1, "width": 4, "num_classes": 7}),
        ("small_cnn", (2, 1, 8, 8), {}),
        ("small_cnn", (2, 3, 28, 28), {"in_channels": 3, "width": 8}),
        ("resnet18", (1, 1, 64, 64), {"in_channels": 1, "num_classes": 5}),
    ],
)
def test_output_shape(name: str, shape: tuple[int, ...], kwargs: dict) -> None:
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], kwargs.get("num_classes", 1000 if "18" in name else 10))


def test_cifar_resnet_structure() -> None:
    # ResNet-(6n+2): 6n 3x3 convs in blocks + stem conv; projections only at stage changes.
    for name, n in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
        model = build_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        three = [c for c in convs if c.kernel_size == (3, 3)]
        one = [c for c in convs if c.kernel_size == (1, 1)]
        assert len(three) == 6 * n + 1
        assert len(one) == 2
        assert [c.out_channels for c in one] == [32, 64]
        assert model.fc.in_features == 64
    # Independent count for ResNet-20 with projection shortcuts (w=16).
    stem = 3 * 16 * 9
    stage1 = 6 * 16 * 16 * 9
    stage2 = 16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32  # + 1x1 projection
    stage3 = 32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64
    bn_channels = 16 + 6 * 16 + 7 * 32 + 7 * 64  # stem, 6 per stage, projection BNs
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + 2 * bn_channels + fc
    assert expected == 272_474
    assert sum(p.numel() for p in build_model("resnet20").parameters()) == expected


@pytest.mark.parametrize(
    ("name", "blocks", "relus"),
    [
        ("resnet20", 9, 1 + 2 * 9),
        ("resnet50", 16, 1 + 3 * 16),
        ("small_cnn", 1, 4),
        ("resnet18", 8, 17),
    ],
)
def test_residual_adds_and_relus_are_distinct_modules(name: str, blocks: int, relus: int) -> None:
    model = build_model(name, **({"in_channels": 1} if name == "small_cnn" else {})).eval()
    adds = [m for m in model.modules() if isinstance(m, ResidualAdd)]
    relu_mods = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(adds) == blocks
    assert len(relu_mods) == relus
    assert len({id(m) for m in relu_mods}) == relus
    calls: dict[int, int] = {}

    def hook(mod: nn.Module, _inp: object, _out: object) -> None:
        calls[id(mod)] = calls.get(id(mod), 0) + 1

    for m in adds + relu_mods:
        m.register_forward_hook(hook)
    size = 8 if name == "small_cnn" else 32
    with torch.no_grad():
        model(torch.randn(1, 1 if name == "small_cnn" else 3, size, size))
    # each add and each ReLU module is used exactly once per forward (no reuse).
    assert all(calls.get(id(m)) == 1 for m in adds + relu_mods)


def test_residual_add_is_sum() -> None:
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ResidualAdd()(a, b), a + b)


def test_registry_and_import_paths() -> None:
    assert {"resnet18", "resnet20", "resnet32", "resnet50", "resnet56", "small_cnn"} <= set(
        list_models()
    )
    assert list_models() == sorted(MODELS.keys())
    lin = build_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (2, 3)
    assert isinstance(build_model("torch.nn.Identity"), nn.Identity)


@pytest.mark.parametrize("name", ["resnet_does_not_exist", "no_such_pkg.mod:f", "torch.nn:Nope"])
def test_unknown_model_lists_known_names(name: str) -> None:
    with pytest.raises(KeyError) as info:
        build_model(name)
    msg = str(info.value)
    assert name in msg and "resnet20" in msg and "small_cnn" in msg


def test_bad_kwargs() -> None:
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", num_classes=-1)
    with pytest.raises(ValueError, match="name"):
        build_model("")
