"""Running the real CLI in a subprocess and stopping it at an injected point.

A fault is planned with ``QTEMPERATE_FAULT`` (:mod:`qtemperate._faults`): the run
``SIGSTOP``\\ s itself at the planned point and the test sends a real signal from
outside (``SIGKILL`` is ``kill -9``; ``SIGTERM``/``SIGINT`` are delivered on
``SIGCONT``), so the code under test is the production path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.pipeline_helpers import tiny_recipe

TIMEOUT_S = 600


def fault_recipe(tmp: Path, **sections: Any) -> Path:
    """The tiny digits recipe with a 2-epoch teacher (so a kill can land between teacher
    epochs) and an ONNX export without timing (so a kill can land in the export)."""
    base: dict[str, Any] = {
        "teacher": {"model": "small_cnn", "kwargs": {"width": 8}, "train": {"epochs": 2, "lr": 0.05}},
        "export": {"onnx": True, "benchmark": False, "verify_samples": 64},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    raw = tiny_recipe(tmp, **base)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QTEMPERATE_FAULT"}
    # One thread: identical numerics in every process, and no spinning on a shared machine.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1")
    if fault:
        env["QTEMPERATE_FAULT"] = fault
    return env


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "qtemperate.cli", *map(str, args)]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def run(*args: str | Path, cwd: Path, fault: str | None = None) -> Result:
    """Run the CLI to completion."""
    p = subprocess.run(cli(*args), cwd=cwd, env=cli_env(fault), capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(p.returncode, p.stdout, p.stderr)


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and a
    # Python started with SIGINT ignored keeps ignoring it: give the child the default
    # (Ctrl-C raises KeyboardInterrupt) whatever way the test suite itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str | Path, cwd: Path, fault: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cli(*args), cwd=cwd, env=cli_env(fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def wait_stopped(proc: subprocess.Popen[str], timeout: float = TIMEOUT_S) -> None:
    """Wait until ``proc`` has stopped itself (SIGSTOP at its fault point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid == proc.pid:
            if os.WIFSTOPPED(status):
                return
            raise AssertionError(f"process ended before its fault point (status {status})")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the fault point was never reached")


def signal_stopped(proc: subprocess.Popen[str], sig: int) -> Result:
    """Deliver ``sig`` to a stopped process, let it run, and collect its end."""
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return Result(proc.returncode, out, err)


def stop_and_signal(*args: str | Path, cwd: Path, point: str, sig: int) -> Result:
    """Run the CLI until ``point`` (``name@n``), then send ``sig`` from outside."""
    proc = start(*args, cwd=cwd, fault=f"{point}=stop")
    wait_stopped(proc)
    return signal_stopped(proc, sig)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def result_of(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` without what legitimately differs between two runs (wall time, paths)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "onnx_path")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (but the lock file, which holds the last owner's PID)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".qtemperate.lock"}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))
