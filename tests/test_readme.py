"""The README's library example runs as written (docs that match the code)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]

    def evaluate(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)
        model.train()
        return loss

    ns: dict = {"calib": batches, "train_loader": batches, "evaluate": evaluate}
    exec(compile(blocks[0], str(README), "exec"), ns)
    sched, qstudent = ns["sched"], ns["qstudent"]
    from qtemperate import get_bit_widths

    # After the loop the student is in the last stage's precision.
    inner = [v["weight"] for k, v in get_bit_widths(qstudent).items() if v["weight"] is not None]
    assert min(inner) == 4 and sched.state.weight_bits == 4
    assert 0 < ns["model_size"](qstudent).compression_ratio < 0.5
