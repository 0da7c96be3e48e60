"""Tests for qtemperate.pruning: budgets hit, channels really removed, BN re-estimation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from qtemperate.models import build_model
from qtemperate.pruning import (
    IMPORTANCES,
    PruneReport,
    count_params_macs,
    prune,
    pruning_plan,
    recalibrate_batchnorm,
)

TOL = 0.03


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _out_widths(model: nn.Module) -> dict[str, int]:
    """Independent walk: out channels of convs from the weight tensors themselves."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = m.weight.shape[0]
    return out


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Independent MAC count of convs + linears (dominant terms) via forward hooks."""
    total = 0

    def hook(m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.weight[0].numel()
        else:
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    with torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20")


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_resnet20_hits_target(resnet20: nn.Module, kind: str) -> None:
    x = torch.randn(1, 3, 32, 32)
    before_sd = {k: v.clone() for k, v in resnet20.state_dict().items()}
    kwargs = {f"target_{kind}_ratio": 0.5}
    assert resnet20.training
    pruned, report = prune(resnet20, x, **kwargs)
    assert pruned.training  # returned in the input's mode

    # The input model is untouched.
    assert all(torch.equal(v, resnet20.state_dict()[k]) for k, v in before_sd.items())
    assert _numel(resnet20) == report.params_before == 272_474

    # Budget hit, counted independently.
    params_ratio = _numel(pruned) / _numel(resnet20)
    macs_ratio = _conv_macs(pruned, x) / _conv_macs(resnet20, x)
    achieved = params_ratio if kind == "params" else macs_ratio
    assert abs(achieved - 0.5) <= TOL
    assert report.params_after == _numel(pruned)
    assert report.params_ratio == pytest.approx(params_ratio)
    assert report.macs_ratio == pytest.approx(macs_ratio, abs=0.01)  # BN/ReLU MACs aside
    assert report.achieved_ratio == (report.params_ratio if kind == "params" else report.macs_ratio)

    # Channels really removed; classifier keeps its outputs; forward works.
    before, after = _out_widths(resnet20), _out_widths(pruned)
    assert sum(after[n] < before[n] for n in before if n != "fc") == len(before) - 1
    assert after["fc"] == 10 and pruned.fc.out_features == 10
    assert pruned.fc.in_features == pruned.layer3[-1].conv2.out_channels < 64
    assert {n: (before[n], after[n]) for n in before} == report.layer_widths
    with torch.no_grad():
        assert pruned.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_widths_follow_uniform_channel_ratio(resnet20: nn.Module) -> None:
    # Local pruning at ratio r keeps int(n * (1 - r)) channels of every group,
    # whatever the importance criterion.
    x = torch.randn(1, 3, 32, 32)
    pruned, report = prune(resnet20, x, target_params_ratio=0.6, importance="l1")
    r = report.channel_ratio
    for name, (before, after) in report.layer_widths.items():
        if name != "fc":
            assert after == int(before * (1 - r)), name
    other, _ = prune(resnet20, x, target_params_ratio=0.6, importance="random")
    assert _out_widths(other) == _out_widths(pruned)


def test_max_layer_ratio_respected(resnet20: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    pruned, report = prune(resnet20, x, target_params_ratio=0.3, max_layer_ratio=0.5)
    assert abs(report.params_ratio - 0.3) <= TOL
    before, after = _out_widths(resnet20), _out_widths(pruned)
    for name in before:
        assert after[name] >= 0.5 * before[name], name
    # 0.3 of the params cannot be reached keeping >= 80 % of every layer.
    with pytest.raises(ValueError, match="unreachable"):
        prune(resnet20, x, target_params_ratio=0.3, max_layer_ratio=0.2)


def test_ignored_layers_keep_their_group(resnet20: nn.Module) -> None:
    # The stem's output feeds stage 1's residual adds: ignoring it keeps that group whole.
    x = torch.randn(1, 3, 32, 32)
    pruned, _ = prune(resnet20, x, target_params_ratio=0.7, ignored_layers=[resnet20.conv1])
    assert pruned.conv1.out_channels == 16
    assert all(b.conv2.out_channels == 16 for b in pruned.layer1)
    assert pruned.layer1[0].conv1.out_channels < 16  # inner block channels still pruned


def test_target_one_is_identity(resnet20: nn.Module) -> None:
    pruned, report = prune(resnet20, torch.randn(1, 3, 32, 32), target_macs_ratio=1.0)
    assert report.channel_ratio == 0.0 and report.params_after == report.params_before
    assert pruned is not resnet20


def test_resnet50_params_target_and_report() -> None:
    model = build_model("resnet50")
    x = torch.randn(1, 3, 224, 224)
    pruned, report = prune(model, x, target_params_ratio=0.9, iterative_steps=4)
    assert abs(_numel(pruned) / 25_557_032 - 0.9) <= TOL
    assert report.params_before == 25_557_032
    assert report.macs_before == pytest.approx(4.1e9, rel=0.02)  # ~4.1 GMACs, published
    assert pruned.fc.out_features == 1000
    assert pruned.layer4[-1].conv3.out_channels < 2048
    with torch.no_grad():
        assert pruned.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    d = report.to_dict()
    json.dumps(d)
    assert d["layer_widths"]["fc"] == [1000, 1000]
    assert d["params_after"] == _numel(pruned)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_bn_reestimation_recovers_accuracy_on_digits() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = build_model("small_cnn", in_channels=1, width=16)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(xtr), (64,))
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m.eval()(xte).argmax(1) == yte).float().mean().item()

    assert accuracy(model) > 0.9
    loader = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, 1280, 64)]
    plain, _ = prune(model, xtr[:1], target_params_ratio=0.5)
    calibrated, report = prune(model, xtr[:1], target_params_ratio=0.5, calibration_loader=loader)
    assert abs(report.params_ratio - 0.5) <= TOL
    acc_plain, acc_cal = accuracy(plain), accuracy(calibrated)
    assert acc_cal >= acc_plain
    assert acc_cal >= 0.5  # chance is 0.1


def test_recalibrate_batchnorm_closed_form() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(bn, nn.Dropout(0.5))
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(6)]
    used = recalibrate_batchnorm(model, [(b, 0) for b in batches], max_batches=5)
    assert used == 5
    data = torch.stack(batches[:5])  # (5, 4, 3, 5, 5)
    # Cumulative average of per-batch mean and unbiased variance.
    means = data.mean(dim=(1, 3, 4))
    vars_ = data.transpose(1, 2).reshape(5, 3, -1).var(dim=2, unbiased=True)
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, vars_.mean(0))
    assert bn.momentum == 0.1 and model.training  # restored
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_batchnorm(model, batches, max_batches=0)


def test_count_params_macs_closed_form() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    params, macs = count_params_macs(model, torch.randn(1, 2, 6, 6))
    assert params == 4 * 2 * 9 + 4 * 36 * 5 + 5
    assert macs == 4 * 36 * (2 * 9) + 4 * 36 * 5 + 5  # conv + linear (incl. bias adds)


def test_pruning_plan() -> None:
    assert pruning_plan(4, 0.4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert pruning_plan(1, 0.25) == [0.25]
    plan = pruning_plan(16, 0.37)
    assert len(plan) == 16 and plan[-1] == 0.37 and plan == sorted(plan)
    with pytest.raises(ValueError, match="steps"):
        pruning_plan(0, 0.5)
    with pytest.raises(ValueError, match="target"):
        pruning_plan(3, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_params_ratio": 0.5, "target_macs_ratio": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"target_params_ratio": 0.0}, "target_params_ratio"),
        ({"target_macs_ratio": 1.5}, "target_macs_ratio"),
        ({"target_params_ratio": -0.2}, "target_params_ratio"),
        ({"target_params_ratio": 0.5, "iterative_steps": 0}, "iterative_steps"),
        ({"target_params_ratio": 0.5, "max_layer_ratio": 0.0}, "max_layer_ratio"),
        ({"target_params_ratio": 0.5, "ignored_layers": [nn.Linear(2, 2)]}, "ignored_layers"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model = build_model("small_cnn", width=4)
    with pytest.raises(ValueError, match=match):
        prune(model, torch.randn(1, 1, 8, 8), **kwargs)


def test_unknown_importance_lists_known() -> None:
    model = build_model("small_cnn", width=4)
    with pytest.raises(KeyError) as info:
        prune(model, torch.randn(1, 1, 8, 8), target_params_ratio=0.5, importance="l3")
    msg = str(info.value)
    assert "importance" in msg and "'l3'" in msg
    assert all(k in msg for k in ("l1", "l2", "random"))
    assert {"l1", "l2", "random"} <= set(IMPORTANCES.keys())


def test_report_to_dict_roundtrip() -> None:
    model = build_model("small_cnn", width=8)
    _, report = prune(model, torch.randn(1, 1, 8, 8), target_params_ratio=0.6)
    d = report.to_dict()
    assert isinstance(report, PruneReport)
    assert set(d) >= {
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "params_ratio",
        "macs_ratio",
        "channel_ratio",
        "layer_widths",
    }
    assert d["params_ratio"] == pytest.approx(d["params_after"] / d["params_before"])
    assert d["macs_ratio"] == pytest.approx(d["macs_after"] / d["macs_before"])


@pytest.mark.filterwarnings("ignore:pruning reached")  # a coarse grid misses 0.5 by design
def test_round_to_keeps_channel_multiples() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    pruned, report = prune(model, x, target_params_ratio=0.5, round_to=8, iterative_steps=2)
    convs = [m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    kept = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    assert kept == pytest.approx(report.params_ratio) and kept < 0.75
    with pytest.raises(ValueError, match="round_to"):
        prune(model, x, target_params_ratio=0.5, round_to=0)


# --------------------------------------------------------------------------- GroupNorm, heads
def test_groupnorm_targets_that_torch_pruning_reaches_are_reached() -> None:
    """GroupNorm(8, 16) prunes group-wise: above ratio 0.5 torch-pruning would empty a group and
    skips it (kept fraction back to 1.0), which the search read as "unreachable"."""
    import torch_pruning as tp

    from tests.quantization.architectures import GroupNormCNN

    x = torch.randn(2, 1, 8, 8)
    model = GroupNormCNN().eval()
    pruned, report = prune(model, x, target_params_ratio=0.5)
    assert abs(report.params_ratio - 0.5) <= TOL
    assert report.params_ratio == pytest.approx(_numel(pruned) / _numel(model))
    assert pruned(x).shape == (2, 10)
    # the same channel ratio in plain torch-pruning gives the same model size
    plain = GroupNormCNN().eval()
    pr = tp.pruner.BasePruner(
        plain, x, importance=tp.importance.RandomImportance(), pruning_ratio=report.channel_ratio,
        max_pruning_ratio=0.9, ignored_layers=[plain.fc], in_channel_groups={}, out_channel_groups={},
    )
    pr.step()
    assert _numel(plain) == _numel(pruned)
    # each GroupNorm keeps whole positions of every group
    for gn in (pruned.gn1, pruned.gn2, pruned.gn3):
        assert gn.num_channels % gn.num_groups == 0


def test_a_groupnorm_with_one_channel_per_group_stays_whole_and_does_not_block() -> None:
    from tests.quantization.architectures import GroupNormCNN

    model = GroupNormCNN().eval()
    model.gn1 = nn.GroupNorm(16, 16)  # one channel per group: torch-pruning never prunes it
    pruned, report = prune(model, torch.randn(2, 1, 8, 8), target_params_ratio=0.65)
    assert pruned.conv1.out_channels == 16 and abs(report.params_ratio - 0.65) <= TOL


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")  # the position embedding
def test_hand_written_attention_loses_whole_heads() -> None:
    from tests.quantization.architectures import HandAttentionClassifier

    x = torch.randn(2, 1, 8, 8)
    model = HandAttentionClassifier().eval()
    a = model.attn
    _found, report_found = prune(model, x, target_params_ratio=0.6)  # q/k/v + num_heads: found
    pruned, report = prune(model, x, target_params_ratio=0.6, attention_heads={a.q: 4, a.k: 4, a.v: 4})
    assert report_found.heads == report.heads  # the same heads, given or found
    assert abs(report.params_ratio - 0.6) <= TOL
    heads = pruned.attn.num_heads
    assert report.heads == {"attn.q": (4, heads), "attn.k": (4, heads), "attn.v": (4, heads)}
    assert 1 <= heads < 4 and pruned.attn.head_dim == 8  # whole heads go, head size stays
    assert pruned.attn.q.out_features == heads * 8 == pruned.attn.proj.in_features
    assert pruned(x).shape == (2, 10)
    assert report.to_dict()["heads"]["attn.q"] == [4, heads]


def test_attention_heads_are_validated() -> None:
    from tests.quantization.architectures import HandAttentionClassifier, MHAClassifier

    model = HandAttentionClassifier().eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"attention_heads\[attn.q\].*dividing its 32"):
        prune(model, x, target_params_ratio=0.6, attention_heads={model.attn.q: 5})
    with pytest.raises(ValueError, match="not part of model"):
        prune(model, x, target_params_ratio=0.6, attention_heads={nn.Linear(4, 4): 2})
    mha = MHAClassifier().eval()
    with pytest.raises(ValueError, match=r"nn\.MultiheadAttention needs no entry"):
        prune(mha, x, target_params_ratio=0.6, attention_heads={mha.attn: 4})


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_attention_torch_pruning_cannot_follow_is_an_error_that_says_what_to_do() -> None:
    """The forward indexes qkv and reshapes with ``c`` from ``x.shape``: torch-pruning cannot
    follow it with its heads found or given; keeping the attention whole leaves nothing to
    prune (its projection writes the residual stream), and the error says all of that."""
    from tests.quantization.architectures import FusedQKVClassifier

    model = FusedQKVClassifier().eval()
    x = torch.randn(2, 1, 8, 8)
    for heads in (None, {model.attn.qkv: 4}):
        with pytest.raises(ValueError) as info:
            prune(model, x, target_params_ratio=0.8, attention_heads=heads)
        msg = str(info.value)
        assert "IndexError" in msg  # was a bare IndexError
        assert "with attn.qkv, attn.proj also in ignored_layers: it works, but the smallest kept fraction is 1.0000" in msg
        assert "split q/k/v with qkv.unbind(0)" in msg and "attention_heads={q_layer" not in msg


def test_every_output_head_of_a_multi_output_model_keeps_its_width() -> None:
    """A detector's feature head is read by the class/box heads, yet it is an output too."""

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 32, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.feat = nn.Linear(32, 24)
            self.cls = nn.Linear(24, 5)
            self.box = nn.Linear(24, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.pool(torch.relu(self.c2(torch.relu(self.c1(x))))).flatten(1)
            f = torch.relu(self.feat(h))
            return {"features": f, "logits": self.cls(f), "boxes": self.box(f)}

    torch.manual_seed(0)
    model, x = Detector(), torch.randn(2, 1, 8, 8)
    before = {k: v.shape for k, v in model(x).items()}
    pruned, _ = prune(model, x, target_params_ratio=0.6)
    assert {k: v.shape for k, v in pruned(x).items()} == before
    assert (pruned.feat.weight.shape, pruned.cls.weight.shape[0], pruned.box.weight.shape[0]) == (
        torch.Size([24, pruned.c2.weight.shape[0]]), 5, 4,
    )
    assert pruned.c2.weight.shape[0] < 32  # the budget is met by the backbone
    assert abs(_numel(pruned) / _numel(model) - 0.6) <= TOL


# --------------------------------------------------------------------------- outputs kept
@pytest.mark.filterwarnings("ignore:torch-pruning could not prune")  # 16 steps on the head: 1 step
def test_outputs_that_would_change_are_refused_naming_the_output_and_the_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the tracer finds, the pruned model's outputs are compared with the input model's."""
    import qtemperate.pruning as pruning

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 32)
            self.cls = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            h = torch.relu(self.body(x))
            return h.mean(1), {"logits": self.cls(h)}

    monkeypatch.setattr(pruning, "_output_layer_names", lambda model, inputs: [])  # a tracer that misses
    torch.manual_seed(0)
    with pytest.raises(ValueError) as info:
        prune(TwoHeads(), torch.randn(4, 16), target_params_ratio=0.7)
    msg = str(info.value)
    assert "output[1]['logits'] from shape (4, 10) to (4, " in msg
    assert "it comes from cls (out width 10 -> " in msg and "Put cls in ignored_layers" in msg


def test_output_layers_are_found_inside_linear_subclasses() -> None:
    """timm's ``Linear`` subclasses ``nn.Linear`` outside ``torch.nn``: FX's default tracer
    steps inside it and loses the classifier; the classifier keeps its width."""

    class CastLinear(nn.Linear):  # what timm.layers.Linear does
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), CastLinear(32, 10))
    torch.manual_seed(0)
    pruned, report = prune(model, torch.randn(2, 1, 8, 8), target_params_ratio=0.5)
    assert report.layer_widths["6"] == (10, 10) and report.layer_widths["2"][1] < 32
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# --------------------------------------------------------------------------- torch-pruning fails
class _SplitMix(nn.Module):
    """MixNet's mixed depthwise conv: a split with sizes fixed at construction."""

    def __init__(self, tail: bool) -> None:
        super().__init__()
        self.pw = nn.Conv2d(1, 16, 1)
        self.splits = [8, 8]
        self.a = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.tail = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()) if tail else nn.Identity()
        self.fc = nn.Linear(32 if tail else 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa, xb = torch.split(torch.relu(self.pw(x)), self.splits, 1)
        return self.fc(self.tail(torch.cat([self.a(xa), self.b(xb)], 1)).mean((2, 3)))


def test_layers_whose_pruning_breaks_the_forward_are_found_and_kept() -> None:
    torch.manual_seed(0)
    model, x = _SplitMix(tail=True).eval(), torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"also in ignored_layers \(pruning them breaks the forward; found by trying"):
        pruned, report = prune(model, x, target_params_ratio=0.6)
    # the split's input keeps its 16 channels: its group (pw, a, b) is left whole
    assert report.layer_widths["pw"] == (16, 16) and report.layer_widths["tail.0"][1] < 32
    assert abs(report.params_ratio - 0.6) <= TOL and pruned(x).shape == (2, 10)


