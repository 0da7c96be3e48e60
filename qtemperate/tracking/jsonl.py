"""Plain files in the run folder: metrics.jsonl, config.json, summary.json, tables, artifacts.

JSON files are replaced atomically; a full disk while appending a metric stops the
run with :class:`~qtemperate.errors.DiskFull` (exit 3) rather than silently dropping
records (a resumed run truncates ``metrics.jsonl`` to its checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from qtemperate.atomic import append_text, write_json_atomic
from qtemperate.errors import environment_problem
from qtemperate.tracking.base import MetricLogger, Scalar, check_table, plain, safe_name

__all__ = ["JsonlLogger"]


class JsonlLogger(MetricLogger):
    """Plain files in ``run_dir``.

    * ``metrics.jsonl``: one JSON object per :meth:`log` call, ``{"step": step, **metrics}``
      (appended, so a resumed run continues the file).
    * ``config.json``: the last logged config.
    * ``summary.json``: all summaries merged.
    * ``tables/<name>.json``: ``{"columns": [...], "rows": [[...], ...]}``.
    * ``artifacts.jsonl``: one ``{"name", "type", "path"}`` object per artifact (with
      ``"metadata"`` when given) and per image (``"type": "image"``).

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
        write_json_atomic(path, obj, indent=2, default=str, sort_keys=True)

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Append ``{"step": step, **metrics}`` as one line.

        Raises:
            ValueError: if ``metrics`` has its own ``"step"`` key.
        """
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; pass it as step=")
        if self._fh is None:
            try:
                self._fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise (environment_problem(exc, self.metrics_path) or exc) from None
        record = {"step": int(step), **{str(k): plain(v) for k, v in metrics.items()}}
        append_text(self._fh, self.metrics_path, json.dumps(record, default=str) + "\n")

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.json``."""
        self._write_json(self.config_path, plain(dict(config)))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge into ``summary.json``."""
        self._summary.update(plain(dict(summary)))
        self._write_json(self.summary_path, self._summary)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Write ``tables/<name>.json``."""
        check_table(name, columns, rows)
        self._write_json(
            self.run_dir / "tables" / f"{safe_name(name)}.json",
            {"columns": list(columns), "rows": [plain(list(r)) for r in rows]},
        )

    def log_artifact(
        self, path: str | os.PathLike[str], name: str, type: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Append ``{"name", "type", "path"[, "metadata"]}`` to ``artifacts.jsonl`` (no copy)."""
        record: dict[str, Any] = {"name": name, "type": type, "path": str(Path(path).resolve())}
        if metadata is not None:
            record["metadata"] = plain(dict(metadata))
        self._append_artifact(record)

    def log_image(self, name: str, path: str | os.PathLike[str]) -> None:
        """Append ``{"name", "type": "image", "path"}`` to ``artifacts.jsonl``."""
        self._append_artifact({"name": name, "type": "image", "path": str(Path(path).resolve())})

    def _append_artifact(self, record: dict[str, Any]) -> None:
        target = self.run_dir / "artifacts.jsonl"
        with open(target, "a", encoding="utf-8") as fh:
            append_text(fh, target, json.dumps(record, default=str) + "\n")

    def finish(self) -> None:
        """Close ``metrics.jsonl``."""
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk was reported when the write failed
                self._fh.close()
            self._fh = None

