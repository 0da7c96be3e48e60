"""The README's "Your Brevitas model" and "Your torch.ao model" sections run as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _section_code(heading: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no section {heading!r}"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)
    assert len(blocks) == 1, heading
    return blocks[0]


def _run(
    heading: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[dict, str]:
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(2)
    ]
    ns: dict = {"train_loader": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_section_code(heading), str(README), "exec"), ns)
    return ns, capsys.readouterr().out


def test_your_brevitas_model_section_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from qtemperate import get_bit_widths, model_size, quantization_report

    ns, out = _run("Your Brevitas model", tmp_path, monkeypatch, capsys)
    student = ns["student"]
    assert out.splitlines()[0] == "{'weight': 4, 'act': None, 'input': None}"
    bits = get_bit_widths(student)
    # after the W4A4 stage: inner layers at 4, first/last and the input quantizer as built
    assert bits["conv2"]["weight"] == 4 and bits["conv3"]["weight"] == 4
    assert bits["conv1"]["weight"] == 8 and bits["fc"]["weight"] == 8 and bits["inp"]["act"] == 8
    assert bits["relu1"]["act"] == 4 and bits["requant"]["act"] == 4
    assert quantization_report(student).fully_quantized
    assert 0 < model_size(student).compression_ratio < 0.3
    assert (tmp_path / "my_student.onnx").is_file()
    assert out.strip().splitlines()[-1] == "1.0"  # onnxruntime agrees on every sample


def test_your_torch_ao_model_section_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    _, out = _run("Your torch.ao model", tmp_path, monkeypatch, capsys)
    bits = eval(out.splitlines()[0])  # the printed model_size(student).bits
    assert {b for n, b in bits.items() if not n.endswith(".bn")} == {4, 8}
    assert {b for n, b in bits.items() if n.endswith(".bn")} == {32}  # BN folds into the conv
    assert 0 < float(out.splitlines()[1]) < 0.5
    assert (tmp_path / "my_student_ao.onnx").is_file()  # the prepared W4A4 model, as QDQ
    assert float(out.strip().splitlines()[-1]) >= 0.875  # 8 random samples: one near-tie at most
