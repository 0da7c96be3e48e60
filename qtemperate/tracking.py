"""Experiment tracking: one small logger interface and its JSONL, console and W&B backends.

The trainer only talks to :class:`MetricLogger`; nothing outside this module
imports ``wandb`` (it is imported lazily inside :class:`WandbLogger`, so
``import qtemperate`` stays fast). A tracking failure never stops training:
:class:`WandbLogger` turns any W&B error into one warning and disables itself,
and :class:`MultiLogger` does the same for any logger it fans out to.

:func:`read_offline_run` reads an offline W&B run back (summary, config, history
rows, artifacts) with wandb's own ``wandb leet inspect`` reader, so tests and the
end-to-end pipeline can check what was really written.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import subprocess
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qtemperate.registry import Registry

__all__ = [
    "LOGGERS",
    "ConsoleLogger",
    "JsonlLogger",
    "MetricLogger",
    "MultiLogger",
    "WandbLogger",
    "build_loggers",
    "find_offline_run_file",
    "read_offline_run",
    "resolve_wandb_mode",
    "wandb_api_key_available",
]

Scalar = float | int | str | bool
_WANDB_MODES = ("auto", "online", "offline", "disabled")


def _plain(value: Any) -> Any:
    """Turn numpy/torch scalars (anything with ``.item()``) into Python scalars."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricLogger(ABC):
    """What the trainer logs through. Only :meth:`log` is mandatory.

    Loggers are context managers: ``with JsonlLogger(d) as lg: ...`` calls
    :meth:`finish` on exit.
    """

    @abstractmethod
    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Log scalar metrics at global ``step``."""

    def log_config(self, config: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Record the run configuration (the resolved recipe)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Record final/best values of the run (merged into earlier summaries)."""

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:  # noqa: B027
        """Record a small table (e.g. per-stage results)."""

    def log_artifact(self, path: str | os.PathLike[str], name: str, type: str) -> None:  # noqa: B027
        """Record a file or folder (checkpoint, ONNX model) as an artifact."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Flush and close; further calls are ignored."""

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


# --------------------------------------------------------------------------- JSONL


