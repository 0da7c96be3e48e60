"""Latency table and predictor (``qtemperate/latency.py``).

Timings are real (onnxruntime on the CPU running the tests, 1 thread, batch 1), so no
test asserts a time: they assert the table's bookkeeping, the predictor's closed form,
and a prediction against a real measurement of the same graph *relative* to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qtemperate.export.targets import CpuInfo
from qtemperate.latency import (
    LatencySpec,
    LatencyTable,
    LayerSignature,
    check_latency_prediction,
    kernel_friendly_round_to,
    latency_context,
    layer_signatures,
    predict_latency,
)


class LibConv(nn.Conv2d):
    """A library's conv subclass (as timm's ``Conv2dSame`` / ``StdConv2d``)."""


class LibLinear(nn.Linear):
    """A library's linear subclass (as timm's ``Linear``)."""


class Known(nn.Module):
    """Layers with hand-written signatures: stem, strided conv, depthwise, add, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = LibConv(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = LibLinear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(torch.relu(self.stem(x)))
        y = y + self.dw(y)
        return self.fc(y.mean((2, 3)))


def _known_signatures() -> dict[str, LayerSignature]:
    """The signatures of :class:`Known` on a 1x3x16x16 input, written out by hand."""
    return {
        "stem": LayerSignature("conv", 3, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (16, 16)),
        "down": LayerSignature("conv", 8, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (16, 16)),
        "dw": LayerSignature("conv", 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, (8, 8)),
        "fc": LayerSignature("linear", 16, 5, input_size=(1,)),
        "add": LayerSignature("add", 16, 16, input_size=(8, 8)),
    }


@pytest.fixture(scope="module")
def table_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A table with the profiler overhead calibrated once (both precisions), shared by the tests."""
    path = tmp_path_factory.mktemp("latency") / "table.json"
    table = LatencyTable(path)
    ctx = latency_context()
    for int8 in (True, False):
        table.profiler_overhead_ms(ctx, int8)
    table.save()
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_text(src.read_text())
    return dst


# --------------------------------------------------------------------------- signatures
def test_signatures_of_library_subclass_layers_with_closed_form_shapes() -> None:
    model = Known()
    found = dict(layer_signatures(model, torch.randn(2, 3, 16, 16)))
    assert found == _known_signatures()
    # output sizes and MACs from the signature agree with what torch computes
    x = torch.randn(1, 3, 16, 16)
    stem_out = model.stem(x)
    down_out = model.down(stem_out)
    assert tuple(down_out.shape[2:]) == found["down"].output_size() == (8, 8)
    assert found["down"].macs() == 16 * 8 * 8 * 8 * 3 * 3
    assert found["dw"].macs() == 16 * 8 * 8 * 1 * 3 * 3
    assert found["fc"].macs() == 16 * 5


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 6, 5, stride=2, padding="valid"), nn.Conv2d(4, 6, 4, padding="same", dilation=2),
     nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(2, 0)), nn.Conv1d(4, 6, 3, stride=2, padding=1),
     nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")],
)
def test_signature_output_size_matches_torch(conv: nn.Module) -> None:
    x = torch.randn(1, 4, *([13] * (conv.weight.dim() - 2)))
    ((_, sig),) = layer_signatures(conv, x)
    assert sig.output_size() == tuple(conv(x).shape[2:])


def test_pruned_widths_come_from_the_modules_and_unmeasured_kinds_are_refused() -> None:
    model = Known()
    model.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)  # a pruned copy's narrower layers
    model.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
    model.fc = LibLinear(12, 5)
    found = dict(layer_signatures(model, torch.randn(1, 3, 16, 16)))
    assert (found["down"].out_channels, found["dw"].groups, found["fc"].in_channels) == (12, 12, 12)
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        layer_signatures(nn.Sequential(nn.ConvTranspose2d(3, 4, 2)), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"0 \(LSTM\)"):  # no entry kind: refused, not left out
        layer_signatures(nn.Sequential(nn.LSTM(4, 4, batch_first=True)), torch.randn(1, 3, 4))


# --------------------------------------------------------------------------- the table
def test_prediction_is_the_constant_plus_the_entries(tmp_path: Path, table_file: Path) -> None:
    table = LatencyTable(_copy(table_file, tmp_path / "t.json"))
    pred = predict_latency(Known(), torch.randn(1, 3, 16, 16), table)
    ctx = latency_context()
    expected = {name: table.get(ctx, True, sig.key()) for name, sig in _known_signatures().items()}
    assert pred.layers == expected  # every layer and the add, each its own entry
    assert pred.constant_ms == table.get(ctx, True, "constant/3x16x16")
    total = pred.constant_ms + sum(expected.values())
    assert pred.total_ms == pytest.approx(total, rel=8 * np.finfo(float).eps)  # a 6-term float sum
    # the float graph: onnxruntime fuses the add into the convolution, so it has no entry
    fp = predict_latency(Known(), torch.randn(1, 3, 16, 16), table, int8=False)
    assert set(fp.layers) == {"stem", "down", "dw", "fc"}
    assert fp.total_ms == pytest.approx(fp.constant_ms + sum(fp.layers.values()), rel=8 * np.finfo(float).eps)
    assert {"runtime": pred.runtime, "int8": pred.int8, "batch": pred.batch, "threads": pred.threads} == {
        "runtime": "onnxruntime", "int8": True, "batch": 1, "threads": 1}


def test_a_second_prediction_measures_nothing(tmp_path: Path, table_file: Path) -> None:
    path = _copy(table_file, tmp_path / "t.json")
    table = LatencyTable(path)
    first = predict_latency(Known(), torch.randn(1, 3, 16, 16), table)
    assert table.measurements == 6  # the constant and five entries (stem, down, dw, fc, add)
    again = predict_latency(Known(), torch.randn(4, 3, 16, 16), table)  # example batch size is irrelevant
    assert table.measurements == 6 and again == first
    reloaded = LatencyTable(path)  # a later run reads the file beside it
    assert predict_latency(Known(), torch.randn(1, 3, 16, 16), reloaded) == first
    assert reloaded.measurements == 0
    cache = tmp_path / "cache"  # a user cache directory holding the same file
    cache.mkdir()
    _copy(path, cache / "latency_table.json")
    user = LatencyTable(None, cache_dir=cache)
    assert predict_latency(Known(), torch.randn(1, 3, 16, 16), user) == first
    assert user.measurements == 0


def test_a_changed_key_measures_again_and_keeps_the_old_entries(
        tmp_path: Path, table_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _copy(table_file, tmp_path / "t.json")
    table = LatencyTable(path)
    model, x = Known(), torch.randn(1, 3, 16, 16)
    predict_latency(model, x, table)
    n = table.measurements
    predict_latency(model, x, table, threads=2)  # another thread count: other entries
    assert table.measurements == n + 1 + 6  # its own profiler overhead, constant and entries
    n = table.measurements
    predict_latency(model, x, table, batch=2)
    assert table.measurements == n + 1 + 6
    here = latency_context().cpu
    monkeypatch.setattr("qtemperate.latency._cpu_name", lambda: "Another CPU (x86-avx2)")
    n = table.measurements
    predict_latency(model, x, table)
    assert table.measurements == n + 1 + 6
    contexts = json.loads(path.read_text())["contexts"]
    assert len(contexts) == 4 and {c["threads"] for c in contexts.values()} == {1, 2}
    assert {c["cpu"] for c in contexts.values()} == {"Another CPU (x86-avx2)", here}


def test_a_corrupt_table_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json"):
        LatencyTable(bad)
    bad.write_text(json.dumps({"format": 99, "contexts": {}}))
    with pytest.raises(ValueError, match="format"):
        LatencyTable(bad)


# --------------------------------------------------------------------------- small functions
def test_kernel_friendly_round_to_property() -> None:
    flags = {"x86-avx512": frozenset({"avx2", "avx512f", "avx512_vnni"}), "x86-avx2": frozenset({"avx2"})}
    cpus = [CpuInfo("x86_64", "x", flags["x86-avx512"]), CpuInfo("x86_64", "x", flags["x86-avx2"]),
            CpuInfo("aarch64", "a", frozenset({"asimd"})), CpuInfo("riscv64"), None]
    for runtime in ("onnxruntime", "openvino"):
        values = [kernel_friendly_round_to(runtime, c) for c in cpus]
        # a power of two dividing the 16 of AVX-512, so every friendly width is also friendly there
        assert all(v >= 1 and v & (v - 1) == 0 and 16 % v == 0 for v in values)
        assert values[0] == 16 and values[1] == 8
        assert values[3] == 16  # unknown: a multiple of every class's
    with pytest.raises(ValueError, match="runtime"):
        kernel_friendly_round_to("tensorrt")


def test_check_latency_prediction_closed_form() -> None:
    assert check_latency_prediction(1.10, 1.0) == (pytest.approx(0.10), None)
    err, msg = check_latency_prediction(0.8, 1.0)
    assert err == pytest.approx(-0.2) and "20% below" in msg
    err, msg = check_latency_prediction(3.0, 2.0, tolerance=0.4)
    assert err == pytest.approx(0.5) and "50% above" in msg
    with pytest.raises(ValueError, match="measured_ms"):
        check_latency_prediction(1.0, 0.0)
    with pytest.raises(ValueError, match="runtime"):
        LatencySpec(runtime="tensorrt")
    with pytest.raises(ValueError, match="threads"):
        LatencySpec(threads=0)
    with pytest.raises(ValueError, match="teacher_ms"):
        LatencySpec(teacher_ms=-1.0)
