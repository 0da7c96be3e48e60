"""A run folder has one owner, and ``--resume`` continues only the same run.

Ownership: the process running (or resuming, or exporting) a run holds an exclusive
OS lock (``flock``) on ``<run folder>/.qtemperate.lock`` for its whole lifetime; the
lock file holds its PID. A second process on the same folder fails at once with one
line naming that PID (:class:`~qtemperate.errors.RunFolderBusy`, exit 3), so two runs
never interleave their metrics or overwrite each other's results. The OS drops the
lock when the process ends, however it ends (``kill -9`` included): a stale lock file
never blocks a later run. A fresh run without ``--run-dir`` claims the next free
folder ``runs/<name>``, ``runs/<name>-2``, ... under that lock (:func:`claim_fresh`),
so two runs started together get two folders.

On claiming, temporary files a killed writer left behind are removed
(:func:`qtemperate.atomic.remove_stale_temps`). A fresh folder that a failing command
created, before anything was written into it, is removed again.

Resume compatibility: :func:`check_resume_compatible` compares the recipe with the
run's record (``recipe.yaml``) *before anything is written* and refuses differences
that change results, naming the fields; a few settings that cannot change results
(``data.num_workers``, ``tracking.*``, ``export.*``) may change with an explicit
``--allow-change FIELD``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from qtemperate.atomic import remove_stale_temps, write_text_atomic
from qtemperate.errors import (
    BadInput,
    ResumeMismatch,
    RunFolderBusy,
    UsageError,
    environment_problem,
)

__all__ = [
    "IGNORED_ON_RESUME",
    "LOCK_FILE",
    "METRICS_FILE",
    "RECORD_FILE",
    "SAFE_ON_RESUME",
    "RunFolder",
    "check_allow_changes",
    "check_resume_compatible",
    "claim_fresh",
    "claim_run_dir",
    "metrics_size",
    "recipe_differences",
    "truncate_metrics",
]

LOCK_FILE = ".qtemperate.lock"
RECORD_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"

SAFE_ON_RESUME: dict[str, str] = {
    "data.num_workers": "loader worker processes: same batches, same order",
    "tracking": "where metrics are sent",
    "export": "the ONNX export and timing after training",
}
"""Recipe fields that may change on ``--resume`` with ``--allow-change FIELD`` (and why)."""

IGNORED_ON_RESUME: tuple[str, ...] = ("output_dir",)
"""Recipe fields that mean nothing once the run folder is chosen."""

_HELD: dict[str, RunFolder] = {}


def _holder_pid(lock: Path) -> int | None:
    # The holder writes its PID right after locking; give it a moment.
    for _ in range(20):
        try:
            text = lock.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        time.sleep(0.025)
    return None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte instead
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_empty(path: Path) -> bool:
    """A folder with nothing in it but (maybe) a lock file."""
    return all(p.name == LOCK_FILE for p in path.iterdir())


def _check_usable(path: Path) -> None:
    """A run folder path that is a dangling symlink or a file is bad input (one line)."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"run folder {path} is a symlink to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise UsageError(f"run folder {path} is a file, not a folder")


def _mkdir(path: Path) -> bool:
    """Create ``path`` (and parents); return whether this call created it."""
    try:
        path.mkdir(parents=True)
        return True
    except FileExistsError:
        if not path.is_dir():
            raise UsageError(f"cannot create run folder {path}: a file is in the way") from None
        return False
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise UsageError(f"cannot create run folder {path}: {blocker} is a file, not a folder") from None
    except OSError as exc:
        problem = environment_problem(exc, path)
        if problem is not None:
            raise problem from None
        raise


class RunFolder:
    """An owned run folder (use :func:`claim_run_dir` / :func:`claim_fresh`).

    Re-entrant within one process: claiming a folder this process already holds
    returns the same object, so the CLI can claim a folder and the trainer claim it
    again. The lock is released when the outermost claim exits.

    Attributes:
        path: The folder.
        created: This claim created the folder (it is removed again if the command
            fails before :meth:`begin` writes anything).
        begun: :meth:`begin` has written the run's record.
    """

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self.created = created
        self.begun = False
        self._fd: int | None = fd
        self._depth = 1

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def begin(self, recipe: Any, metrics_bytes: int | None = None) -> None:
        """Start writing: truncate ``metrics.jsonl`` to ``metrics_bytes`` (the resume point;
        ``None`` leaves it) and write the resolved recipe as ``recipe.yaml``."""
        truncate_metrics(self.path, metrics_bytes)
        write_text_atomic(
            self.path / RECORD_FILE,
            f"# Resolved recipe. Re-run: qtemperate run {self.path / RECORD_FILE}\n" + recipe.to_yaml(),
        )
        self.begun = True

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would race with a new claimer)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _HELD.pop(str(self.path.resolve()), None)

    def _abandon(self) -> None:
        # Only a folder this claim created and nothing wrote into: leave no trace.
        try:
            if self.created and not self.begun and _is_empty(self.path):
                self.lock_path.unlink(missing_ok=True)
                self.release()
                self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if exc_type is not None:
            self._abandon()
        self.release()


