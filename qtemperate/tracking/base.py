"""The logger interface the run talks to, and the fan-out to several loggers.

Nothing outside :mod:`qtemperate.tracking.wandb_logger` imports ``wandb``. A tracking
failure never stops training: :class:`MultiLogger` warns once about a logger that
raises and drops it, the others keep going. The exception is the machine itself
failing (:class:`~qtemperate.errors.EnvironmentProblem`: a full disk): that stops the
run at once, as the next checkpoint write would.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qtemperate.errors import EnvironmentProblem

__all__ = ["MetricLogger", "MultiLogger", "Scalar", "check_table", "plain", "safe_name"]

Scalar = float | int | str | bool

def plain(value: Any) -> Any:
    """Turn numpy/torch scalars (anything with ``.item()``) into Python scalars."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
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

    def log_artifact(  # noqa: B027 - optional hook
        self, path: str | os.PathLike[str], name: str, type: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Record a file or folder (checkpoint, ONNX model) as an artifact, with ``metadata``
        (measured bytes, latency, agreement ...) when given."""

    def log_image(self, name: str, path: str | os.PathLike[str]) -> None:  # noqa: B027
        """Record an image file (a figure) under ``name``."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """Flush and close; further calls are ignored."""

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()



def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (cleaned or "unnamed")[:128]


def check_table(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"table {name!r}: row {i} has {len(row)} values for {len(columns)} columns"
            )



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
            self._call_one(logger, method, *args)

    def _call_one(self, logger: MetricLogger, method: str, *args: Any) -> None:
        try:
            getattr(logger, method)(*args)
        except EnvironmentProblem:
            raise
        except Exception as exc:
            self.failed.append(logger)
            warnings.warn(
                f"{type(logger).__name__}.{method} failed ({type(exc).__name__}: {exc}); "
                "that logger is disabled for the rest of the run",
                RuntimeWarning,
                stacklevel=4,
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

    def log_artifact(
        self, path: str | os.PathLike[str], name: str, type: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        for logger in list(self.loggers):
            if logger in self.failed:
                continue
            # A logger written before artifacts had metadata takes (path, name, type) only.
            takes_metadata = "metadata" in inspect.signature(logger.log_artifact).parameters
            self._call_one(logger, "log_artifact", path, name, type, *([metadata] if takes_metadata else []))

    def log_image(self, name: str, path: str | os.PathLike[str]) -> None:
        self._call("log_image", name, path)

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

