"""Test helper: read an offline W&B run back with wandb's own ``wandb leet inspect``.

It checks the real transaction log a run wrote, not a copy; it is not part of the
library's API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


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

