"""Atomic file writes: a file is either its old self or completely new, never half-written.

Every artifact of a run (checkpoints, ``student.pt``, ONNX files, ``summary.json``, the
recipe record, ``config.json``) is written here: the bytes go to a temporary file
``.<name>.<random>.tmp`` in the destination folder, are flushed to disk, and the
temporary file is moved over the destination with :func:`os.replace` (atomic on
POSIX and Windows). A process killed mid-write leaves the previous file intact and at
most a stale temporary file, which :func:`remove_stale_temps` deletes when the run
folder is next opened.

A full disk or a refused permission becomes :class:`~qtemperate.errors.DiskFull`
(naming the path and the bytes the write needed) or
:class:`~qtemperate.errors.PermissionDenied`: exit 3, one line.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtemperate._faults import fault_point
from qtemperate.errors import environment_problem

__all__ = [
    "TEMP_SUFFIX",
    "append_text",
    "is_temp_file",
    "remove_stale_temps",
    "save_torch_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a finished artifact gets the mode open() would give it.
_FILE_MODE = 0o666 & ~_umask()


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is a temporary file of :func:`write_bytes_atomic`."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def _raise_environment(exc: OSError, path: Path, needed: int | None) -> None:
    problem = environment_problem(exc, path, needed)
    if problem is not None:
        raise problem from None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename).

    Raises:
        DiskFull: no space left (the message names ``path`` and ``len(data)``).
        PermissionDenied: the folder or file is not writable.
    """
    path = Path(path)
    needed = len(data)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), _FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        _raise_environment(exc, path, needed)
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    # The rename itself must survive a power cut; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (``indent=2`` unless given) to ``path`` atomically."""
    dumps.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; serialized in memory first, so a full
    disk is reported with the exact number of bytes the file needs."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getbuffer())


def append_text(fh: io.TextIOBase, path: Path, text: str) -> None:
    """Append ``text`` to the open file ``fh`` (``path``) and flush it to the OS.

    Raises:
        DiskFull: no space left; the line that did not fit is reported as needed bytes.
    """
    try:
        fh.write(text)
        fh.flush()
    except OSError as exc:
        _raise_environment(exc, path, len(text.encode("utf-8")))
        raise


def remove_stale_temps(folders: Iterable[Path]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folders``; return them.

    Only call this on a folder this process owns (a run folder whose lock it holds).
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if is_temp_file(p) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
