"""Sweeps: a recipe run over a grid of ``--set`` overrides, here or as a W&B sweep.

``qtemperate sweep RECIPE --grid key=v1,v2 [--grid key2=...] [--set ...] [--name NAME]``

* Grid values are YAML, as ``--set`` values are; commas inside brackets, braces or
  quotes do not split (``--grid distillation.temperatures=[4.0],[6.0,3.0,1.0]``).
* Every point is validated before anything runs: a key that does not exist or a
  bad value is one line naming the point and the field (:class:`RecipeError`); an
  empty or malformed grid is a :class:`~qtemperate.cli.UsageError`.
* Points run in sequence, each a normal run in
  ``<output_dir>/<sweep>/<NN>-<key=value,...>``, all in one W&B group (the sweep's
  name; tag ``sweep:<name>``). The default name is ``<recipe>-sweep-<digest>``,
  the digest of the resolved recipe and the grid, so the same command finds the
  same folder: finished points (``summary.json``) are skipped and a killed one
  resumes from its checkpoint. ``sweep.json`` in the folder records the grid and
  each point's state; a folder that holds another sweep is refused.
* It ends with the comparison table (size, accuracy, and the deployed student's latency
  and speed-up over the float teacher in onnxruntime and OpenVINO) and the Pareto plot
  (``<sweep>/pareto.png``, over size or ``--pareto-over latency``), logged to W&B as a
  comparison run of the group when the recipe logs to W&B.
* :func:`wandb_sweep_config` is the same grid as a W&B sweep whose agents run
  ``qtemperate run RECIPE --set key=value ...`` for each point (``--wandb-sweep``,
  online; :func:`create_wandb_sweep`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qtemperate.cli import UsageError
from qtemperate.recipe import Recipe, RecipeError, load_recipe, parse_recipe

__all__ = [
    "GridAxis",
    "Sweep",
    "SweepPoint",
    "create_wandb_sweep",
    "parse_grid",
    "plan_sweep",
    "run_sweep",
    "split_values",
    "wandb_sweep_config",
]

MANIFEST = "sweep.json"


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid key=v1,v2`` axis: the recipe key and its values (as typed, and parsed)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass
class SweepPoint:
    """One point of the grid: its ``key=value`` overrides, recipe and run folder."""

    index: int
    overrides: list[str]
    recipe: Recipe
    run_dir: Path
    status: str = "pending"  # pending | finished | skipped | failed


@dataclass
class Sweep:
    """A validated sweep: every point's recipe and folder, before anything runs."""

    name: str
    folder: Path
    recipe_path: Path
    base_overrides: list[str]
    axes: list[GridAxis]
    points: list[SweepPoint]
    digest: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    plot: Path | None = None

    def manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": str(self.recipe_path),
            "set": self.base_overrides,
            "grid": [{"key": a.key, "values": list(a.texts)} for a in self.axes],
            "digest": self.digest,
            "points": [
                {"index": p.index, "overrides": p.overrides, "run_dir": str(p.run_dir), "status": p.status}
                for p in self.points
            ],
        }


# --------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_grid(specs: Sequence[str]) -> list[GridAxis]:
    """The axes of ``--grid key.path=v1,v2,...`` specs.

    Raises:
        UsageError: no spec, a spec without ``=`` or values, an empty value, a value
            that is not YAML, or a key given twice.
    """
    if not specs:
        raise UsageError("an empty grid: give at least one --grid key.path=v1,v2,...")
    axes: list[GridAxis] = []
    for spec in specs:
        key, eq, rest = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--grid {spec!r}: expected key.path=v1,v2,...")
        texts = split_values(rest)
        if not rest.strip():
            raise UsageError(f"--grid {key}: an empty grid (no values)")
        if any(t == "" for t in texts):
            raise UsageError(f"--grid {key}: an empty value in {rest!r}")
        if any(a.key == key for a in axes):
            raise UsageError(f"--grid {key}: given twice")
        try:
            values = tuple(yaml.safe_load(t) for t in texts)
        except yaml.YAMLError as exc:
            raise UsageError(f"--grid {key}: a value is not valid YAML ({exc.__class__.__name__})") from None
        axes.append(GridAxis(key, tuple(texts), values))
    return axes


def _slug(overrides: Sequence[tuple[str, str]]) -> str:
    """``leaf=value,...`` for a folder name: ``[6.0, 3.0, 1.0]`` reads ``6.0+3.0+1.0``."""
    values = [re.sub(r"[\[\]{}'\" ]", "", v).replace(",", "+") for _, v in overrides]
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for (k, _), v in zip(overrides, values))
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_")[:80] or "point"


