"""Experiment tracking: one small logger interface and its JSONL, console and W&B backends.

* :mod:`~qtemperate.tracking.base` — :class:`MetricLogger` (what the run talks to) and
  :class:`MultiLogger` (fan-out; a failing logger is warned about and dropped).
* :mod:`~qtemperate.tracking.jsonl` — files in the run folder.
* :mod:`~qtemperate.tracking.console` — one-line prints beside progress bars.
* :mod:`~qtemperate.tracking.wandb_logger` — Weights & Biases (offline without
  credentials; resumed runs continue the same W&B run).

Loggers are built by name through :data:`LOGGERS`; a logger registered there by user
code is usable from a recipe's ``tracking.loggers``. A factory is called as
``factory(run_dir, console_every=..., **wandb_kwargs)`` and ignores what it does not use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from qtemperate.registry import Registry
from qtemperate.tracking.base import MetricLogger as MetricLogger
from qtemperate.tracking.base import MultiLogger as MultiLogger
from qtemperate.tracking.base import Scalar as Scalar
from qtemperate.tracking.console import ConsoleLogger as ConsoleLogger
from qtemperate.tracking.jsonl import JsonlLogger as JsonlLogger
from qtemperate.tracking.wandb_logger import RUN_ID_FILE as RUN_ID_FILE
from qtemperate.tracking.wandb_logger import WandbLogger as WandbLogger
from qtemperate.tracking.wandb_logger import resolve_wandb_mode as resolve_wandb_mode
from qtemperate.tracking.wandb_logger import wandb_api_key_available as wandb_api_key_available

__all__ = [
    "LOGGERS",
    "RUN_ID_FILE",
    "ConsoleLogger",
    "JsonlLogger",
    "MetricLogger",
    "MultiLogger",
    "Scalar",
    "WandbLogger",
    "build_loggers",
    "resolve_wandb_mode",
    "wandb_api_key_available",
]

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
    """Build the loggers named in ``kinds`` (``jsonl``, ``console``, ``wandb`` or registered).

    Args:
        kinds: Logger keys from :data:`LOGGERS`.
        run_dir: The run folder.
        console_every: Print period of the console logger.
        **wandb_kwargs: Passed to :class:`WandbLogger` (``project`` defaults to
            ``"qtemperate"``; ``resume=True`` continues the run's W&B run).

    Raises:
        KeyError: an unknown kind, listing the known ones.
    """
    factories = [LOGGERS.get(kind) for kind in kinds]  # validate all before creating any
    return MultiLogger(f(run_dir, console_every=console_every, **wandb_kwargs) for f in factories)
