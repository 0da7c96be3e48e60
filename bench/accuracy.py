"""Accuracy study: QAT vs fixed-T KD vs Temperate variants on Fashion-MNIST.

Every method is a recipe variant run through :class:`qtemperate.Trainer`, with the
same data, the same student size (pruned from the teacher so that its W4A4 bytes are
at most 1/8 of the teacher's float bytes: ``student.target_size_ratio=0.125``), the
same stages and epochs, and the same seeds. One teacher is trained once (seed 0,
plain CE, same data slice) and shared by every method and seed through
``teacher.checkpoint`` — the methods differ only in the distillation settings:

====================  =========================================================================
``qat``               QAT without KD: ``distillation.kd_weight=0``
``kd_fixed_t4``       KD at fixed T=4: temperatures [4], coupling none, every stage ``constant``
                      with ``base_temperature: 4``
``temperate_dyn``     Temperate dynamic T: temperatures [4], stages ``temperate``, coupling none
``temperate_ms``      Temperate multi-scale (6, 3, 1), stages ``temperate``, coupling none
``temperate_joint``   Temperate multi-scale (6, 3, 1) + joint bit-stage coupling (``bit_drop``)
====================  =========================================================================

Usage::

    python bench/accuracy.py --profile quick --seeds 3 --out bench/results/accuracy_quick.json
    python bench/accuracy.py --profile full --seeds 3 --out bench/results/accuracy_full.json  # GPU
    # targeted variants (applied to every selected method, recipe --set syntax):
    python bench/accuracy.py --profile quick --seeds 3 --methods kd_fixed_t4 temperate_ms \
        --set distillation.kd_weight=0.5 --tag kd05 --out bench/results/accuracy_quick_kd05.json

Profiles:

* ``quick`` (2 CPU cores, ~20 min for 5 methods × 3 seeds): Fashion-MNIST
  ``limit_train=5000`` (class-balanced first 5k), ``limit_test=1000``; teacher
  ``small_cnn(width=32)`` trained 3 epochs on the class-balanced first 10k (test acc on
  the first 2000 test images); stages W8A8 1 epoch → W4A4 2 epochs (lr 0.02, cosine
  per stage). Use ``--threads 1`` when the machine is shared: two torch threads
  competing with another process were 4× slower per step than one.
* ``full`` (GPU): all 60k/10k images; teacher ``resnet20`` trained 30 epochs;
  stages W8A8 5 epochs → W4A4 15 epochs.

Validation protocol: every student run carves a class-balanced validation split from
its training slice (``data.val_fraction``, the recipe default 0.1; seeded by the run's
seed); its loss drives the adaptive temperature and the plateau trigger, the test slice
only gives the reported accuracy. The shared teacher is trained on the whole training
slice (it reads no validation loss). Runs before 2026-11-28 18:00 UTC used
``val_fraction: 0`` (the test loss drove the temperatures); pass
``--set data.val_fraction=0`` to reproduce them.

Finished runs (``summary.json`` present) are reused, so an interrupted study can be
restarted with the same command. Prints a table (mean ± std over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from conftest import environment  # noqa: E402

from qtemperate import Trainer, build_model  # noqa: E402
from qtemperate.data import build_datasets  # noqa: E402
from qtemperate.recipe import apply_overrides, parse_recipe  # noqa: E402
from qtemperate.trainer import evaluate  # noqa: E402
from qtemperate.training.console import Console  # noqa: E402

_PRINT = Console(True)

METHODS = ("qat", "kd_fixed_t4", "temperate_dyn", "temperate_ms", "temperate_joint")

# Both CPU profiles: W8A8 1 epoch -> W4A4 2 epochs, the quickstart's stage settings.
_QUICK_STAGES: list[dict[str, Any]] = [
    {"name": "w8a8", "epochs": 1, "weight_bits": 8, "act_bits": 8, "lr": 0.02,
     "temperature": {"schedule": "temperate", "warmup": 0.0, "adapt_until": 1.0}},
    {"name": "w4a4", "epochs": 2, "weight_bits": 4, "act_bits": 4, "lr": 0.02,
     "temperature": {"schedule": "temperate", "warmup": 0.0, "adapt_until": 0.5}},
]
_QUICK_OPTIMIZER: dict[str, Any] = {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"name": "fashion_mnist", "batch_size": 128, "eval_batch_size": 1000,
                 "limit_train": 5000, "limit_test": 1000},
        # The teacher is trained on a larger slice (the class-balanced first 10k, of which
        # the students' 5k are the first half) and evaluated on the first 2000 test images.
        "teacher": {"model": "small_cnn", "kwargs": {"width": 32}, "epochs": 3, "lr": 0.05,
                    "limit_train": 10000, "limit_test": 2000},
        "stages": _QUICK_STAGES,
        "optimizer": _QUICK_OPTIMIZER,
        "device": "cpu",
    },
    # The quickstart's setting: a ResNet-8 teacher (stronger than small_cnn) and a
    # student really pruned (round_to=8 gives ~0.66 of the params at 1/11 of the bytes).
    "quick_r8": {
        "data": {"name": "fashion_mnist", "batch_size": 128, "eval_batch_size": 1000,
                 "limit_train": 12000, "limit_test": 2000},
        "teacher": {"model": "resnet8", "kwargs": {"width": 16}, "epochs": 4, "lr": 0.1,
                    "limit_train": 12000, "limit_test": 2000},
        "student": {"target_size_ratio": 0.125, "round_to": 8},
        "stages": _QUICK_STAGES,
        "optimizer": _QUICK_OPTIMIZER,
        "device": "cpu",
    },
    "full": {
        "data": {"name": "fashion_mnist", "batch_size": 128, "eval_batch_size": 1000},
        "teacher": {"model": "resnet20", "kwargs": {}, "epochs": 30, "lr": 0.1},
        "stages": [
            {"name": "w8a8", "epochs": 5, "weight_bits": 8, "act_bits": 8, "lr": 0.02,
             "temperature": {"schedule": "temperate", "warmup": 0.2, "adapt_until": 0.8}},
            {"name": "w4a4", "epochs": 15, "weight_bits": 4, "act_bits": 4, "lr": 0.02,
             "temperature": {"schedule": "temperate", "warmup": 0.2, "adapt_until": 0.7}},
        ],
        "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4},
        "device": "auto",
    },
}


# --------------------------------------------------------------------------- teacher
def train_teacher(profile: dict[str, Any], path: Path, seed: int = 0) -> dict[str, Any]:
    """Train the shared teacher once with the pipeline's own teacher step
    (:func:`qtemperate.training.teacher.train_teacher`: plain CE, SGD + nesterov, cosine per step)."""
    if path.is_file():
        return json.loads(path.with_suffix(".json").read_text())
    from qtemperate.data import build_run_loaders
    from qtemperate.recipe import OptimizerConfig
    from qtemperate.training.device import resolve_device
    from qtemperate.training.teacher import train_teacher as train

    device = resolve_device(profile["device"])
    d, t = profile["data"], profile["teacher"]
    torch.manual_seed(seed)
    bundle = build_datasets(d["name"], limit_train=t.get("limit_train", d.get("limit_train")),
                            limit_test=t.get("limit_test", d.get("limit_test")), seed=seed)
    loaders = build_run_loaders(bundle, d["batch_size"], d["eval_batch_size"], seed=seed)
    model = build_model(t["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                        **t["kwargs"]).to(device)
    t0 = time.perf_counter()
    train(model, loaders, t["epochs"], t["lr"], OptimizerConfig(), device, seed=seed, console=_PRINT)
    acc, _ = evaluate(model, loaders.test, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    info = {"model": t["model"], "kwargs": t["kwargs"], "epochs": t["epochs"], "lr": t["lr"], "seed": seed,
            "test_acc": acc, "train_time_s": time.perf_counter() - t0, "checkpoint": str(path)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- recipes
def method_recipe(method: str, profile: dict[str, Any], teacher_ckpt: Path, seed: int,
                  out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The raw recipe of one method (before ``--set`` overrides)."""
    stages = copy.deepcopy(profile["stages"])
    dist: dict[str, Any] = {"kd_weight": 0.9, "temperatures": [6.0, 3.0, 1.0], "coupling": "none"}
    if method == "qat":
        dist = {"kd_weight": 0.0, "temperatures": [4.0], "coupling": "none"}
        for st in stages:
            st["temperature"] = {"schedule": "constant", "base_temperature": 4.0}
    elif method == "kd_fixed_t4":
        dist["temperatures"] = [4.0]
        for st in stages:
            st["temperature"] = {"schedule": "constant", "base_temperature": 4.0}
    elif method == "temperate_dyn":
        dist["temperatures"] = [4.0]
    elif method == "temperate_ms":
        pass
    elif method == "temperate_joint":
        dist["coupling"] = "bit_drop"
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    t = profile["teacher"]
    raw = {
        "name": f"{method}_s{seed}",
        "seed": seed,
        "output_dir": str(out_dir),
        "device": profile["device"],
        "data": dict(profile["data"]),
        "teacher": {"model": t["model"], "kwargs": t["kwargs"], "checkpoint": str(teacher_ckpt)},
        "student": dict(profile.get("student", {"target_size_ratio": 0.125})),
        "stages": stages,
        "distillation": dist,
        "optimizer": dict(profile["optimizer"]),
        "tracking": {"loggers": ["jsonl"], "log_every": 50},
        "export": {"onnx": False},
    }
    return apply_overrides(raw, overrides)