class JsonlLogger(MetricLogger):
    """Plain files in ``run_dir``.

    * ``metrics.jsonl``: one JSON object per :meth:`log` call, ``{"step": step, **metrics}``
      (appended, so a resumed run continues the file).
    * ``config.json``: the last logged config.
    * ``summary.json``: all summaries merged.
    * ``tables/<name>.json``: ``{"columns": [...], "rows": [[...], ...]}``.
    * ``artifacts.jsonl``: one ``{"name", "type", "path"}`` object per artifact.

    Args:
        run_dir: Folder to write into (created).
        filename: Name of the metrics file.
    """

    def __init__(self, run_dir: str | os.PathLike[str], filename: str = "metrics.jsonl") -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / filename
        self.summary_path = self.run_dir / "summary.json"
        self.config_path = self.run_dir / "config.json"
        self._fh: TextIO | None = None
        self._summary: dict[str, Any] = {}
        if self.summary_path.is_file():
            try:
                self._summary = json.loads(self.summary_path.read_text())
            except (OSError, ValueError):
                self._summary = {}

    def _write_json(self, path: Path, obj: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Append ``{"step": step, **metrics}`` as one line.

        Raises:
            ValueError: if ``metrics`` has its own ``"step"`` key.
        """
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; pass it as step=")
        if self._fh is None:
            self._fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        record = {"step": int(step), **{str(k): _plain(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.json``."""
        self._write_json(self.config_path, _plain(dict(config)))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge into ``summary.json``."""
        self._summary.update(_plain(dict(summary)))
        self._write_json(self.summary_path, self._summary)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Write ``tables/<name>.json``."""
        _check_table(name, columns, rows)
        self._write_json(
            self.run_dir / "tables" / f"{_safe_name(name)}.json",
            {"columns": list(columns), "rows": [_plain(list(r)) for r in rows]},
        )

    def log_artifact(self, path: str | os.PathLike[str], name: str, type: str) -> None:
        """Append ``{"name", "type", "path"}`` to ``artifacts.jsonl`` (no copy)."""
        record = {"name": name, "type": type, "path": str(Path(path).resolve())}
        with open(self.run_dir / "artifacts.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """Close ``metrics.jsonl``."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (cleaned or "unnamed")[:128]


def _check_table(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"table {name!r}: row {i} has {len(row)} values for {len(columns)} columns"
            )


# --------------------------------------------------------------------------- console


def _fmt(value: Any, precision: int) -> str:
    value = _plain(value)
    if isinstance(value, float):
        if (value != 0 and (abs(value) < 10 ** -precision or abs(value) >= 1e6)) or math.isnan(value):
            return f"{value:.{precision}g}"
        return f"{value:.{precision}f}"
    return str(value)


class ConsoleLogger(MetricLogger):
    """Compact one-line prints, safe beside tqdm bars (uses ``tqdm.write``).

    Args:
        every: Print metrics only when ``step % every == 0``.
        precision: Decimals of floats.
        file: Stream to print to (default ``sys.stdout``).
    """

    def __init__(self, every: int = 1, precision: int = 4, file: TextIO | None = None) -> None:
        if every < 1:
            raise ValueError(f"ConsoleLogger every must be >= 1, got {every}")
        self.every = every
        self.precision = precision
        self.file = file

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.file if self.file is not None else sys.stdout)

    def format(self, metrics: Mapping[str, Any], step: int | None = None) -> str:
        """The line printed for ``metrics``, e.g. ``step 10 | loss 0.1234 | phase fp``."""
        parts = [] if step is None else [f"step {step}"]
        parts += [f"{k} {_fmt(v, self.precision)}" for k, v in metrics.items()]
        return " | ".join(parts)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Print metrics every ``every`` steps."""
        if step % self.every == 0:
            self._write(self.format(metrics, step))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Print the summary on one line."""
        self._write("summary | " + self.format(summary))

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Print the table as aligned text."""
        _check_table(name, columns, rows)
        cells = [list(map(str, columns))] + [[_fmt(v, self.precision) for v in r] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = [f"table {name}"] + [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells
        ]
        self._write("\n".join(lines))


# --------------------------------------------------------------------------- W&B


def wandb_api_key_available() -> bool:
    """Whether W&B credentials exist without prompting.

    True when ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` is set, or the netrc
    file (``$NETRC`` or ``~/.netrc``) has an entry for the W&B host
    (``$WANDB_BASE_URL``, default ``api.wandb.ai``).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = re.sub(r"^[a-z]+://", "", base).split("/")[0].split(":")[0]
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [
        os.path.expanduser("~/.netrc"),
        os.path.expanduser("~/_netrc"),
    ]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """Resolve ``"auto"`` to a concrete W&B mode.

    ``auto``: ``$WANDB_MODE`` when set, else ``online`` with credentials
    (:func:`wandb_api_key_available`) and ``offline`` without. Other modes are
    returned unchanged.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in _WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(_WANDB_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode in ("dryrun",):
        return "offline"
    return "online" if wandb_api_key_available() else "offline"


class WandbLogger(MetricLogger):
    """Weights & Biases backend that never raises into training.

    ``wandb.init`` runs in the constructor with ``dir=run_dir``, so offline runs land
    in ``run_dir/wandb/offline-run-*/run-<id>.wandb`` (sync later with
    ``wandb sync``). Any exception from W&B produces one :class:`RuntimeWarning` and
    disables the logger; later calls do nothing.

    Args:
        project: W&B project.
        run_dir: The qtemperate run folder (``runs/<name>``).
        group: W&B group (e.g. the recipe name of a sweep).
        name: Display name of the run.
        mode: ``auto`` (online only with credentials, see :func:`resolve_wandb_mode`),
            ``online``, ``offline`` or ``disabled``.
        tags: Run tags.
        config: Initial config (the recipe).
        entity: W&B entity (team/user).
        run_id: Fixed run id, e.g. to resume a run.
        resume: W&B resume policy (``"allow"``, ``"must"``, ...).
        system_stats: Sample CPU/GPU/memory statistics.
        init_timeout: Seconds ``wandb.init`` may take before it is given up.
        finish_timeout: Seconds ``finish`` waits for an online upload; what is left
            stays on disk for ``wandb sync`` (0 waits forever).
        settings: Extra ``wandb.Settings`` fields, overriding the defaults above.
    """

    def __init__(
        self,
        project: str,
        run_dir: str | os.PathLike[str],
        group: str | None = None,
        name: str | None = None,
        mode: str = "auto",
        tags: Iterable[str] | None = None,
        config: Mapping[str, Any] | None = None,
        entity: str | None = None,
        run_id: str | None = None,
        resume: str | None = None,
        system_stats: bool = True,
        init_timeout: float = 60.0,
        finish_timeout: float = 300.0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.mode = resolve_wandb_mode(mode)
        self.run: Any = None
        self.disabled = False
        self._step = 0
        self._finished = False
        if self.mode == "disabled":
            self.disabled = True
            return
        try:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            opts: dict[str, Any] = {
                "mode": self.mode,
                "init_timeout": float(init_timeout),
                "console": "off",
                "x_disable_stats": not system_stats,
                "reinit": "create_new",
                "finish_timeout": float(finish_timeout),
            }
            known = getattr(wandb.Settings, "model_fields", None)
            if known:  # drop defaults this wandb version does not have
                opts = {k: v for k, v in opts.items() if k in known}
            opts.update(settings or {})
            self.run = wandb.init(
                project=project,
                entity=entity,
                dir=str(self.run_dir),
                group=group,
                name=name,
                tags=list(tags) if tags else None,
                config=_plain(dict(config)) if config else None,
                id=run_id,
                resume=resume,
                settings=wandb.Settings(**opts),
            )
        except Exception as exc:
            self._fail("wandb.init", exc)

    # -- failure handling -------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> None:
        self.disabled = True
        warnings.warn(
            f"W&B logging disabled after {what} failed: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )

    @property
    def active(self) -> bool:
        """Whether calls still reach W&B."""
        return not self.disabled and self.run is not None and not self._finished

    # -- locations --------------------------------------------------------------

    @property
    def run_path(self) -> Path | None:
        """Folder of this run's files (``run_dir/wandb/offline-run-*`` offline)."""
        if self.run is None:
            return None
        return Path(self.run.settings.sync_dir)

    @property
    def run_file(self) -> Path | None:
        """The run's ``.wandb`` transaction log, readable with :func:`read_offline_run`."""
        if self.run is None:
            return None
        return Path(self.run.settings.sync_file)

    @property
    def run_id(self) -> str | None:
        """W&B run id."""
        return None if self.run is None else str(self.run.id)

    @property
    def url(self) -> str | None:
        """Web URL of an online run (``None`` offline)."""
        return None if self.run is None or self.mode != "online" else self.run.url

    # -- logging ----------------------------------------------------------------

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """``run.log(metrics, step=step)``."""
        if not self.active:
            return
        try:
            self.run.log({str(k): _plain(v) for k, v in metrics.items()}, step=int(step))
            self._step = max(self._step, int(step))
        except Exception as exc:
            self._fail("run.log", exc)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """``run.config.update(config)``."""
        if not self.active:
            return
        try:
            self.run.config.update(_plain(dict(config)), allow_val_change=True)
        except Exception as exc:
            self._fail("run.config.update", exc)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """``run.summary.update(summary)``."""
        if not self.active:
            return
        try:
            self.run.summary.update(_plain(dict(summary)))
        except Exception as exc:
            self._fail("run.summary.update", exc)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a ``wandb.Table`` under ``name`` at the latest step."""
        if not self.active:
            return
        try:
            import wandb

            table = wandb.Table(columns=list(columns), data=[_plain(list(r)) for r in rows])
            self.run.log({name: table}, step=self._step)
        except Exception as exc:
            self._fail("logging table " + repr(name), exc)

    def log_artifact(self, path: str | os.PathLike[str], name: str, type: str) -> None:
        """Log a file or folder as a ``wandb.Artifact`` (name sanitised for W&B).

        A missing path only warns; it does not disable the logger.
        """
        if not self.active:
            return
        p = Path(path)
        if not p.exists():
            warnings.warn(f"W&B artifact {name!r} skipped: {p} does not exist", RuntimeWarning, stacklevel=2)
            return
        try:
            import wandb

            artifact = wandb.Artifact(_safe_name(name), type=type)
            if p.is_dir():
                artifact.add_dir(str(p))
            else:
                artifact.add_file(str(p))
            self.run.log_artifact(artifact)
        except Exception as exc:
            self._fail("logging artifact " + repr(name), exc)

    def finish(self, exit_code: int | None = None) -> None:
        """``run.finish()``; idempotent."""
        if self.run is None or self._finished:
            return
        self._finished = True
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._fail("run.finish", exc)


# --------------------------------------------------------------------------- fan-out


class MultiLogger(MetricLogger):
    """Send every call to several loggers; a logger that raises is warned about once
    and dropped, the others keep going.

    Args:
        loggers: The loggers to fan out to.
    """

    def __init__(self, loggers: Iterable[MetricLogger]) -> None:
        self.loggers: list[MetricLogger] = list(loggers)
        self.failed: list[MetricLogger] = []

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            if logger in self.failed:
                continue
            try:
                getattr(logger, method)(*args)
            except Exception as exc:
                self.failed.append(logger)
                warnings.warn(
                    f"{type(logger).__name__}.{method} failed ({type(exc).__name__}: {exc}); "
                    "that logger is disabled for the rest of the run",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def get(self, cls: type[MetricLogger]) -> MetricLogger | None:
        """The first logger of type ``cls`` (e.g. ``WandbLogger``), or ``None``."""
        return next((lg for lg in self.loggers if isinstance(lg, cls)), None)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        self._call("log", metrics, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._call("log_config", config)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._call("log_summary", summary)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self._call("log_table", name, columns, rows)

    def log_artifact(self, path: str | os.PathLike[str], name: str, type: str) -> None:
        self._call("log_artifact", path, name, type)

    def finish(self) -> None:
        """Finish every logger, including ones that failed earlier (errors only warn)."""
        for logger in self.loggers:
            try:
                logger.finish()
            except Exception as exc:
                warnings.warn(
                    f"{type(logger).__name__}.finish failed: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )


LOGGERS: Registry[Any] = Registry("logger")
LOGGERS.register("jsonl", lambda run_dir, **_: JsonlLogger(run_dir))
LOGGERS.register("console", lambda run_dir, console_every=1, **_: ConsoleLogger(every=console_every))
LOGGERS.register(
    "wandb",
    lambda run_dir, console_every=1, project="qtemperate", **kw: WandbLogger(project, run_dir, **kw),
)


def build_loggers(
    kinds: Iterable[str],
    run_dir: str | os.PathLike[str],
    console_every: int = 1,
    **wandb_kwargs: Any,
) -> MultiLogger:
    """Build the loggers named in ``kinds`` (``jsonl``, ``console``, ``wandb``).

    Args:
        kinds: Logger keys from :data:`LOGGERS`.
        run_dir: The run folder.
        console_every: Print period of the console logger.
        **wandb_kwargs: Passed to :class:`WandbLogger` (``project`` defaults to
            ``"qtemperate"``).

    Raises:
        KeyError: an unknown kind, listing the known ones.
    """
    factories = [LOGGERS.get(kind) for kind in kinds]  # validate all before creating any
    return MultiLogger(f(run_dir, console_every=console_every, **wandb_kwargs) for f in factories)


# --------------------------------------------------------------------------- reading back


def find_offline_run_file(path: str | os.PathLike[str]) -> Path:
    """Locate a ``.wandb`` file from a run folder, a ``wandb`` folder, a run's sync
    folder or the file itself; with several runs the newest is taken.

    Raises:
        FileNotFoundError: naming ``path`` when no ``.wandb`` file is found.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".wandb":
        return p
    for folder in (p, p / "wandb"):
        direct = sorted(folder.glob("*.wandb")) if folder.is_dir() else []
        if direct:
            return direct[-1]
        nested = sorted(folder.glob("*run-*/run-*.wandb")) if folder.is_dir() else []
        if nested:
            return max(nested, key=lambda f: (f.stat().st_mtime, str(f)))
    raise FileNotFoundError(f"no W&B run file (*.wandb) found in {p}")


def _leet_inspect(run_file: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *extra, str(run_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run `{' '.join(cmd)}`: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"`wandb leet inspect` failed on {run_file} (rc {proc.returncode}); this needs a "
            f"wandb version with the leet inspector: {proc.stderr.strip()[-500:]}"
        )
    return proc.stdout


def read_offline_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read back what a W&B run wrote to its ``.wandb`` file.

    Uses wandb's own reader (``wandb leet inspect --json``), so it checks the real
    transaction log, not a copy.

    Args:
        path: Anything :func:`find_offline_run_file` accepts (e.g. the run folder).

    Returns:
        A dict with ``summary`` (nested, as W&B shows it), ``config`` (user config,
        no ``_wandb``), ``history`` (one dict per committed step, in order, with
        ``_step``; nested keys are dotted), ``artifacts`` (``name``, ``type``,
        ``files``), ``tables`` (``{name: {"columns": [...], "data": [[...]]}}`` for
        every table in the summary whose file is on disk), and ``run_id``, ``name``, ``project``, ``group``, ``tags``,
        ``state``, ``exit_code`` and ``file``.

    Raises:
        FileNotFoundError: no ``.wandb`` file under ``path``.
        RuntimeError: the wandb inspector is missing or failed.
    """
    run_file = find_offline_run_file(path)
    overview = json.loads(_leet_inspect(run_file, "--summary"))
    history: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    group = None
    for line in _leet_inspect(run_file).splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "history":
            history.append(dict(record["history"].get("item", {})))
        elif kind == "artifact":
            art = record["artifact"]
            files = [c.get("path") for c in art.get("manifest", {}).get("contents", [])]
            artifacts.append({"name": art.get("name"), "type": art.get("type"), "files": files})
        elif kind == "run":
            group = record["run"].get("run_group") or group
    summary = overview.get("summary", {})
    tables: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict) and value.get("_type") == "table-file" and value.get("path"):
            table_file = run_file.parent / "files" / value["path"]
            if table_file.is_file():
                tables[key] = json.loads(table_file.read_text())
    return {
        "summary": summary,
        "config": overview.get("config", {}),
        "history": history,
        "artifacts": artifacts,
        "tables": tables,
        "run_id": overview.get("run_id"),
        "name": overview.get("name"),
        "project": overview.get("project"),
        "group": group,
        "tags": overview.get("tags", []),
        "state": overview.get("state"),
        "exit_code": overview.get("exit_code"),
        "file": str(run_file),
    }