def test_what_was_tried_is_said_and_attention_advice_only_for_attention() -> None:
    model, x = _SplitMix(tail=False).eval(), torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError) as info:
        prune(model, x, target_params_ratio=0.6, iterative_steps=4)
    msg = str(info.value)
    assert "Tried with iterative_steps=4: torch-pruning failed (IndexError" in msg
    assert "in 1 step: the pruned model's forward fails (RuntimeError: split_with_sizes" in msg
    assert "also in ignored_layers: it works, but the smallest kept fraction is 1.0000" in msg
    assert msg.endswith("Add the layers whose width must not change to ignored_layers")
    assert "attention" not in msg.lower()  # no heads here: no advice about them


def test_a_model_torch_pruning_finishes_only_in_one_step_is_pruned_in_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_pruning as tp

    step = tp.pruner.BasePruner.step

    def fails_after_the_first_step(self: tp.pruner.BasePruner, interactive: bool = False) -> object:
        if self.current_step >= 1 and not interactive:
            raise IndexError("index 706 is out of bounds for dimension 0 with size 706")
        return step(self, interactive)

    monkeypatch.setattr(tp.pruner.BasePruner, "step", fails_after_the_first_step)
    model, x = build_model("small_cnn", width=8), torch.randn(1, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"with iterative_steps=4 \(torch-pruning failed \(IndexError.*pruned in 1 step instead"):
        _pruned, report = prune(model, x, target_params_ratio=0.6, iterative_steps=4)
    assert report.iterative_steps == 1 and abs(report.params_ratio - 0.6) <= TOL