def run_one(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    recipe = parse_recipe(raw, source=raw["name"])
    return Trainer(recipe, run_dir=run_dir, progress=False).run()


# --------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = {r["seed"]: r["student_acc"] for r in results.get("kd_fixed_t4", [])}
    for method, runs in results.items():
        accs = [r["student_acc"] for r in runs]
        m, s = _mean_std(accs)
        paired = [r["student_acc"] - base[r["seed"]] for r in runs if r["seed"] in base]
        pm, ps = _mean_std(paired)
        w8 = [r["stages"][0]["accuracy"] for r in runs if r.get("stages")]
        out[method] = {
            "student_acc_mean": m, "student_acc_std": s, "n": len(accs), "accs": accs,
            "w8a8_acc_mean": _mean_std(w8)[0],
            "minus_kd_fixed_mean": pm, "minus_kd_fixed_std": ps,
            "compression_ratio": statistics.fmean(r["compression_ratio"] for r in runs),
            "student_bytes": runs[0]["student_bytes"], "teacher_float_bytes": runs[0]["teacher_float_bytes"],
            "wall_time_s_mean": statistics.fmean(r["wall_time_s"] for r in runs),
        }
    return out


def print_table(agg: dict[str, Any], teacher_acc: float) -> str:
    lines = [f"teacher (shared) test acc: {teacher_acc:.4f}",
             f"{'method':<18} {'n':>2} {'W4A4 acc (mean ± std)':>24} {'Δ vs KD T=4':>18} {'W8A8 acc':>9} {'ratio':>7} {'s/run':>6}"]
    for method, a in agg.items():
        lines.append(
            f"{method:<18} {a['n']:>2} {100 * a['student_acc_mean']:>14.2f} ± {100 * a['student_acc_std']:<5.2f}"
            f" {100 * a['minus_kd_fixed_mean']:>+9.2f} ± {100 * a['minus_kd_fixed_std']:<5.2f}"
            f" {100 * a['w8a8_acc_mean']:>9.2f} {a['compression_ratio']:>7.4f} {a['wall_time_s_mean']:>6.0f}"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="recipe override key.path=value, applied to every method (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the runs folder (for variants)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"),
                   help="folder of the run folders and the shared teacher (default: runs)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="default: <runs-root>/bench_accuracy_<profile>[_<tag>]")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="train the shared teacher this many epochs instead (its own checkpoint)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 quick, all full)")
    args = p.parse_args(argv)

    profile = copy.deepcopy(PROFILES[args.profile])
    teacher_tag = ""
    if args.teacher_epochs is not None:
        profile["teacher"]["epochs"] = args.teacher_epochs
        teacher_tag = f"_e{args.teacher_epochs}"
    torch.set_num_threads(args.threads or max(1, min(os.cpu_count() or 1, 2 if args.profile == "quick" else 64)))
    runs_dir = args.runs_dir or args.runs_root / f"bench_accuracy_{args.profile}{'_' + args.tag if args.tag else ''}"
    teacher_ckpt = args.runs_root / f"bench_accuracy_{args.profile}_teacher{teacher_tag}" / "teacher.pt"
    t0 = time.perf_counter()
    teacher = train_teacher(profile, teacher_ckpt)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        for method in args.methods:
            raw = method_recipe(method, profile, teacher_ckpt, seed, runs_dir, args.overrides)
            s0 = time.perf_counter()
            summary = run_one(raw, runs_dir / raw["name"])
            rec = {"seed": seed, **{k: summary[k] for k in (
                "teacher_acc", "student_acc", "acc_drop", "compression_ratio", "student_bytes",
                "teacher_float_bytes", "params", "teacher_params", "prune_ratio", "stages", "wall_time_s")}}
            results[method].append(rec)
            print(f"[{time.perf_counter() - t0:7.0f}s] seed {seed} {method:<16} acc {summary['student_acc']:.4f} "
                  f"(W8A8 {summary['stages'][0]['accuracy']:.4f}) T per stage "
                  f"{[round(s['final_T'], 2) for s in summary['stages']]} ({time.perf_counter() - s0:.0f}s)",
                  flush=True)
    agg = aggregate(results)
    table = print_table(agg, teacher["test_acc"])
    payload = {
        "environment": environment(),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "profile": args.profile,
        "profile_config": profile,
        "overrides": args.overrides,
        "val_fraction": parse_recipe(method_recipe(args.methods[0], profile, teacher_ckpt, 0, runs_dir,
                                                   args.overrides)).data.val_fraction,
        "teacher": teacher,
        "teacher_shared": "one teacher, trained once (seed 0) and shared by every method and seed via teacher.checkpoint",
        "seeds": list(range(args.seeds)),
        "aggregate": agg,
        "runs": results,
        "table": table,
        "total_time_s": time.perf_counter() - t0,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
