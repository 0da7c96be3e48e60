"""The ``qtemperate`` command line.

Verbs: ``run``, ``validate``, ``plan``, ``compare``, ``sweep``, ``export``. Every failure prints
one line and exits with the code :mod:`qtemperate.errors` documents: 2 for bad input
(a recipe field, a missing or malformed file, a class-count mismatch — before any
training, without touching an existing run), 3 for the environment (disk full,
permission denied, a run folder in use), 4 for a diverged run, 130/143 for Ctrl-C /
SIGTERM (the last checkpoint is kept), 1 only for a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qtemperate.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    BadInput,
    Interrupted,
    QtemperateWarning,
    Terminated,
    UsageError,
    classify,
    one_line,
)
from qtemperate.recipe import RecipeError, load_recipe

__all__ = ["UsageError", "main"]

_IMPORTED = time.perf_counter()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _seconds_since_start() -> float:
    """Wall time since this process started, imports included (Linux ``/proc``; elsewhere
    since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``): the run unwinds as on
    Ctrl-C, a checkpoint being written is finished or discarded, never half-written."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
                parts.append(f"int8 student vs float teacher x{t / q:.2f}")
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


def _need_matplotlib(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{what} needs matplotlib: pip install 'qtemperate[plot]'")


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"qtemperate: warning: {line}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from qtemperate.preflight import (
        ProtocolWarning,
        degenerate_settings,
        preflight,
        validation_warnings,
    )
    from qtemperate.run_dir import check_allow_changes, claim_fresh, claim_run_dir

    recipe = load_recipe(args.recipe, args.set or [])
    allow = check_allow_changes(args.allow_change or [])
    if allow and not args.resume:
        raise UsageError("--allow-change only applies with --resume")
    preflight(recipe)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for message in degenerate_settings(recipe):
            warnings.warn(message, QtemperateWarning, stacklevel=1)
        _warn(validation_warnings(recipe))
    # printed above as one line; not again from inside the run
    warnings.filterwarnings("ignore", category=ProtocolWarning)
    if args.offline:
        os.environ["WANDB_MODE"] = "offline"
    from qtemperate.trainer import Trainer, TrainingDiverged
    from qtemperate.training.distributed import env_rank, env_world_size
    from qtemperate.training.resume import describe_kept

    default = recipe.output_dir / recipe.name
    if args.nproc != 1:  # the launcher: decide the folder once, then start the N processes on it
        from qtemperate.launch import check_launch, launch_run

        check_launch(args, recipe)  # before a folder is claimed: a refused launch leaves none
        if args.run_dir or args.resume:
            run_dir = Path(args.run_dir or default)
        else:
            with claim_fresh(default) as folder:  # race-free "next free folder", left empty for rank 0
                run_dir = folder.path
        return launch_run(args, recipe, run_dir)
    if env_world_size() > 1:  # one of torchrun's processes: rank 0 owns the folder inside the run
        run_dir = Path(args.run_dir or default)
        trainer = Trainer(recipe, run_dir=run_dir, resume=args.resume, progress=not args.no_progress,
                          tracking_mode="offline" if args.offline else None, allow_changes=allow)
        t0 = time.perf_counter()
        try:
            summary = trainer.run()
        except Exception as exc:
            from qtemperate.launch import exit_code_for

            code = exit_code_for(exc)  # None: not a run failure it reports (bad input, a bug)
            if code is None:
                raise
            return code
        if env_rank() != 0:
            return 0  # rank 0 prints the summary
        _print_summary(summary, run_dir)
        print(f"(this invocation: {time.perf_counter() - t0:.1f} s)")
        return 0

    with _sigterm_unwinds():
        if args.run_dir or args.resume:
            folder = claim_run_dir(Path(args.run_dir or default), resume=args.resume)
        else:
            folder = claim_fresh(default)
        with folder:
            run_dir = folder.path
            trainer = Trainer(recipe, run_dir=run_dir, resume=args.resume, progress=not args.no_progress,
                              tracking_mode="offline" if args.offline else None, allow_changes=allow)
            t0 = time.perf_counter()
            resume = f"qtemperate run {args.recipe} --resume --run-dir {run_dir}"
            try:
                summary = trainer.run()
            except KeyboardInterrupt as exc:
                code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
                what = "terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted"
                kept = describe_kept(run_dir, recipe.total_epochs)
                raise Interrupted(f"{what}; kept in {run_dir}: {kept}; continue with: {resume}", code) from None
            except TrainingDiverged as exc:
                kept = describe_kept(run_dir, recipe.total_epochs)
                reuse = run_dir / "teacher.pt"
                hint = f"; a new run can reuse its teacher: teacher.checkpoint: {reuse}" if reuse.is_file() else ""
                exc.args = (f"{exc}; kept in {run_dir}: {kept}{hint}",)
                raise
    _print_summary(summary, run_dir)
    print(f"(this invocation: {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qtemperate.preflight import degenerate_settings, preflight, validation_warnings

    bad = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.set or [])
            if args.check_files:
                preflight(recipe)
            for message in degenerate_settings(recipe):
                warnings.warn(f"{path}: {message}", QtemperateWarning, stacklevel=1)
            print(f"ok: {path} ({len(recipe.stages)} stages, {recipe.total_epochs} epochs)")
            _warn([f"{path}: {w}" for w in validation_warnings(recipe)])
        except (RecipeError, BadInput, FileNotFoundError) as exc:
            print(f"qtemperate: error: {one_line(exc)}", file=sys.stderr)
            bad += 1
    return EXIT_BAD_INPUT if bad else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qtemperate.planner import plan_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    if args.plot:
        _need_matplotlib("--plot")
    try:
        result = plan_recipe(recipe)
    except ValueError as exc:  # an unreachable target names its field
        raise BadInput(str(exc)) from None
    result["wall_seconds"] = _seconds_since_start()
    if args.plot:
        from qtemperate.plots import schedule_figure

        title = recipe.name + (f" (hardware: {recipe.hardware})" if recipe.hardware else "")
        png = schedule_figure(result["schedule"], args.plot, title=title,
                              reference_temperatures=result["reference_temperatures"])
        print(f"schedule plot: {png} (no validation feedback: see the note in the figure)",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for note in result["switches"]:
        print(note)
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
          f"planned in {result['seconds']:.1f} s ({result['wall_seconds']:.1f} s since the command started)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qtemperate.compare import compare_runs, format_table, log_comparison, pareto_plot

    axis = _pareto_axis(args)
    rows = compare_runs(args.run_dirs, allow_mixed=args.allow_mixed, **axis)
    print(format_table(rows, **axis))
    out = None
    if not args.no_plot:
        _need_matplotlib("the Pareto plot (or pass --no-plot)")
        out = pareto_plot(rows, args.out, x=axis["pareto_over"], runtime=axis["runtime"], batch=axis["batch"])
        print(f"pareto plot: {out}")
    if args.log_to_wandb:
        if args.offline:
            os.environ["WANDB_MODE"] = "offline"
        wandb_dir = Path(args.wandb_dir) if args.wandb_dir else Path(args.out).resolve().parent
        lg = log_comparison(rows, out, wandb_dir, project=args.project, group=args.group,
                            name=args.name or "comparison", **axis)
        if lg.run_file is None:
            raise UsageError("--log-to-wandb: W&B could not start a run (see the warning above)")
        print(f"comparison logged to W&B: {lg.url or lg.run_file}")
    return 0


def _pareto_axis(args: argparse.Namespace) -> dict[str, str]:
    """``--pareto-over`` / ``--latency-runtime`` / ``--latency-batch`` as compare's keywords."""
    return {"pareto_over": args.pareto_over, "runtime": args.latency_runtime, "batch": args.latency_batch}


def _add_pareto_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pareto-over", choices=["size", "latency"], default="size",
                        help="the front's axis beside accuracy: compression ratio, or the deployed student's "
                        "latency (default size)")
    parser.add_argument("--latency-runtime", choices=["ort", "openvino"], default="ort",
                        help="with --pareto-over latency: onnxruntime (ort, default) or OpenVINO")
    parser.add_argument("--latency-batch", choices=["1", "max"], default="1",
                        help="with --pareto-over latency: batch 1 (default) or the largest batch timed")