def _digest(base: Recipe, axes: Sequence[GridAxis]) -> str:
    blob = json.dumps({"recipe": base.model_dump(mode="json"), "grid": [(a.key, a.texts) for a in axes]},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:6]


def plan_sweep(
    recipe_path: str | Path,
    axes: Sequence[GridAxis],
    base_overrides: Sequence[str] = (),
    name: str | None = None,
) -> Sweep:
    """Validate every point of the grid and assign its folder; nothing runs.

    Args:
        recipe_path: The recipe file.
        axes: :func:`parse_grid`'s axes.
        base_overrides: ``--set`` overrides applied to every point (before the grid's).
        name: Sweep name (W&B group and folder); default ``<recipe>-sweep-<digest>``.

    Raises:
        RecipeError: the recipe, or one point (naming it and the field).
        UsageError: an empty grid, a bad name, or a folder holding another sweep.
    """
    if not axes:
        raise UsageError("an empty grid: give at least one --grid key.path=v1,v2,...")
    base = load_recipe(recipe_path, base_overrides)
    digest = _digest(base, axes)
    name = name or f"{base.name}-sweep-{digest}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise UsageError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    folder = base.output_dir / name
    combos = list(itertools.product(*[list(zip(itertools.repeat(a.key), a.texts)) for a in axes]))
    width = max(2, len(str(len(combos) - 1)))
    raw = yaml.safe_load(Path(recipe_path).read_text())
    points = []
    for i, combo in enumerate(combos):
        overrides = [f"{k}={v}" for k, v in combo]
        try:
            recipe = parse_recipe(raw, source=str(recipe_path),
                                  overrides=[*base_overrides, *overrides, f"tracking.group={name}"])
        except RecipeError as exc:
            raise RecipeError(f"sweep point {i} ({' '.join(overrides)}): {exc}") from None
        recipe.tracking.tags = list(dict.fromkeys([*recipe.tracking.tags, f"sweep:{name}"]))
        points.append(SweepPoint(i, overrides, recipe, folder / f"{i:0{width}d}-{_slug(combo)}"))
    sweep = Sweep(name, folder, Path(recipe_path), list(base_overrides), list(axes), points, digest)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = {}
        if old.get("digest") != digest:
            raise UsageError(f"{folder} holds another sweep (a different recipe or grid); pass another --name")
    return sweep


# --------------------------------------------------------------------------- running it here


def _write_manifest(sweep: Sweep) -> None:
    sweep.folder.mkdir(parents=True, exist_ok=True)
    tmp = sweep.folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(sweep.manifest(), indent=2) + "\n")
    tmp.replace(sweep.folder / MANIFEST)


def run_sweep(
    sweep: Sweep,
    progress: bool = True,
    say: Callable[[str], None] = print,
    log_to_wandb: bool | None = None,
    pareto_over: str = "size",
    runtime: str = "ort",
    batch: str = "1",
) -> Sweep:
    """Run the points in order (finished ones skipped), then compare them.

    Args:
        sweep: From :func:`plan_sweep`.
        progress: Progress bars and epoch lines of each run.
        say: Where the sweep's own lines go.
        log_to_wandb: Log the comparison as a W&B run of the sweep's group (default:
            when the recipe's loggers include ``wandb``).
        pareto_over: The front's axis, ``"size"`` or ``"latency"``
            (:func:`~qtemperate.compare.compare_runs`); the table always carries the
            deployed student's latency and speed-up over the teacher.
        runtime: Over latency: ``"ort"`` or ``"openvino"``.
        batch: Over latency: ``"1"`` or ``"max"``.

    Returns:
        The sweep with each point's ``status``, the comparison ``rows`` and ``plot``.
    """
    from qtemperate.compare import compare_runs, format_table, log_comparison, pareto_plot
    from qtemperate.preflight import preflight
    from qtemperate.trainer import Trainer, TrainingDiverged

    for p in sweep.points:
        preflight(p.recipe)  # every point's files before the first one trains
        if pareto_over == "latency":
            _check_timed(p, runtime)
    _write_manifest(sweep)
    n = len(sweep.points)
    for p in sweep.points:
        label = f"[{p.index + 1}/{n}] {' '.join(p.overrides)}"
        if (p.run_dir / "summary.json").is_file():
            p.status = "skipped"
            say(f"{label}: finished before, skipped ({p.run_dir})")
            continue
        resume = p.run_dir.is_dir() and any(p.run_dir.iterdir())
        say(f"{label}: {'resuming' if resume else 'running'} in {p.run_dir}")
        try:
            summary = Trainer(p.recipe, run_dir=p.run_dir, resume=resume, progress=progress).run()
        except TrainingDiverged as exc:
            p.status = "failed"
            say(f"{label}: failed: {exc}")
        else:
            p.status = "finished"
            say(f"{label}: student acc {summary['student_acc']:.4f}, compression_ratio "
                f"{summary['compression_ratio']:.4f}")
        _write_manifest(sweep)
    done = [p.run_dir for p in sweep.points if p.status in ("finished", "skipped")]
    if not done:
        return sweep
    axis = {"pareto_over": pareto_over, "runtime": runtime, "batch": batch}
    # allow_mixed: the grid may vary the teacher or data on purpose
    sweep.rows = compare_runs(done, allow_mixed=True, **axis)
    groups = {(r.get("dataset"), r.get("test_samples"), r.get("teacher_id")) for r in sweep.rows}
    if len(groups) > 1:
        say(f"note: the points span {len(groups)} (dataset, teacher) groups; each has its own front")
    say(format_table(sweep.rows, **axis))
    try:
        sweep.plot = pareto_plot(sweep.rows, sweep.folder / "pareto.png", x=pareto_over, runtime=runtime,
                                 batch=batch)
        say(f"pareto plot: {sweep.plot}")
    except ImportError:
        say("pareto plot skipped: matplotlib is not installed (the `plot` extra)")
    base = sweep.points[0].recipe
    if log_to_wandb is None:
        log_to_wandb = "wandb" in base.tracking.loggers
    if log_to_wandb:
        lg = log_comparison(sweep.rows, sweep.plot, sweep.folder, project=base.tracking.project,
                            group=sweep.name, name=f"{sweep.name}-comparison", mode=base.tracking.mode,
                            tags=[f"sweep:{sweep.name}"], **axis)
        if lg.run_file is not None:
            say(f"comparison logged to W&B: {lg.url or lg.run_file}")
    return sweep


