"""Exit codes and one-line messages: one mapping for every failure class."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from qtemperate import errors as E
from qtemperate.recipe import RecipeError
from qtemperate.training.guards import TrainingDiverged


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RecipeError("stages.0.epochs: bad"), E.EXIT_BAD_INPUT),
        (E.UsageError("--run-dir x already holds a run"), E.EXIT_BAD_INPUT),
        (E.CheckpointError("refused"), E.EXIT_BAD_INPUT),
        (E.DataFormatError("bad magic"), E.EXIT_BAD_INPUT),
        (FileNotFoundError("nope.pt"), E.EXIT_BAD_INPUT),
        (NotADirectoryError("runs is a file"), E.EXIT_BAD_INPUT),
        (OSError(errno.ENOSPC, "No space left on device", "/x/ck.pt"), E.EXIT_ENVIRONMENT),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), E.EXIT_ENVIRONMENT),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x"), E.EXIT_ENVIRONMENT),
        (E.RunFolderBusy("runs/x", 123), E.EXIT_ENVIRONMENT),
        (MemoryError(), E.EXIT_ENVIRONMENT),
        (TrainingDiverged("loss is nan"), E.EXIT_DIVERGED),
        (KeyboardInterrupt(), E.EXIT_INTERRUPTED),
        (E.Terminated(), E.EXIT_TERMINATED),
        (E.Interrupted("terminated (SIGTERM); kept ...", E.EXIT_TERMINATED), E.EXIT_TERMINATED),
        (ZeroDivisionError("division by zero"), E.EXIT_BUG),
        (OSError(errno.EBADF, "Bad file descriptor"), E.EXIT_BUG),
    ],
)
def test_classify_maps_each_failure_class(exc: BaseException, code: int) -> None:
    got, message, trace = E.classify(exc)
    assert got == code
    assert "\n" not in message and message
    assert trace is (code == E.EXIT_BUG)


def test_exit_codes_are_distinct_and_documented() -> None:
    codes = [E.EXIT_OK, E.EXIT_BUG, E.EXIT_BAD_INPUT, E.EXIT_ENVIRONMENT, E.EXIT_DIVERGED,
             E.EXIT_INTERRUPTED, E.EXIT_TERMINATED]
    assert len(set(codes)) == len(codes)
    for code in codes:
        assert f"\n{code} " in E.__doc__  # the module's table lists every code


def test_disk_full_names_path_needed_and_free(tmp_path: Path) -> None:
    exc = E.DiskFull(tmp_path / "checkpoint.pt", needed=115_411)
    text = str(exc)
    assert str(tmp_path / "checkpoint.pt") in text
    assert "needs 115,411 bytes (112.7 KiB)" in text and " free" in text
    assert exc.free is not None and exc.free >= 0


def test_environment_problem_uses_the_given_path() -> None:
    problem = E.environment_problem(OSError(errno.ENOSPC, "No space"), "/r/summary.json", 10)
    assert isinstance(problem, E.DiskFull) and "/r/summary.json" in str(problem) and "10 bytes" in str(problem)
    assert E.environment_problem(OSError(errno.ENOENT, "missing")) is None


def test_one_line_joins_lines() -> None:
    assert E.one_line("a\n  b\n\nc ") == "a b c"


def test_readme_documents_every_exit_code() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    for code in ("| 2 |", "| 3 |", "| 4 |", "| 130 / 143 |", "| 1 |"):
        assert code in section
    assert (E.EXIT_BAD_INPUT, E.EXIT_ENVIRONMENT, E.EXIT_DIVERGED, E.EXIT_INTERRUPTED, E.EXIT_TERMINATED) == (
        2, 3, 4, 130, 143)
