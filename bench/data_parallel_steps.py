"""Step by step: how far 2 gloo processes x 32 drift from 1 process x 64 (teacher training).

    python bench/data_parallel_steps.py [--epochs 3] [--out bench/results/data_parallel_steps.json]
    python bench/data_parallel_steps.py --data fashion_mnist --limit-train 12000 --model resnet8 \
        --batch 128 --lr 0.1 --epochs 1            # the quickstart's teacher

Trains a teacher (default: the digits teacher of the tiny test recipe, small_cnn width
16, SGD Nesterov, cosine LR, batch 64 global) once in one process and once as 2 DDP
processes with synchronised BatchNorm, through the run's own loaders
(``build_run_loaders``), and records max |Δθ| after every step. The steps agree to rounding until a discontinuity
(a ReLU input at 0 to rounding) turns a rounding difference into a finite one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rank_data(rank: int, world: int, cfg: dict[str, Any], port: int) -> tuple[Any, Any]:
    """One thread, the gloo group when ``world > 1``, and this rank's data and loaders."""
    from qtemperate.data import build_datasets, build_run_loaders

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo")
    bundle = build_datasets(cfg["data"], seed=0, limit_train=cfg["limit_train"])
    loaders = build_run_loaders(bundle, cfg["batch"], 256, 0, 0, rank, world)
    return bundle, loaders


def _train(rank: int, world: int, cfg: dict[str, Any], port: int, queue: Any) -> None:
    from qtemperate.models import build_model
    from qtemperate.training import distributed
    from qtemperate.training.lr_schedule import lr_at, set_lr

    bundle, loaders = _rank_data(rank, world, cfg, port)
    torch.manual_seed(0)
    model = build_model(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels, width=16)
    trained = distributed.wrap(model, torch.device("cpu"))
    lr, epochs = cfg["lr"], cfg["epochs"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    total, step, snaps = epochs * len(loaders.train), 0, []
    for epoch in range(epochs):
        loaders.set_epoch(10_000 + epoch)
        for x, y, _ in loaders.train:
            set_lr(opt, lr_at(step, total, lr, "cosine"))
            loss = F.cross_entropy(trained(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            snaps.append(torch.cat([p.detach().flatten() for p in model.parameters()]).tolist())
    if rank == 0:
        queue.put(snaps)
    if world > 1:
        dist.destroy_process_group()


def _first_grad(rank: int, world: int, cfg: dict[str, Any], port: int, queue: Any, dtype: torch.dtype) -> None:
    from qtemperate.models import build_model
    from qtemperate.training import distributed

    bundle, loaders = _rank_data(rank, world, cfg, port)
    loaders.set_epoch(10_000)
    torch.manual_seed(0)
    model = build_model(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels, width=16)
    model = model.to(dtype)
    x, y, _ = next(iter(loaders.train))
    trained = distributed.wrap(model, torch.device("cpu"))  # held: DDP's gradient hooks live with it
    F.cross_entropy(trained(x.to(dtype)), y).backward()
    if rank == 0:
        queue.put({n: p.grad.detach().double().flatten().tolist() for n, p in model.named_parameters()})
    if world > 1:
        dist.destroy_process_group()


def first_step_errors(cfg: dict[str, Any], port: int = 29562) -> dict[str, dict[str, float]]:
    """Per parameter: max |g - g_fp64| / max |g_fp64| of the first gradient for 1 and 2
    fp32 processes, and max |g_1 - g_2| / max |g_fp64| (how the two fp32 ones differ)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    grads = []
    for world, dtype in ((1, torch.float64), (1, torch.float32), (2, torch.float32)):
        procs = [ctx.Process(target=_first_grad, args=(r, world, cfg, port, queue, dtype)) for r in range(world)]
        for p in procs:
            p.start()
        grads.append({k: torch.tensor(v) for k, v in queue.get().items()})
        for p in procs:
            p.join()
    ref, one, two = grads
    out = {}
    for k, g in ref.items():
        scale = float(g.abs().max()) or 1.0
        out[k] = {"one_vs_fp64": float((one[k] - g).abs().max()) / scale,
                  "two_vs_fp64": float((two[k] - g).abs().max()) / scale,
                  "one_vs_two": float((one[k] - two[k]).abs().max()) / scale}
    return out


def run(cfg: dict[str, Any], port: int = 29561) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    trajectories = []
    for world in (1, 2):
        procs = [ctx.Process(target=_train, args=(r, world, cfg, port, queue)) for r in range(world)]
        for p in procs:
            p.start()
        trajectories.append(torch.tensor(queue.get()))
        for p in procs:
            p.join()
    diff = (trajectories[0] - trajectories[1]).abs().amax(dim=1).tolist()
    return {**cfg, "steps": len(diff), "max_abs_param_diff_per_step": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", default="digits")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cfg = {"data": args.data, "limit_train": args.limit_train, "model": args.model, "batch": args.batch,
           "lr": args.lr, "epochs": args.epochs}
    res = run(cfg)
    errs = first_step_errors(cfg)
    res["first_gradient_relative_errors"] = errs
    worst = {k: max(e[k] for e in errs.values()) for k in ("one_vs_fp64", "two_vs_fp64", "one_vs_two")}
    print("first gradient, worst parameter, max |diff| / max |g_fp64|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    d = res["max_abs_param_diff_per_step"]
    jump = next((i for i in range(1, len(d)) if d[i] > 10 * d[i - 1]), None)
    res["first_jump_step"] = jump
    print(f"steps {len(d)}; max |dtheta| step 1: {d[0]:.2e}; before the first jump (step {jump}): "
          f"{max(d[:jump] if jump else d):.2e}; after it: {d[jump] if jump else float('nan'):.2e}; last: {d[-1]:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
