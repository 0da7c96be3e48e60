"""Architectures as data: pruned models rebuilt from name + kwargs + shapes, loaded weights_only."""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from qtemperate.arch_spec import ArchSpec, ArchSpecError, build_architecture, describe_architecture
from qtemperate.models import build_model
from qtemperate.pruning import prune


def _round_trip(spec: ArchSpec, state: dict) -> tuple[ArchSpec, dict]:
    buf = io.BytesIO()
    torch.save({"arch": spec.to_dict(), "state": state}, buf)
    buf.seek(0)
    raw = torch.load(buf, weights_only=True)  # data only: no class is unpickled
    return ArchSpec.from_dict(raw["arch"]), raw["state"]


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [("small_cnn", {"num_classes": 10, "in_channels": 1, "width": 16}, (2, 1, 8, 8)),
     ("resnet20", {"num_classes": 10, "in_channels": 3}, (2, 3, 32, 32))],
)
def test_pruned_model_rebuilds_exactly(name: str, kwargs: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    pruned, _ = prune(build_model(name, **kwargs).eval(), x, target_params_ratio=0.4, iterative_steps=2)
    pruned.eval()
    spec, state = _round_trip(describe_architecture(pruned, name, kwargs), pruned.state_dict())
    rebuilt = build_architecture(spec, state).eval()
    assert [(n, tuple(p.shape)) for n, p in rebuilt.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in pruned.named_parameters()]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    # Pruning really changed widths, and the attributes followed.
    convs = [m for m in rebuilt.modules() if isinstance(m, nn.Conv2d)]
    assert any(m.out_channels != m2.out_channels for m, m2 in zip(
        convs, [m for m in build_model(name, **kwargs).modules() if isinstance(m, nn.Conv2d)]))
    assert all(m.weight.shape[0] == m.out_channels for m in convs)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "usernets_q10"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes=10, in_channels=1, hidden=12):
                super().__init__()
                self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
                self.bn = nn.BatchNorm2d(hidden)
                self.act = nn.ReLU()
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(hidden, num_classes)
                self.register_buffer("scale", torch.ones(3), persistent=False)

            def forward(self, x):
                y = self.act(self.bn(self.conv(x))) * self.scale.sum()
                return self.fc(self.pool(y).flatten(1))

        def make_net(**kwargs):
            return Net(**kwargs)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets_q10.nets:make_net"
    for mod in [m for m in sys.modules if m.startswith("usernets_q10")]:
        del sys.modules[mod]


def test_import_path_factory_and_non_persistent_buffers(user_package: str) -> None:
    kwargs = {"num_classes": 10, "in_channels": 1, "hidden": 12}
    model = build_model(user_package, **kwargs).eval()
    x = torch.randn(3, 1, 8, 8)
    pruned, _ = prune(model, x, target_params_ratio=0.5, iterative_steps=1)
    pruned.scale.mul_(torch.tensor([1.0, 2.0, 3.0]))  # a non-persistent buffer's value, not in state dicts
    spec, state = _round_trip(describe_architecture(pruned, user_package, kwargs), pruned.state_dict())
    rebuilt = build_architecture(spec, state).eval()
    assert rebuilt.conv.out_channels == pruned.conv.out_channels < 12
    assert torch.equal(rebuilt.scale, pruned.scale)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned.eval()(x))


def test_factory_that_builds_another_tree_is_named() -> None:
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 8}
    spec = describe_architecture(build_model("small_cnn", **kwargs), "small_cnn", kwargs)
    spec.modules["extra_head"] = "torch.nn.modules.linear.Linear"
    with pytest.raises(ArchSpecError, match=r"different module tree .*missing \['extra_head'\]"):
        build_architecture(spec)
    # Saving checks the factory rebuilds the model: a wrong name fails now, not when loading.
    with pytest.raises(ArchSpecError, match="different module tree"):
        describe_architecture(build_model("small_cnn", **kwargs), "resnet8", {"num_classes": 10, "in_channels": 1})


def test_unknown_model_and_bad_kwargs_are_errors() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    with pytest.raises(ArchSpecError, match=r"kwargs\.act is a type"):
        describe_architecture(model, "small_cnn", {"act": nn.ReLU})
    spec = describe_architecture(model, "small_cnn", {"num_classes": 10, "in_channels": 1, "width": 8})
    spec.model = "no_such_model_xyz"
    with pytest.raises(ArchSpecError, match="cannot build model 'no_such_model_xyz'"):
        build_architecture(spec)
    with pytest.raises(ArchSpecError, match="not a qtemperate architecture"):
        ArchSpec.from_dict({"format": "other"})


def test_a_file_cannot_add_attributes_or_touch_module_internals() -> None:
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 8}
    spec = describe_architecture(build_model("small_cnn", **kwargs), "small_cnn", kwargs)
    spec.attrs[""] = {"forward": "not a method", "_forward_hooks": {}, "training": False}
    spec.attrs["conv1"] = {**spec.attrs["conv1"], "padding_mode": "zeros", "new_attr": 1}
    model = build_architecture(spec)
    assert callable(model.forward) and model.training and not hasattr(model.conv1, "new_attr")
