"""Fault injection for the tests: stop, kill or fail the real run at a named point.

Production code calls :func:`fault_point` at a few places (a teacher step, a stage
switch, each atomic file write); it does nothing unless the environment variable
``QTEMPERATE_FAULT`` is set, so the code path under test is the real one.

``QTEMPERATE_FAULT`` holds ``point@n=action`` entries separated by ``;``: at the
``n``-th time (default 1) the process reaches ``point`` it performs ``action``:

* ``kill`` — ``SIGKILL`` itself (what ``kill -9`` does);
* ``stop`` — ``SIGSTOP`` itself, so a test can send a real signal from outside;
* ``term`` — ``SIGTERM`` itself;
* ``enospc`` — raise ``OSError(ENOSPC)`` (a full disk, where no small tmpfs can be mounted).

Points: ``teacher_step``, ``stage_switch``, ``write:<file name>`` (after the
temporary file is written, before it replaces ``<file name>``).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

__all__ = ["ENV", "fault_point", "reset"]

ENV = "QTEMPERATE_FAULT"
_hits: Counter[str] = Counter()
_spec: list[str] = [""]


def reset() -> None:
    """Forget how often each point was reached (in-process tests call this between runs)."""
    _hits.clear()


def _plan(spec: str) -> dict[str, tuple[int, str]]:
    plan: dict[str, tuple[int, str]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        where, _, action = entry.rpartition("=")
        point, _, nth = where.partition("@")
        plan[point] = (int(nth or 1), action)
    return plan


def fault_point(point: str) -> None:
    """Perform the injected fault planned for ``point``, if any (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if spec != _spec[0]:  # a new plan counts from zero
        _spec[0] = spec
        reset()
    planned = _plan(spec).get(point)
    if planned is None:
        return
    _hits[point] += 1
    nth, action = planned
    if _hits[point] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} for {point!r}")
