"""Train the quickstart's teacher: a wide ResNet-8 on Fashion-MNIST, with qtemperate's own code.

The quickstart (``recipes/fashion_mnist_quickstart.yaml``) distils a teacher that users
would bring already trained; this script makes that checkpoint reproducibly, as a user
would make theirs::

    python bench/make_quickstart_teacher.py            # ~30-60 min on 2 cores
    python bench/make_quickstart_teacher.py --epochs 1 --limit-train 2048 --out /tmp/t.pt   # smoke

It trains ``resnet8(width=32, in_channels=1)`` (308,074 parameters, 4x the old
quickstart teacher) on the whole Fashion-MNIST training set with
:func:`qtemperate.training.teacher.train_teacher` (SGD + Nesterov, cosine learning rate,
the seed fixed), scores it on the test set (all 10,000 images and the quickstart's
class-balanced 2,000), and writes the state dict (``torch.save``; the run loads it with
``weights_only=True``) and a JSON record beside it (seed, epochs, accuracy, command,
versions, CPU) so the checkpoint's provenance is in the repository.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from conftest import environment  # noqa: E402

from qtemperate.data import build_datasets  # noqa: E402
from qtemperate.data.loaders import build_run_loaders  # noqa: E402
from qtemperate.models import build_model  # noqa: E402
from qtemperate.recipe import OptimizerConfig  # noqa: E402
from qtemperate.training.console import Console  # noqa: E402
from qtemperate.training.evaluate import evaluate  # noqa: E402
from qtemperate.training.teacher import train_teacher  # noqa: E402

DEFAULT_OUT = ROOT / "recipes" / "teachers" / "fashion_mnist_resnet8_w32.pt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit-train", type=int, default=None, help="default: all 60,000 images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = build_datasets("fashion_mnist", limit_train=args.limit_train, seed=args.seed)
    loaders = build_run_loaders(bundle, args.batch_size, 1000, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("resnet8", num_classes=10, in_channels=1, width=args.width)
    opt = OptimizerConfig(name="sgd", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    train_teacher(model, loaders, args.epochs, args.lr, opt, torch.device("cpu"), seed=args.seed,
                  console=Console(True))
    model.eval()
    acc_full, _ = evaluate(model, loaders.test, torch.device("cpu"))
    quick = build_datasets("fashion_mnist", limit_train=64, limit_test=2000, seed=args.seed)
    acc_quick, _ = evaluate(model, build_run_loaders(quick, 64, 1000).test, torch.device("cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    record = {
        "checkpoint": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
        "model": "resnet8", "kwargs": {"width": args.width, "in_channels": 1, "num_classes": 10},
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        "train_images": len(bundle.train),
        "test_acc_10000": acc_full, "test_acc_quickstart_2000": acc_quick,
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "environment": environment(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("params", "test_acc_10000", "test_acc_quickstart_2000", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
