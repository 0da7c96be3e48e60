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
``temperate_frozen`` (only when asked) the recipe with every stage's
                    ``freeze_act_ranges_at: 0.5``: activation ranges fixed for the second
                    half of each QAT stage (faster steps; measured for accuracy)
==================  ==================================================================

The wall time that counts is the ``temperate`` run's (``summary.json``'s ``wall_time_s``,
which includes its teacher); the phase breakdown times the trainer's parts (teacher
training, pruning, logit cache, stage entry, epochs, evaluations, export).

Run::

    flock /work/wt/measure.lock python bench/quickstart.py --seeds 3 --threads 2 \\
        --out bench/results/quickstart.json
    python bench/quickstart.py --seeds 1 --methods temperate --set stages.1.epochs=3   # a variant

All 9 runs (3 seeds x 3 methods) at once on a 16-core machine, each run in its own process
pinned to its own cores (``os.sched_setaffinity``) with as many torch threads, on the CPU
even where CUDA is present, JSONL logging only (no W&B needed), no network::

    python bench/quickstart.py --parallel 8 --cores-per-run 2 --seeds 3 --loggers jsonl \
        --data-root /path/to/fashion-mnist --out bench/results/quickstart.json

The three ``temperate`` runs go first (they train the teachers, and their wall time is the
figure that counts); each seed's baselines start as soon as its teacher exists. Per-run logs
and result parts go under ``--runs-root``; the merged JSON has every run's teacher/student
accuracy, drop, ratio, wall and CPU time and its cores, and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
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
METHODS = ("temperate", "no_kd", "kd_fixed_t4", "temperate_frozen")
DEFAULT_METHODS = METHODS[:3]

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
    if method == "temperate_frozen":  # the recipe, activation ranges frozen for the 2nd half of each QAT stage
        return [f"stages.{i}.freeze_act_ranges_at=0.5" for i in range(n_stages)]
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


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table of every run, then mean ± std per method (for ``bench/RESULTS.md``)."""

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.1f}"

    def ms(xs: list[float | None]) -> str:
        v = [x for x in xs if x is not None]
        if not v:
            return ""
        return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"

    def cpu(r: dict[str, Any]) -> float | None:
        return r.get("phases_s", {}).get("cpu time (all threads)")

    lines = ["| method | seed | teacher % | student % | student − teacher pt | size ratio | run wall s "
             "| process wall s | CPU s | cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for method, rs in runs.items():
        for r in rs:
            lines.append(f"| {method} | {r['seed']} | {100 * r['teacher_acc']:.2f} | {100 * r['student_acc']:.2f} | "
                         f"{-100 * r['acc_drop']:+.2f} | 1/{1 / r['compression_ratio']:.1f} | {f(r['wall_time_s'])} | "
                         f"{f(r.get('process_wall_s'))} | {f(cpu(r))} | {r.get('cpus', '')} |")
    for method, rs in runs.items():
        if rs:
            lines.append(f"| **{method}** mean ± std | {len(rs)} seeds | {ms([100 * r['teacher_acc'] for r in rs])} | "
                         f"{ms([100 * r['student_acc'] for r in rs])} | {ms([-100 * r['acc_drop'] for r in rs])} | "
                         f"1/{1 / rs[0]['compression_ratio']:.1f} | {ms([r['wall_time_s'] for r in rs])} | "
                         f"{ms([r.get('process_wall_s') for r in rs])} | {ms([cpu(r) for r in rs])} | |")
    return "\n".join(lines)


def merge(paths: list[Path], out: Path | None, process_wall: dict[str, float] | None = None) -> int:
    """Aggregate result files; ``process_wall`` (run name → seconds) adds each worker process's wall time."""
    parts = [json.loads(p.read_text()) for p in paths]
    for part in parts:
        for method, rs in part["runs"].items():
            for r in rs:
                if process_wall and f"{method}_s{r['seed']}" in process_wall:
                    r["process_wall_s"] = process_wall[f"{method}_s{r['seed']}"]
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for part in parts:
        for method, rs in part["runs"].items():
            runs[method].extend(rs)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    runs = defaultdict(list, sorted(runs.items(), key=lambda kv: METHODS.index(kv[0]) if kv[0] in METHODS else 99))
    merged = {**parts[0], "merged_from": [str(p) for p in paths], "commands": [p["command"] for p in parts],
              "load_avg_before": [p["load_avg_before"] for p in parts],
              "load_avg_after": [p["load_avg_after"] for p in parts],
              "runs": dict(runs), "aggregate": aggregate(dict(runs))}
    print(table(dict(runs)))
    if out is not None:
        out.write_text(json.dumps(merged, indent=2))
        print(f"wrote {out}")
    return 0


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run gets: device, loggers, data folder, then the user's ``--set``."""
    sets = [f"device={args.device}"]
    if args.loggers:
        sets.append(f"tracking.loggers=[{', '.join(args.loggers)}]")
    if args.data_root is not None:
        sets.append(f"data.root={json.dumps(str(args.data_root.resolve()))}")
    return sets + list(args.overrides)