def _acquire(path: Path, created: bool) -> RunFolder:
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        problem = environment_problem(exc, lock)
        if problem is not None:
            raise problem from None
        raise
    if not _try_lock(fd):
        os.close(fd)
        raise RunFolderBusy(path, _holder_pid(lock))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    folder = RunFolder(path, fd, created)
    _HELD[str(path.resolve())] = folder
    return folder


def _raise_if_busy(path: Path) -> None:
    """Raise :class:`RunFolderBusy` when another process holds ``path``; write nothing."""
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        if not _try_lock(fd):
            raise RunFolderBusy(path, _holder_pid(lock))
    finally:
        os.close(fd)  # closing drops the probe's lock


def _reenter(path: Path) -> RunFolder | None:
    held = _HELD.get(str(path.resolve())) if path.exists() else None
    if held is not None:
        held._depth += 1
    return held


def claim_run_dir(path: str | os.PathLike[str], resume: bool = False, purpose: str = "run") -> RunFolder:
    """Own ``path`` for a run (new, or resumed) or an export; use as a context manager.

    Args:
        path: The run folder.
        resume: Continue the run in ``path`` (it must hold one: ``recipe.yaml``).
        purpose: ``"run"`` or ``"export"`` (an existing folder, not changed otherwise).

    Raises:
        UsageError: a dangling symlink or a file as the folder; a new run into a folder
            that already holds one; ``--resume`` or export of a folder without a run.
        RunFolderBusy: another process holds the folder (names its PID).
        PermissionDenied: the folder cannot be created or locked.
    """
    path = Path(path)
    _check_usable(path)
    held = _reenter(path)
    if held is not None:
        return held
    if resume or purpose == "export":
        if not path.is_dir():
            raise UsageError(f"{'--resume' if resume else 'export'}: no run folder {path}")
        if resume and not (path / RECORD_FILE).is_file():
            raise UsageError(f"--resume: no qtemperate run in {path} (no {RECORD_FILE}); nothing to resume")
        folder = _acquire(path, created=False)
    else:
        if path.is_dir() and not _is_empty(path):
            _raise_if_busy(path)  # a folder in use names its holder
            raise UsageError(f"--run-dir {path} already holds a run; use --resume or another folder")
        created = _mkdir(path)
        folder = _acquire(path, created)
        if not _is_empty(path):  # another run claimed it between our check and our lock
            folder.release()
            raise UsageError(f"--run-dir {path} already holds a run; use --resume or another folder")
    try:
        remove_stale_temps([path, path / "tables"])
    except OSError as exc:
        folder.release()
        problem = environment_problem(exc, path)
        if problem is not None:
            raise problem from None
        raise
    return folder


def claim_fresh(base: str | os.PathLike[str]) -> RunFolder:
    """Claim ``base``, or ``base-2``, ``base-3``, ... : the first one free (race-free).

    A folder is free when it does not exist or is empty and nobody holds it.
    """
    base = Path(base)
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        _check_usable(candidate)
        if not (candidate.is_dir() and not _is_empty(candidate)):
            try:
                created = _mkdir(candidate)
                folder = _acquire(candidate, created)
            except RunFolderBusy:
                folder = None
            if folder is not None:
                if _is_empty(candidate):
                    remove_stale_temps([candidate])
                    return folder
                folder.release()
        n += 1


def metrics_size(run_dir: str | os.PathLike[str]) -> int:
    """Length of ``metrics.jsonl`` in bytes (0 before the first record: a resume to this
    point removes every record written after it)."""
    p = Path(run_dir) / METRICS_FILE
    return p.stat().st_size if p.is_file() else 0


