"""The README's Lightning example with and without gradient clipping, on sklearn digits.

The example's optimizer is SGD at lr 0.02 with momentum 0.9 and its stages are float 1,
W8A8 1, W4A4 2 epochs (``TemperateDistillation`` at temperatures 6, 3, 1). Here the
teacher and the student are ResNet-20s (``width`` 16, one input channel) on the 8x8
digits (1,200 training images, batches of 32 shuffled with a seeded generator, 597 for
validation); the teacher trains 5 epochs on the labels first. Each seed runs the fit
twice from the same student: without clipping, and with ``Trainer(gradient_clip_val=5.0)``
(the recipe trainer's ``optimizer.grad_clip``). Per epoch it records the first, last and
largest training loss, and at the end the validation loss and accuracy; a fit that stops
with :class:`~qtemperate.training.guards.TrainingDiverged` records its message.

Run::

    python bench/lightning_clipping.py --seeds 0 1 --out bench/results/lightning_clipping.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def _digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def _fit(teacher: torch.nn.Module, student: torch.nn.Module, data: tuple[torch.Tensor, ...], seed: int,
         clip: float | None, width: int) -> dict[str, Any]:
    import lightning.pytorch as L

    from qtemperate import BitStage
    from qtemperate.integrations.lightning import TemperateDistillation
    from qtemperate.training.guards import TrainingDiverged

    x, y, xv, yv = data
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    kd = TemperateDistillation(teacher, [BitStage("float", 1), BitStage("w8a8", 1, 8, 8), BitStage("w4a4", 2, 4, 4)],
                               temperatures=(6.0, 3.0, 1.0), student_attr="net")
    losses: list[tuple[int, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append((trainer.current_epoch, float(outputs["loss"])))

    class LitStudent(L.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            return kd.distill(self.net(xb), xb, yb)["loss"]

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            xb, yb = batch
            out = self.net(xb)
            self.log("val_loss", F.cross_entropy(out, yb))
            self.log("val_acc", (out.argmax(1) == yb).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    trainer = L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd, Record()], logger=False, accelerator="cpu",
                        devices=1, gradient_clip_val=clip, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    started, stopped = time.perf_counter(), None
    try:
        trainer.fit(LitStudent(copy.deepcopy(student)), train, val)
    except TrainingDiverged as exc:
        stopped = str(exc)
    epochs = {}
    for e in range(kd.total_epochs):
        ls = [v for ep, v in losses if ep == e]
        if ls:
            epochs[e] = {"first": ls[0], "last": ls[-1], "max": max(ls), "finite": all(map(math.isfinite, ls))}
    return {"seed": seed, "gradient_clip_val": clip, "width": width, "updates": len(losses),
            "epochs": epochs, "stopped": stopped, "wall_s": round(time.perf_counter() - started, 1),
            **{k: float(trainer.callback_metrics[k]) for k in ("val_loss", "val_acc") if k in trainer.callback_metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lightning_clipping.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from qtemperate import build_model

    data = _digits()
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        teacher = build_model("resnet20", num_classes=10, in_channels=1, width=args.width)
        opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(TensorDataset(data[0], data[1]), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        for _ in range(5):
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(teacher(xb), yb).backward()
                opt.step()
        teacher.eval()
        with torch.no_grad():
            teacher_acc = float((teacher(data[2]).argmax(1) == data[3]).float().mean())
        student = build_model("resnet20", num_classes=10, in_channels=1, width=args.width)
        for clip in (None, 5.0):
            run = {"teacher_val_acc": teacher_acc, **_fit(teacher, student, data, seed, clip, args.width)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    import lightning

    env = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": args.threads}
    args.out.write_text(json.dumps({"environment": env, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