def parallel(args: argparse.Namespace, seeds: list[int]) -> int:
    """Run every (seed, method) in its own pinned process, ``args.parallel`` at a time, then merge."""
    if not hasattr(os, "sched_setaffinity"):
        print("--parallel needs os.sched_setaffinity (Linux)", file=sys.stderr)
        return 2
    cpus = _one_cpu_per_core(sorted(os.sched_getaffinity(0)))
    k = args.cores_per_run
    if args.parallel * k > len(cpus):
        print(f"--parallel {args.parallel} x --cores-per-run {k} needs {args.parallel * k} cores; "
              f"this process may use {len(cpus)}: {cpus}", file=sys.stderr)
        return 2
    slots = [cpus[i * k:(i + 1) * k] for i in range(args.parallel)]
    logs, parts = args.runs_root / "logs", args.runs_root / "parts"
    for d in (logs, parts):
        d.mkdir(parents=True, exist_ok=True)
    # temperate first (it trains the seed's teacher); a baseline waits for its seed's teacher
    pending = [(s, m) for m in args.methods for s in seeds]
    pending.sort(key=lambda sm: sm[1] != "temperate")
    running: dict[tuple[int, str], tuple[subprocess.Popen[bytes], list[int], float]] = {}
    done: dict[tuple[int, str], int] = {}
    walls: dict[str, float] = {}
    free = list(range(len(slots)))
    t_all = time.perf_counter()
    load_before = os.getloadavg()
    forwarded = [a for o in args.overrides for a in ("--set", o)]
    if args.loggers:
        forwarded += ["--loggers", *args.loggers]
    if args.data_root is not None:
        forwarded += ["--data-root", str(args.data_root.resolve())]
    while pending or running:
        for job in list(pending):
            if not free:
                break
            seed, method = job
            teacher: list[str] = []
            if method != "temperate" and "temperate" in args.methods:
                dep = done.get((seed, "temperate"))
                if dep is None:
                    continue  # its teacher is still training
                if dep != 0:
                    pending.remove(job)
                    done[job] = -1
                    print(f"[{time.perf_counter() - t_all:6.0f}s] seed {seed} {method}: skipped, its temperate run failed",
                          flush=True)
                    continue
                teacher = ["--teacher-checkpoint", str(args.runs_root / f"temperate_s{seed}" / "teacher.pt")]
            slot = free.pop(0)
            name = f"{method}_s{seed}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--seed-list", str(seed), "--methods", method,
                   "--threads", str(k), "--runs-root", str(args.runs_root), "--out", str(parts / f"{name}.json"),
                   "--device", args.device, "--cpus", ",".join(map(str, slots[slot])), *teacher, *forwarded]
            env = {**os.environ, "OMP_NUM_THREADS": str(k), "MKL_NUM_THREADS": str(k)}
            if args.device == "cpu":  # a CPU figure: no CUDA context (seeding touches CUDA where it is visible)
                env["CUDA_VISIBLE_DEVICES"] = ""
            with open(logs / f"{name}.log", "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                        preexec_fn=lambda cores=slots[slot]: os.sched_setaffinity(0, cores))
            running[job] = (proc, slots[slot], time.perf_counter())
            pending.remove(job)
            print(f"[{time.perf_counter() - t_all:6.0f}s] start {name} on cores {slots[slot]}", flush=True)
        time.sleep(0.5)
        for job, (proc, cores, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[job]
            done[job] = rc
            walls[f"{job[1]}_s{job[0]}"] = time.perf_counter() - t0
            free.append(slots.index(cores))
            name = f"{job[1]}_s{job[0]}"
            tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
            print(f"[{time.perf_counter() - t_all:6.0f}s] {'done' if rc == 0 else f'FAILED (exit {rc})'} {name} "
                  f"in {time.perf_counter() - t0:.0f}s: {tail[-1] if rc == 0 and tail else ''}", flush=True)
            if rc != 0:
                print("\n".join("    " + line for line in tail[-15:]), file=sys.stderr, flush=True)
    ok = [parts / f"{m}_s{s}.json" for (s, m), rc in sorted(done.items()) if rc == 0]
    print(f"{len(ok)}/{len(done)} runs succeeded in {time.perf_counter() - t_all:.0f}s; "
          f"load average before {load_before}, after {os.getloadavg()}", flush=True)
    if ok:
        merge(ok, args.out, walls)
        if args.out is not None:
            merged = json.loads(args.out.read_text())
            merged.update({"parallel": args.parallel, "cores_per_run": k, "cpus_available": cpus,
                           "parallel_load_avg_before": load_before, "parallel_load_avg_after": os.getloadavg(),
                           "parallel_total_time_s": time.perf_counter() - t_all,
                           "driver_command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
                           "lscpu": _lscpu()})
            args.out.write_text(json.dumps(merged, indent=2))
    return 0 if len(ok) == len(done) else 1


def _one_cpu_per_core(cpus: list[int]) -> list[int]:
    """One logical CPU per physical core (SMT siblings left idle), so a run's cores are real cores.

    Reads ``/sys/devices/system/cpu/cpuN/topology/thread_siblings_list``; where that is
    missing, every CPU counts as a core.
    """
    seen: set[tuple[int, ...]] = set()
    out = []
    for c in cpus:
        try:
            text = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return cpus
        sib: list[int] = []
        for part in text.split(","):
            a, _, b = part.partition("-")
            sib += list(range(int(a), int(b or a) + 1))
        key = tuple(sorted(sib))
        if key not in seen:
            seen.add(key)
            out.append(c)
    if len(out) < len(cpus):
        print(f"SMT: using one logical CPU per physical core: {out} (of {cpus})", flush=True)
    return out


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="these seeds instead of 0..N-1")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only aggregate these result files (from runs split over processes) into --out")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (every method)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--runs-root", type=Path, default=Path("/tmp/qtemperate_quickstart_bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--parallel", type=int, default=0,
                   help="run every (seed, method) in its own process, this many at a time (0: one after another here)")
    p.add_argument("--cores-per-run", type=int, default=2, help="with --parallel: cores pinned and torch threads per run")
    p.add_argument("--loggers", nargs="+", default=None, help="tracking.loggers for every run (e.g. jsonl: no W&B)")
    p.add_argument("--data-root", type=Path, default=None, help="folder of the Fashion-MNIST IDX files (data.root)")
    p.add_argument("--device", default="cpu", help="recipe device for every run (default cpu, even where CUDA is)")
    p.add_argument("--cpus", default=None, help=argparse.SUPPRESS)  # a --parallel worker's pinned cores
    p.add_argument("--teacher-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.merge:
        return merge(args.merge, args.out)
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if args.parallel:
        if args.threads is None:
            args.threads = args.cores_per_run
        return parallel(args, seeds)
    base = yaml.safe_load(RECIPE.read_text())
    base = apply_overrides(base, common_overrides(args))
    ckpt = base["teacher"].get("checkpoint")
    if ckpt is not None and not Path(ckpt).is_absolute():  # the shipped teacher, beside the recipe
        base["teacher"]["checkpoint"] = str(RECIPE.parent / ckpt)
    n_stages = len(base["stages"])
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in seeds:
        teacher_pt: Path | None = args.teacher_checkpoint
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
            rec = {"seed": seed, "phases_s": phases, "cpus": sorted(os.sched_getaffinity(0)),
                   "torch_threads": torch.get_num_threads(), "load_avg_after": os.getloadavg(), **{k: summary.get(k) for k in (
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
