"""The quickstart, end to end, over seeds: teacher vs student accuracy, wall time, phases.

Runs ``recipes/fashion_mnist_quickstart.yaml`` through :class:`qtemperate.Trainer` exactly
as ``qtemperate run`` does (its own teacher training, pruning, W8A8 → W4A4 QAT with
Temperate distillation, ONNX export and timing, W&B offline), once per seed, and the two
baselines **at the same budget** (same recipe, same stages and epochs, same teacher: the
seed's ``teacher.pt`` is reused through ``teacher.checkpoint``):

==================  ==================================================================
``temperate``       the recipe as shipped
``no_kd``           ``distillation.kd_weight=0`` (QAT on the labels only)
``kd_fixed_t4``     ``distillation.temperatures=[4]``, ``coupling: none``, every stage
                    ``temperature: {schedule: constant, base_temperature: 4}``
==================  ==================================================================

The wall time that counts is the ``temperate`` run's (``summary.json``'s ``wall_time_s``,
which includes its teacher); the phase breakdown times the trainer's parts (teacher
training, pruning, logit cache, stage entry, epochs, evaluations, export).

Run::

    flock /work/wt/measure.lock python bench/quickstart.py --seeds 3 --threads 2 \\
        --out bench/results/quickstart.json
    python bench/quickstart.py --seeds 1 --methods temperate --set stages.1.epochs=3   # a variant
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
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from conftest import environment  # noqa: E402

import qtemperate.trainer as trainer_mod  # noqa: E402
from qtemperate.recipe import apply_overrides, parse_recipe  # noqa: E402
from qtemperate.training import loop as loop_mod  # noqa: E402

RECIPE = ROOT / "recipes" / "fashion_mnist_quickstart.yaml"
METHODS = ("temperate", "no_kd", "kd_fixed_t4")

_PHASES: dict[str, float] = defaultdict(float)
_CPU: dict[str, float] = defaultdict(float)


def _timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so its wall (and process CPU) time is added to ``_PHASES[label]``."""
    fn = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _PHASES[label] += time.perf_counter() - t0
            _CPU[label] += time.process_time() - c0

    setattr(owner, name, wrapper)


for _owner, _name, _label in [
    (trainer_mod, "build_datasets", "data"),
    (trainer_mod, "prepare_teacher", "teacher training"),
    (trainer_mod, "derive_student", "pruning (planner)"),
    (trainer_mod, "cache_teacher_logits", "teacher logit cache"),
    (trainer_mod, "enter_stage", "stage entry (quantize, calibrate, switch bits)"),
    (trainer_mod, "evaluate", "evaluation"),
    (trainer_mod, "save_training_checkpoint", "checkpoints"),
    (trainer_mod, "build_loggers", "logger start (W&B)"),
    (trainer_mod.Trainer, "_export", "ONNX export, check and timing"),
    (loop_mod.Distiller, "train_epoch", "distillation epochs"),
]:
    _timed(_owner, _name, _label)


