"""The ``qtemperate`` command line.

Verbs: ``run``, ``validate``, ``plan``, ``compare``, ``export``. Bad input (a recipe
field, a missing file, a class-count mismatch) prints one line naming the field or
file and exits 2 — before any training, and without touching an existing run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtemperate.recipe import Recipe, RecipeError, load_recipe

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input that is not a recipe field (a run folder, a flag)."""


def _fail(msg: str) -> int:
    print(f"qtemperate: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _fresh_run_dir(recipe: Recipe) -> Path:
    """``runs/<name>``, or ``runs/<name>-2``, ``-3``... when it already holds a run."""
    base = recipe.output_dir / recipe.name
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    lat = summary.get("onnx_latency_ms") or {}
    tlat = summary.get("teacher_onnx_latency_ms") or {}
    lines = [
        f"run:               {run_dir}",
        f"teacher accuracy:  {summary['teacher_acc']:.4f}",
        f"student accuracy:  {summary['student_acc']:.4f}  (drop {summary['acc_drop'] * 100:+.2f} pts)",
        f"size:              {summary['student_bytes'] / 1024:.1f} KiB vs teacher "
        f"{summary['teacher_float_bytes'] / 1024:.1f} KiB float  "
        f"(compression_ratio {summary['compression_ratio']:.4f} = 1/{1 / summary['compression_ratio']:.1f})",
        f"params / MACs:     {summary['params']:,} / {summary['macs'] or 0:,}",
    ]
    for st in summary.get("stages", []):
        lines.append(
            f"  stage {st['name']:<8} W{st['weight_bits']}A{st['act_bits']}  final T {st['final_T']:.2f}  "
            f"acc {st['accuracy']:.4f}  {st['bytes'] / 1024:.1f} KiB"
        )
    i8 = summary.get("int8_onnx_latency_ms") or {}
    for bs, ms in lat.items():
        t = tlat.get(bs)
        q = i8.get(bs)
        parts = [f"student.onnx {ms:.3f} ms"]
        if q is not None:
            parts.append(f"int8 kernels {q:.3f} ms")
        if t is not None:
            parts.append(f"float teacher {t:.3f} ms")
            if q:
                parts.append(f"int8 speed-up {t / q:.2f}x")
        lines.append(f"onnx latency b{bs}:".ljust(19) + "  ".join(parts))
    if summary.get("onnx_bytes"):
        lines.append(
            f"onnx file:         {summary['onnx_bytes'] / 1024:.1f} KiB on disk "
            "(graph and quantizer nodes on top of the params x bits above)"
        )
    if summary.get("onnx_top1_agreement") is not None:
        lines.append(f"onnx agreement:    {summary['onnx_top1_agreement'] * 100:.2f}% top-1 vs PyTorch")
    from qtemperate.export.report import deployment_lines

    lines.extend(deployment_lines(summary))
    lines.append(f"wall time:         {summary['wall_time_s']:.1f} s")
    print("\n".join(lines))


def cmd_run(args: argparse.Namespace) -> int:
    from qtemperate.preflight import preflight

    recipe = load_recipe(args.recipe, args.set or [])
    preflight(recipe)
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        run_dir = recipe.output_dir / recipe.name
    else:
        run_dir = _fresh_run_dir(recipe)
    if args.resume and not (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").is_file():
        raise UsageError(f"--resume: no checkpoint in {run_dir}")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"--run-dir {run_dir} already holds a run; use --resume or another folder")
    from qtemperate.trainer import Trainer, TrainingDiverged

    if args.offline:
        os.environ["WANDB_MODE"] = "offline"
    trainer = Trainer(recipe, run_dir=run_dir, resume=args.resume, progress=not args.no_progress)
    t0 = time.perf_counter()
    try:
        summary = trainer.run()
    except TrainingDiverged as exc:
        print(f"qtemperate: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary, run_dir)
    print(f"(this invocation: {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qtemperate.preflight import preflight

    bad = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.set or [])
            if args.check_files:
                preflight(recipe)
            print(f"ok: {path} ({len(recipe.stages)} stages, {recipe.total_epochs} epochs)")
        except RecipeError as exc:
            print(f"qtemperate: error: {exc}", file=sys.stderr)
            bad += 1
    return EXIT_BAD_INPUT if bad else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qtemperate.planner import plan_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    result = plan_recipe(recipe)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"plan for {recipe.name}: teacher {result['teacher']['model']} "
          f"{result['teacher']['params']:,} params, {result['teacher']['macs'] or 0:,} MACs, "
          f"{result['teacher_float_bytes'] / 2**20:.2f} MiB float")
    print(f"student: prune_ratio {result['prune_ratio']}, {result['params']:,} params, "
          f"{result['macs'] or 0:,} MACs")
    print(f"{'stage':<10}{'bits':<8}{'params':>12}{'MACs':>16}{'bytes':>14}{'ratio':>10}")
    for st in result["stages"]:
        bits = f"W{st['weight_bits']}A{st['act_bits']}"
        print(f"{st['name']:<10}{bits:<8}{st['params']:>12,}"
              f"{st['macs'] or 0:>16,}{st['bytes']:>14,.0f}{st['compression_ratio']:>10.4f}")
    print(f"compression_ratio {result['compression_ratio']:.4f} (target {recipe.student.target_size_ratio}); "
          f"planned in {result['seconds']:.1f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qtemperate.compare import compare_runs, pareto_plot

    rows = compare_runs(args.run_dirs)
    print(f"{'run':<32}{'teacher':>9}{'student':>9}{'drop':>8}{'ratio':>9}{'KiB':>10}{'b1 ms':>9}{'pareto':>8}")
    for r in rows:
        lat = r.get("latency_b1_ms")
        print(f"{r['run']:<32}{r['teacher_acc']:>9.4f}{r['student_acc']:>9.4f}{r['acc_drop'] * 100:>7.2f}%"
              f"{r['compression_ratio']:>9.4f}{r['student_bytes'] / 1024:>10.1f}"
              f"{(f'{lat:.3f}' if lat is not None else '-'):>9}{('*' if r['pareto'] else ''):>8}")
    if not args.no_plot:
        out = pareto_plot(rows, args.out)
        print(f"pareto plot: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qtemperate.compare import export_run

    report = export_run(Path(args.run_dir), batch_sizes=tuple(args.batch_sizes))
    print(json.dumps(report, indent=2))
    from qtemperate.export.report import deployment_warnings

    for line in deployment_warnings(report):
        print(line, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtemperate",
        description="Prune, quantize (Brevitas QAT in bit-width stages) and distill with dynamic, "
        "multi-scale temperatures — from one YAML recipe.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe end to end")
    r.add_argument("recipe")
    r.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe field (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue runs/<name> from its last checkpoint")
    r.add_argument("--run-dir", help="output folder (default runs/<name>, or a fresh -N suffix)")
    r.add_argument("--offline", action="store_true", help="force W&B offline mode")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="validate recipes (schema; --check-files also checks data and checkpoints)")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    v.add_argument("--check-files", action="store_true")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="dry run: sizes per stage without data or training")
    pl.add_argument("recipe")
    pl.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("compare", help="table and size-vs-accuracy Pareto plot of runs")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="pareto.png")
    c.add_argument("--no-plot", action="store_true")
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="re-export a run's student to ONNX, verify and time it")
    e.add_argument("run_dir")
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qtemperate`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (RecipeError, UsageError) as exc:
        return _fail(str(exc))
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("qtemperate: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