# --------------------------------------------------------------------------- attention found
class HFSelfAttention(nn.Module):
    """Hugging Face's ``BertSelfAttention``, written out: separate query/key/value Linears."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = heads * self.attention_head_size
        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(hidden, self.all_head_size)
        self.value = nn.Linear(hidden, self.all_head_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.all_head_size)


class HFBlockClassifier(nn.Module):
    """Tokens, HF self-attention with its separate output ``dense`` + LayerNorm, a classifier."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(6, hidden)
        self.self_attn = HFSelfAttention(hidden, heads)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.dense(self.self_attn(h)))
        return self.classifier(h[:, 0])


@pytest.mark.filterwarnings("ignore:pruning reached")  # 4 heads: a coarse grid
def test_hugging_face_style_attention_loses_whole_heads_without_being_named() -> None:
    torch.manual_seed(0)
    model, x = HFBlockClassifier().eval(), torch.randn(2, 5, 6)
    # the embedding kept whole: every pruned q/k/v row block must be an original head, unchanged
    pruned, report = prune(model, x, target_params_ratio=0.6, ignored_layers=[model.embed])
    attn = pruned.self_attn
    h = attn.num_attention_heads
    assert report.heads == {f"self_attn.{n}": (4, h) for n in ("query", "key", "value")} and 1 <= h < 4
    assert attn.attention_head_size == 8 and attn.all_head_size == h * 8 == pruned.dense.in_features
    kept = []
    for name in ("query", "key", "value"):
        before = getattr(model.self_attn, name).weight.view(4, 8, 32)
        after = getattr(attn, name).weight.view(h, 8, 32)
        kept.append([next(j for j in range(4) if torch.equal(after[i], before[j])) for i in range(h)])
    assert kept[0] == kept[1] == kept[2] and len(set(kept[0])) == h  # the same whole heads of q, k, v
    assert pruned(x).shape == (2, 10) and report.params_ratio == _numel(pruned) / _numel(model)