def _check_timed(point: SweepPoint, runtime: str) -> None:
    """A front over latency needs every point's student timed in that runtime: say so before training."""
    e = point.recipe.export
    off = [k for k, on in (("export.onnx", e.onnx), ("export.benchmark", e.benchmark),
                           ("export.openvino", e.openvino or runtime != "openvino")) if not on]
    if off:
        raise UsageError(f"--pareto-over latency: sweep point {point.index} ({' '.join(point.overrides)}) "
                         f"does not time its student ({', '.join(off)}: false)")


# --------------------------------------------------------------------------- as a W&B sweep


def _wandb_value(value: Any, text: str) -> Any:
    """The value W&B stores: the parsed value when the agent's ``str(value)`` reads back
    as the same YAML (numbers, booleans, lists, plain strings), else the text as typed."""
    try:
        same = yaml.safe_load(str(value)) == value and type(yaml.safe_load(str(value))) is type(value)
    except yaml.YAMLError:
        same = False
    return value if same else text


def wandb_sweep_config(sweep: Sweep, program: str = "qtemperate") -> dict[str, Any]:
    """The grid as a W&B sweep config whose agents run each point with ``qtemperate run``.

    The agent expands ``${args_no_hyphens}`` to ``key=value`` per parameter, so each
    point runs ``qtemperate run RECIPE --set <base overrides> tracking.group=<sweep>
    key=value ...`` (``--set`` takes several overrides).
    """
    params = {a.key: {"values": [_wandb_value(v, t) for v, t in zip(a.values, a.texts)]} for a in sweep.axes}
    return {
        "name": sweep.name,
        "method": "grid",
        "metric": {"name": "student_acc", "goal": "maximize"},
        "parameters": params,
        "command": ["${env}", program, "run", str(sweep.recipe_path), "--set", *sweep.base_overrides,
                    f"tracking.group={sweep.name}", "${args_no_hyphens}"],
    }


def create_wandb_sweep(
    config: dict[str, Any], project: str, entity: str | None = None, sweep_fn: Callable[..., str] | None = None
) -> str:
    """Create the W&B sweep (online) and return its id.

    Args:
        config: :func:`wandb_sweep_config`'s config.
        project: W&B project.
        entity: W&B entity (default: the account's).
        sweep_fn: ``wandb.sweep``-like function (tests pass one).

    Raises:
        UsageError: no W&B credentials, or W&B refused or could not be reached.
    """
    if sweep_fn is None:
        from qtemperate.tracking import wandb_api_key_available

        if not wandb_api_key_available():
            raise UsageError(
                "--wandb-sweep creates the sweep on the W&B server: it needs credentials "
                "(WANDB_API_KEY or `wandb login`) and network; offline, run the grid here (drop "
                "--wandb-sweep) or print the sweep config with --dry-run"
            )
        import wandb

        sweep_fn = wandb.sweep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(sweep_fn(sweep=config, project=project, entity=entity))
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise UsageError(f"--wandb-sweep: W&B did not create the sweep ({type(exc).__name__}: {msg})") from None