def cmd_sweep(args: argparse.Namespace) -> int:
    from qtemperate.sweep import (
        create_wandb_sweep,
        parse_grid,
        plan_sweep,
        run_sweep,
        wandb_sweep_config,
    )

    axes = parse_grid(args.grid or [])
    sweep = plan_sweep(args.recipe, axes, args.set or [], name=args.name)
    base = sweep.points[0].recipe
    if args.wandb_sweep:
        import yaml

        config = wandb_sweep_config(sweep)
        if args.dry_run:
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        sweep_id = create_wandb_sweep(config, project=base.tracking.project, entity=args.entity)
        where = "/".join(p for p in (args.entity, base.tracking.project, sweep_id) if p)
        print(f"W&B sweep {sweep_id} created ({len(sweep.points)} points, group {sweep.name}); "
              f"start agents with: wandb agent {where}")
        return 0
    print(f"sweep {sweep.name}: {len(sweep.points)} points in {sweep.folder}")
    if args.dry_run:
        for p in sweep.points:
            print(f"  {p.run_dir.name}: --set {' '.join(p.overrides)}")
        return 0
    if args.offline:
        os.environ["WANDB_MODE"] = "offline"
    from qtemperate.preflight import ProtocolWarning, validation_warnings

    _warn(validation_warnings(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProtocolWarning)
        run_sweep(sweep, progress=not args.no_progress, **_pareto_axis(args))
    failed = [p for p in sweep.points if p.status == "failed"]
    if failed:
        print(f"qtemperate: {len(failed)} point(s) diverged: {', '.join(p.run_dir.name for p in failed)}",
              file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qtemperate.compare import export_run
    from qtemperate.run_dir import claim_run_dir

    with _sigterm_unwinds(), claim_run_dir(Path(args.run_dir), purpose="export"):
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
    r.add_argument("--set", action="extend", nargs="+", metavar="KEY.PATH=VALUE",
                   help="override recipe fields (repeatable; several per --set)")
    r.add_argument("--resume", action="store_true", help="continue runs/<name> from its last checkpoint")
    r.add_argument("--run-dir", help="output folder (default runs/<name>, or a fresh -N suffix)")
    r.add_argument("--allow-change", action="append", metavar="FIELD",
                   help="with --resume: accept a changed recipe field that cannot change results "
                   "(data.num_workers, tracking.*, export.*; repeatable)")
    r.add_argument("--offline", action="store_true", help="force W&B offline mode (wins over tracking.mode)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel over N local processes (as torchrun --nproc_per_node N); "
                   "data.batch_size stays the global batch")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="validate recipes (schema; --check-files also checks data and checkpoints)")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    v.add_argument("--check-files", action="store_true")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="dry run: sizes per stage without data or training")
    pl.add_argument("recipe")
    pl.add_argument("--set", action="extend", nargs="+", metavar="KEY.PATH=VALUE")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--plot", metavar="PNG", help="draw temperatures and bits per epoch (no validation feedback)")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("compare", help="table and size- or latency-vs-accuracy Pareto plot of runs (folders, "
                       "W&B files, or entity/project[/group] online)")
    c.add_argument("run_dirs", nargs="+", metavar="SOURCE",
                   help="a run folder, a W&B run folder/file (offline), or [wandb:]entity/project[/group]")
    c.add_argument("--out", default="pareto.png")
    c.add_argument("--no-plot", action="store_true")
    c.add_argument("--allow-mixed", action="store_true",
                   help="accept runs of different datasets or teachers (one front per group)")
    c.add_argument("--log-to-wandb", action="store_true", help="log the table and the plot as a W&B run")
    c.add_argument("--project", default="qtemperate", help="W&B project of --log-to-wandb")
    c.add_argument("--group", help="W&B group of --log-to-wandb")
    c.add_argument("--name", help="W&B run name of --log-to-wandb (default: comparison)")
    c.add_argument("--wandb-dir", help="folder of the W&B run files (default: the plot's folder)")
    c.add_argument("--offline", action="store_true", help="force W&B offline mode")
    _add_pareto_options(c)
    c.set_defaults(func=cmd_compare)

    sw = sub.add_parser("sweep", help="run a recipe over a grid of --set values (one W&B group), then compare")
    sw.add_argument("recipe")
    sw.add_argument("--grid", action="append", metavar="KEY.PATH=V1,V2,...",
                    help="an axis of the grid (repeatable; values are YAML)")
    sw.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override for every point")
    sw.add_argument("--name", help="sweep name: W&B group and folder (default <recipe>-sweep-<digest>)")
    sw.add_argument("--dry-run", action="store_true", help="list the points (with --wandb-sweep: print its config)")
    sw.add_argument("--wandb-sweep", action="store_true",
                    help="create a W&B sweep (online) whose agents run `qtemperate run --set ...` per point")
    sw.add_argument("--entity", help="W&B entity of --wandb-sweep")
    sw.add_argument("--offline", action="store_true", help="force W&B offline mode")
    sw.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_pareto_options(sw)
    sw.set_defaults(func=cmd_sweep)

    e = sub.add_parser("export", help="re-export a run's student to ONNX, verify and time it")
    e.add_argument("run_dir")
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    e.set_defaults(func=cmd_export)
    return p


def _one_line_warnings(previous: Any) -> Any:
    """A ``warnings.showwarning`` printing qtemperate's own warnings as one line each;
    other libraries' warnings keep their format."""

    def show(message: Any, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if issubclass(category, QtemperateWarning):
            print(f"qtemperate: warning: {one_line(message)}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qtemperate`` console script; the exit codes are
    :mod:`qtemperate.errors`'s (0 ok, 1 bug, 2 bad input, 3 environment, 4 diverged,
    130 Ctrl-C, 143 SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous)
    try:
        return int(args.func(args))
    except SystemExit:
        raise
    except BaseException as exc:  # every failure ends here: one line and its exit code
        code, message, trace = classify(exc)
        if trace:  # a bug: the traceback is the report
            traceback.print_exc()
    finally:
        warnings.showwarning = previous
    prefix = "qtemperate: " if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) else "qtemperate: error: "
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun every process meets the same bad input
        print(prefix + message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