def _vit(timm: object) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")  # cls_token, pos_embed: pruned on their width
def test_timm_vit_loses_whole_heads_found_in_its_module_tree() -> None:
    from tests.zoo_support import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model, x = _vit(timm), torch.randn(2, 3, 32, 32)
    pruned, report = prune(model, x, target_params_ratio=0.5)
    assert set(report.heads) == {f"blocks.{i}.attn.qkv" for i in range(12)}
    for block in pruned.blocks:
        a, h = block.attn, block.attn.num_heads
        assert 1 <= h < 3 and a.head_dim == 64 and a.scale == 64 ** -0.5  # whole heads, size kept
        assert a.attn_dim == h * 64 and a.qkv.out_features == 3 * h * 64 == 3 * a.proj.in_features
    assert report.layer_widths["head"] == (10, 10) and abs(report.params_ratio - 0.5) <= TOL
    fused = pruned(x)
    for block in pruned.blocks:
        block.attn.fused_attn = False  # timm's written-out path reads num_heads, head_dim, scale
    manual = pruned(x)
    # both paths sum the same products in another order: |y| * eps * (reductions on the way)
    depth = sum(b.attn.attn_dim + b.mlp.fc1.out_features + 65 for b in pruned.blocks)
    bound = fused.abs().max().item() * torch.finfo(torch.float32).eps * depth
    assert fused.shape == (2, 10) and (fused - manual).abs().max().item() <= bound


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_timm_vit_heads_given_as_the_readme_shows() -> None:
    from tests.zoo_support import import_timm

    model = _vit(import_timm())
    heads = {b.attn.qkv: b.attn.num_heads for b in model.blocks}
    pruned, _report = prune(model, torch.randn(2, 3, 32, 32), target_params_ratio=0.5, attention_heads=heads)
    assert all(b.attn.attn_dim == b.attn.num_heads * 64 < 192 for b in pruned.blocks)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_mobilenetv3_keeps_its_classifier() -> None:
    """Its classifier is a timm ``Linear``: it was cut from 10 outputs to 6, silently."""
    from tests.zoo_support import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model, x = timm.create_model("mobilenetv3_small_050", num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    pruned, report = prune(model, x, target_params_ratio=0.5)
    assert report.layer_widths["classifier"] == (10, 10) and report.layer_widths["conv_head"][1] < 1024
    assert pruned(x).shape == (2, 10) and abs(report.params_ratio - 0.5) <= TOL