def truncate_metrics(run_dir: str | os.PathLike[str], nbytes: int | None) -> None:
    """Cut ``metrics.jsonl`` back to ``nbytes`` (what a checkpoint recorded), so a resumed
    run logs every record after the checkpoint exactly once."""
    p = Path(run_dir) / METRICS_FILE
    if nbytes is None or not p.is_file() or p.stat().st_size <= nbytes:
        return
    try:
        os.truncate(p, nbytes)
    except OSError as exc:
        problem = environment_problem(exc, p)
        if problem is not None:
            raise problem from None
        raise


# -- resume compatibility -------------------------------------------------------------

def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and any(isinstance(v, dict | list) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        out[f"{prefix}.#"] = len(obj)
        return out
    return {prefix: obj}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _is_safe(path: str) -> bool:
    return any(_under(path, safe) for safe in SAFE_ON_RESUME)


_ABSENT = object()


def recipe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field path, recorded value, current value)`` for every field that differs
    (ignoring :data:`IGNORED_ON_RESUME`); absent values are ``"(absent)"``."""
    old, new = _flatten(recorded), _flatten(current)
    diffs = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b and not any(_under(key, ign) for ign in IGNORED_ON_RESUME):
            shown = [("(absent)" if v is _ABSENT else v) for v in (a, b)]
            diffs.append((key.replace(".#", ""), shown[0], shown[1]))
    return diffs


def _fmt(diffs: Sequence[tuple[str, Any, Any]], limit: int = 4) -> str:
    def short(v: Any) -> str:
        text = repr(v) if isinstance(v, str) else str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} ({short(a)} -> {short(b)})" for k, a, b in diffs[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(parts) + more


def check_allow_changes(allow: Iterable[str]) -> list[str]:
    """Validate ``--allow-change`` fields: only :data:`SAFE_ON_RESUME` ones (or parts of them).

    Raises:
        UsageError: a field whose change would change results.
    """
    out = []
    for field in allow:
        if not _is_safe(field):
            raise UsageError(
                f"--allow-change {field}: not a field that can change on --resume (it changes "
                f"results); safe: {', '.join(SAFE_ON_RESUME)}"
            )
        out.append(field)
    return out


def _recorded(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECORD_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        problem = environment_problem(exc, path)
        raise (problem or BadInput(f"--resume: cannot read {path}: {exc}")) from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise BadInput(f"--resume: {path} is not valid YAML; the run's record is damaged") from None
    if not isinstance(raw, dict):
        raise BadInput(f"--resume: {path} does not hold a recipe")
    return raw


def check_resume_compatible(
    run_dir: str | os.PathLike[str], recipe: Any, allow: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """Refuse ``--resume`` with a recipe whose results would differ from the recorded run's.

    Reads ``run_dir/recipe.yaml`` and writes nothing.

    Returns:
        The (allowed, safe) differences, for the caller to report.

    Raises:
        ResumeMismatch: result-changing differences (named, with old and new values), or
            safe differences not allowed with ``--allow-change``.
    """
    run_dir = Path(run_dir)
    allowed = check_allow_changes(allow)
    recorded = _recorded(run_dir)
    try:  # a field added since the run started is compared at its default, not as "absent"
        from qtemperate.recipe import parse_recipe

        recorded = parse_recipe(recorded).model_dump(mode="json")
    except ValueError:
        pass  # a record today's schema rejects is compared as written
    diffs = recipe_differences(recorded, recipe.model_dump(mode="json"))
    if not diffs:
        return []
    changing = [d for d in diffs if not _is_safe(d[0])]
    if changing:
        teacher = run_dir / "teacher.pt"
        reuse = (f"; its trained teacher can seed a new run: teacher.checkpoint: {teacher}"
                 if teacher.is_file() else "")
        raise ResumeMismatch(
            f"--resume: the recipe differs from the run's record {run_dir / RECORD_FILE} in "
            f"{_fmt(changing)}; that changes results, so it is a new run: start it without --resume{reuse}"
        )
    not_allowed = [d for d in diffs if not any(_under(d[0], a) for a in allowed)]
    if not_allowed:
        fields = " ".join(f"--allow-change {k}" for k, _, _ in not_allowed[:4])
        raise ResumeMismatch(
            f"--resume: the recipe differs from the run's record {run_dir / RECORD_FILE} in "
            f"{_fmt(not_allowed)}; safe to change on resume, if you mean it: {fields}"
        )
    return diffs

