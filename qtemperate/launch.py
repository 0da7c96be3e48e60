"""``qtemperate run RECIPE --nproc N``: N local processes, started as torchrun would.

Each process is ``python -m qtemperate run ...`` with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), so the run is the same as under
``torchrun --nproc_per_node N -m qtemperate run RECIPE``. Like torchrun's agent, the
launcher hosts the rendezvous store itself (``TORCHELASTIC_USE_AGENT_STORE``), so a
failing rank's line stays readable after that rank exits, and it ends the group when
one process fails: the others get ``grace_s`` to stop with that line, then are
terminated. For several machines use torchrun (README "Scaling out").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtemperate.recipe import Recipe

__all__ = ["check_launch", "exit_code_for", "launch_local", "launch_run"]


def check_launch(args: argparse.Namespace, recipe: Recipe) -> None:
    """The checks of ``--nproc N`` that need no data: the launcher, the backend,
    ``data.batch_size`` divisible by N, Brevitas calibration. Run before the run folder
    is claimed, so a refused launch leaves nothing behind.

    Raises:
        UsageError: ``--nproc`` under another launcher or below 1.
        RecipeError: a recipe the N processes cannot run.
    """
    from qtemperate.cli import UsageError
    from qtemperate.training.device import resolve_device
    from qtemperate.training.distributed import check_recipe, env_world_size

    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if env_world_size() > 1:
        raise UsageError(f"--nproc: this process was started by a launcher (WORLD_SIZE={env_world_size()}); "
                         "drop --nproc")
    check_recipe(recipe, args.nproc, resolve_device(recipe.device))


def launch_run(args: argparse.Namespace, recipe: Recipe, run_dir: Path) -> int:
    """``qtemperate run ... --nproc N``: check, then start the N ranks on ``run_dir``.

    :func:`check_launch` runs here, once, before any process starts; each rank repeats
    the checks and checks the data. The run folder is decided by the caller and passed to
    every rank.

    Raises:
        UsageError: ``--nproc`` under another launcher or below 1.
        RecipeError: a recipe the N processes cannot run.
    """
    check_launch(args, recipe)
    argv = ["-m", "qtemperate", "run", str(args.recipe), "--run-dir", str(run_dir)]
    for item in args.set or []:
        argv += ["--set", item]
    argv += [f"--{flag.replace('_', '-')}" for flag in ("resume", "offline", "no_progress") if getattr(args, flag)]
    # N processes on one machine: split its cores (torchrun sets 1 thread; this keeps all busy).
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    return launch_local(argv, args.nproc, env=env)


def exit_code_for(exc: BaseException) -> int | None:
    """Print a failed run's line (once per group) and return its exit code.

    ``None`` for what the command line reports itself (bad input, and in a single
    process anything but divergence). In a data-parallel run every rank stops with
    the same line and code (:func:`qtemperate.training.distributed.on_failure`); the
    rank chosen to print it adds the traceback above it when the error was unexpected.
    """
    from qtemperate.training.distributed import PeerFailed, env_world_size, failure_of
    from qtemperate.training.guards import TrainingDiverged

    report = failure_of(exc)
    if env_world_size() <= 1 or report is None:
        if isinstance(exc, TrainingDiverged):
            print(f"qtemperate: {exc}", file=sys.stderr)
            return 1
        return None
    if report.prints:
        expected = isinstance(exc, PeerFailed | FileNotFoundError) or type(exc).__module__.startswith("qtemperate")
        if not expected:
            traceback.print_exception(exc)
        prefix = "qtemperate: error: " if report.exit_code == 2 else "qtemperate: "
        print(prefix + report.line, file=sys.stderr, flush=True)
    return report.exit_code


def launch_local(
    argv: Sequence[str],
    nproc: int,
    grace_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``python *argv`` as ``nproc`` ranks on this machine; return the group's exit code.

    Args:
        argv: Arguments after the interpreter (e.g. ``["-m", "qtemperate", "run", ...]``).
        nproc: Number of processes (ranks 0..nproc-1).
        grace_s: After the first process fails, how long the others may take to stop
            on their own before they are terminated.
        env: Extra environment for every process.

    Returns:
        0 when every process succeeded, else the exit code of the first that failed
        (``128 + signal`` for a process killed by a signal).
    """
    import torch.distributed as dist

    host = "127.0.0.1"
    # Port 0: the OS picks a free port; the store lives as long as this launcher.
    store = dist.TCPStore(host, 0, nproc, is_master=True, wait_for_workers=False)
    base = {**os.environ, **(env or {})}
    base.update({
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": host,
        "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_RANK": "0",
    })
    procs = [
        subprocess.Popen([sys.executable, *argv], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    first: int | None = None
    deadline: float | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if first is None:
                failed = [c for c in codes if c not in (None, 0)]
                if failed:
                    first = failed[0]
                    deadline = time.monotonic() + grace_s
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                _stop(procs)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        return 130
    finally:
        del store
    if first is None:
        return 0
    return first if first > 0 else 128 - first


def _stop(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    end = time.monotonic() + 10.0
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
