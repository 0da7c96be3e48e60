"""What can go wrong in a run, and the exit code and one line each failure gets.

Every failure the command line reports is one line on stderr and a documented exit
code (README, "When things go wrong"):

=====  =====================================================================
code   meaning
=====  =====================================================================
0      success
1      a bug in qtemperate (the traceback is printed; please report it)
2      bad input: a recipe field, a data file, a label, a checkpoint, a shape
       mismatch, an unreachable size target, a run folder that cannot be used
3      the environment: disk full (names the path and the bytes needed),
       permission denied, a read-only file system, out of memory, or the run
       folder held by another qtemperate process (names its PID)
4      training diverged (NaN/Inf loss); the last good checkpoint is kept
130    interrupted (Ctrl-C); the last checkpoint is kept
143    terminated (SIGTERM); the last checkpoint is kept
=====  =====================================================================

Bad input is found before any training whose result could not be used, and a
failing command never modifies an existing run: checkpoints and records are
written atomically (:mod:`qtemperate.atomic`).

This module has no dependencies, so every part of the package can raise these.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUG",
    "EXIT_DIVERGED",
    "EXIT_ENVIRONMENT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "BadInput",
    "CheckpointError",
    "DataFormatError",
    "DiskFull",
    "EnvironmentProblem",
    "Interrupted",
    "PermissionDenied",
    "QtemperateError",
    "QtemperateWarning",
    "ResumeMismatch",
    "RunFolderBusy",
    "Terminated",
    "UsageError",
    "classify",
    "environment_problem",
    "one_line",
]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what schedulers (SLURM, Kubernetes) expect


class QtemperateWarning(UserWarning):
    """A setting that works but is unlikely to be what the user wants (printed as one line)."""


class QtemperateError(Exception):
    """A failure qtemperate understands: its message is the one line the CLI prints."""

    exit_code = EXIT_BUG


class BadInput(QtemperateError):
    """The user's input cannot be used (exit 2). The message names the field or file."""

    exit_code = EXIT_BAD_INPUT


class UsageError(BadInput):
    """Bad input that is not a recipe field (a run folder, a flag)."""


class CheckpointError(BadInput):
    """A checkpoint cannot be read as data: truncated, foreign, or it would run code."""


class DataFormatError(BadInput, ValueError):
    """A data file is malformed (wrong magic, truncated, a pickle holding code)."""


class ResumeMismatch(BadInput):
    """``--resume`` with a recipe that differs from the run's record in result-changing fields."""


class EnvironmentProblem(QtemperateError):
    """The machine, not the input, stops the run (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class DiskFull(EnvironmentProblem):
    """No space left writing ``path``; says how many bytes the write needed.

    Args:
        path: The file being written.
        needed: Bytes the write needed (``None`` when unknown).
    """

    def __init__(self, path: str | os.PathLike[str], needed: int | None = None) -> None:
        self.path = Path(path)
        self.needed = needed
        self.free = _free_bytes(self.path)
        need = f"needs {_bytes(needed)}" if needed is not None else "needs more space"
        free = f", {_bytes(self.free)} free" if self.free is not None else ""
        super().__init__(f"disk full: writing {self.path} {need}{free}; free some space and run again")


class PermissionDenied(EnvironmentProblem):
    """The file system refused access to ``path``."""

    def __init__(self, path: str | os.PathLike[str], what: str = "permission denied") -> None:
        self.path = Path(path)
        super().__init__(f"{what}: {self.path}")


class RunFolderBusy(EnvironmentProblem):
    """Another process holds the run folder's lock."""

    def __init__(self, path: str | os.PathLike[str], pid: int | None) -> None:
        self.path = Path(path)
        self.pid = pid
        who = f"PID {pid}" if pid is not None else "a process whose PID could not be read"
        super().__init__(
            f"run folder {self.path} is in use by another qtemperate process ({who}); "
            "wait for it to finish or choose another folder with --run-dir"
        )


class Interrupted(QtemperateError):
    """The run was stopped by a signal; the message says what is kept and how to continue."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler: a termination unwinds like Ctrl-C."""


def _bytes(n: int | None) -> str:
    if n is None:
        return "? bytes"
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return f"{n:,} bytes"


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parent.parents):
        try:
            return int(shutil.disk_usage(folder).free)
        except OSError:
            continue
    return None


_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
    errno.EMFILE, errno.ENFILE, errno.ENOMEM,
}


def environment_problem(
    exc: OSError, path: str | os.PathLike[str] | None = None, needed: int | None = None
) -> EnvironmentProblem | None:
    """The :class:`EnvironmentProblem` an ``OSError`` stands for, or ``None`` for other errors.

    Args:
        exc: The error.
        path: The file being written or read (default: the error's own file name).
        needed: Bytes the failed write needed, when known.
    """
    where = path if path is not None else (exc.filename or "?")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(where, needed)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(where)
    if exc.errno == errno.EROFS:
        return PermissionDenied(where, "read-only file system")
    if exc.errno in _ENVIRONMENT_ERRNOS:
        problem = EnvironmentProblem(f"{exc.strerror or exc}: {where}")
        return problem
    return None


def one_line(text: object) -> str:
    """``text`` with its lines joined: the CLI prints every failure as one line."""
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def classify(exc: BaseException) -> tuple[int, str, bool]:
    """The exit code, the one-line message and whether to print a traceback for ``exc``.

    Only a bug (an exception qtemperate does not know) gets exit 1 and a traceback.
    """
    if isinstance(exc, QtemperateError):
        return exc.exit_code, one_line(exc), False
    if isinstance(exc, KeyboardInterrupt):
        if isinstance(exc, Terminated):
            return EXIT_TERMINATED, "terminated (SIGTERM)", False
        return EXIT_INTERRUPTED, "interrupted", False
    if isinstance(exc, FileNotFoundError):
        return EXIT_BAD_INPUT, one_line(exc), False
    if isinstance(exc, NotADirectoryError | IsADirectoryError | FileExistsError):
        return EXIT_BAD_INPUT, one_line(exc), False
    if isinstance(exc, OSError):
        problem = environment_problem(exc)
        if problem is not None:
            return problem.exit_code, one_line(problem), False
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return EXIT_ENVIRONMENT, "out of memory: lower data.batch_size or data.eval_batch_size", False
    return EXIT_BUG, f"internal error (a bug, please report it): {type(exc).__name__}: {one_line(exc)}", True