def method_overrides(method: str, n_stages: int) -> list[str]:
    if method == "temperate":
        return []
    if method == "no_kd":
        return ["distillation.kd_weight=0"]
    if method == "kd_fixed_t4":
        sets = ["distillation.temperatures=[4.0]", "distillation.coupling=none"]
        sets += [f"stages.{i}.temperature={{schedule: constant, base_temperature: 4.0}}" for i in range(n_stages)]
        return sets
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def run(raw: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    recipe = parse_recipe(raw, source=raw["name"])
    _PHASES.clear()
    _CPU.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    summary = trainer_mod.Trainer(recipe, run_dir=run_dir, progress=False).run()
    phases = dict(_PHASES)
    phases["total (in-process)"] = time.perf_counter() - t0
    phases["cpu time (all threads)"] = time.process_time() - c0
    phases.update({f"cpu: {k}": v for k, v in _CPU.items()})
    return summary, phases


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std of the student's accuracy and its drop below its own teacher, per method."""
    agg: dict[str, Any] = {}
    base = {r["seed"]: r["student_acc"] for r in runs.get("kd_fixed_t4", [])}
    for method, rs in runs.items():
        if not rs:
            continue
        accs, drops = [r["student_acc"] for r in rs], [r["acc_drop"] for r in rs]
        paired = [r["student_acc"] - base[r["seed"]] for r in rs if r["seed"] in base]
        agg[method] = {
            "n": len(rs), "seeds": [r["seed"] for r in rs], "student_accs": accs,
            "student_acc_mean": statistics.fmean(accs), "student_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_drop_mean": statistics.fmean(drops), "acc_drop_max": max(drops),
            "teacher_acc_mean": statistics.fmean(r["teacher_acc"] for r in rs),
            "minus_kd_fixed_t4_mean": statistics.fmean(paired) if paired else None,
            "minus_kd_fixed_t4_std": statistics.stdev(paired) if len(paired) > 1 else None,
            "wall_time_s_mean": statistics.fmean(r["wall_time_s"] for r in rs),
            "compression_ratio": rs[0]["compression_ratio"],
        }
        a = agg[method]
        vs = "" if a["minus_kd_fixed_t4_mean"] is None else f"  vs KD T=4 {100 * a['minus_kd_fixed_t4_mean']:+.2f} pt"
        print(f"{method:<12} student {100 * a['student_acc_mean']:.2f} ± {100 * a['student_acc_std']:.2f}  "
              f"teacher {100 * a['teacher_acc_mean']:.2f}  drop mean {100 * a['acc_drop_mean']:+.2f} pt "
              f"(worst {100 * a['acc_drop_max']:+.2f}){vs}  wall {a['wall_time_s_mean']:.1f}s", flush=True)
    return agg


def merge(paths: list[Path], out: Path | None) -> int:
    parts = [json.loads(p.read_text()) for p in paths]
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for part in parts:
        for method, rs in part["runs"].items():
            runs[method].extend(rs)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    merged = {**parts[0], "merged_from": [str(p) for p in paths], "commands": [p["command"] for p in parts],
              "load_avg_before": [p["load_avg_before"] for p in parts],
              "load_avg_after": [p["load_avg_after"] for p in parts],
              "runs": dict(runs), "aggregate": aggregate(dict(runs))}
    if out is not None:
        out.write_text(json.dumps(merged, indent=2))
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="these seeds instead of 0..N-1")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only aggregate these result files (from runs split over processes) into --out")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (every method)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--runs-root", type=Path, default=Path("/tmp/qtemperate_quickstart_bench"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.merge:
        return merge(args.merge, args.out)
    base = yaml.safe_load(RECIPE.read_text())
    base = apply_overrides(base, args.overrides)
    n_stages = len(base["stages"])
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in (args.seed_list if args.seed_list is not None else range(args.seeds)):
        teacher_pt: Path | None = None
        for method in args.methods:
            raw = copy.deepcopy(base)
            raw["seed"] = seed
            raw["name"] = f"{method}_s{seed}"
            raw = apply_overrides(raw, method_overrides(method, n_stages))
            if method != "temperate" and teacher_pt is not None:
                raw["teacher"] = {"model": raw["teacher"]["model"], "kwargs": raw["teacher"].get("kwargs", {}),
                                  "checkpoint": str(teacher_pt)}
            run_dir = args.runs_root / raw["name"]
            summary, phases = run(raw, run_dir)
            if method == "temperate":
                teacher_pt = run_dir / "teacher.pt"
            rec = {"seed": seed, "phases_s": phases, "load_avg_after": os.getloadavg(), **{k: summary.get(k) for k in (
                "teacher_acc", "student_acc", "acc_drop", "compression_ratio", "student_bytes", "teacher_float_bytes",
                "params", "prune_ratio", "stages", "wall_time_s")}}
            runs[method].append(rec)
            print(f"[{time.perf_counter() - t_all:6.0f}s] seed {seed} {method:<12} teacher {summary['teacher_acc']:.4f} "
                  f"student {summary['student_acc']:.4f} (drop {100 * summary['acc_drop']:+.2f} pt) "
                  f"ratio 1/{1 / summary['compression_ratio']:.1f} wall {summary['wall_time_s']:.1f}s "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            if method == "temperate":
                print("   " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), flush=True)
    agg = aggregate(runs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "environment": environment(),
            "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
            "recipe": str(RECIPE.relative_to(ROOT)), "overrides": args.overrides,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "aggregate": agg, "runs": runs, "total_time_s": time.perf_counter() - t_all,
        }, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
