"""An ONNX file made to disagree with its model by a known amount, to test verify_onnx's warning."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.ao.quantization as tq
from onnx import numpy_helper
from torch import nn

from qtemperate.export import verify_onnx
from qtemperate.export.runtime import DeployedAgreementWarning


def _reference_top1(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """PyTorch argmax, computed apart from qtemperate: a copy in eval mode, torch.ao observers off."""
    ref = copy.deepcopy(model).eval()
    ref.apply(tq.disable_observer)  # a no-op on anything but torch.ao fake-quants
    with torch.no_grad():
        return ref(x).argmax(1).numpy()


def forced_class_file(path: Path, out: Path, cls: int, shift: float) -> Path:
    """Copy of ``path`` whose (single) output gets ``+shift`` on class ``cls``: every
    prediction becomes ``cls`` when ``shift`` exceeds the logits' spread."""
    g = onnx.load(str(path))
    name = g.graph.output[0].name
    n_classes = g.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    for node in g.graph.node:
        node.output[:] = [o + "_pre" if o == name else o for o in node.output]
    bias = np.zeros(n_classes, np.float32)
    bias[cls] = shift
    g.graph.initializer.append(numpy_helper.from_array(bias, "forced_class_shift"))
    g.graph.node.append(onnx.helper.make_node("Add", [name + "_pre", "forced_class_shift"], [name]))
    onnx.save(g, str(out))
    return out


def check_agreement_warning(path: Path, model: nn.Module, pool: torch.Tensor, tmp: Path) -> None:
    """verify_onnx warns at 253/256 deployed agreement (98.83 %) and not at 254/256 (99.22 %).

    The file is changed to predict one class ``c`` always (the reference's most frequent);
    the inputs are ``k`` samples the reference puts in ``c`` (repeated as needed) and
    ``256 - k`` it puts elsewhere, so the agreement is ``k / 256`` exactly, checked
    against onnxruntime run here on its own.
    """
    top1 = _reference_top1(model, pool)
    c = int(np.bincount(top1).argmax())
    inside, outside = pool[top1 == c], pool[top1 != c]
    assert len(outside) >= 3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: pool.numpy()})[0]
    forced = forced_class_file(path, tmp / f"{path.stem}_forced.onnx", c,
                               shift=2.0 * float(logits.max() - logits.min()) + 1.0)
    for k, warns in ((253, True), (254, False)):
        x = torch.cat([inside[torch.arange(k) % len(inside)], outside[: 256 - k]])
        fsess = ort.InferenceSession(str(forced), providers=["CPUExecutionProvider"])
        got = fsess.run(None, {fsess.get_inputs()[0].name: x.numpy()})[0].argmax(1)
        expected = float(np.mean(got == _reference_top1(model, x)))
        assert expected == k / 256  # the construction holds (independently of qtemperate)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = verify_onnx(forced, model, x)
        ours = [w for w in caught if issubclass(w.category, DeployedAgreementWarning)]
        assert rep.top1_agreement == pytest.approx(expected, abs=0)
        if warns:
            assert len(ours) == 1 and rep.warning == str(ours[0].message)
            assert f"{expected * 100:.2f}%" in rep.warning  # 98.83%, the measured figure
            assert "computes another function" in rep.warning  # the graph disagrees too
        else:
            assert not ours and rep.warning is None
