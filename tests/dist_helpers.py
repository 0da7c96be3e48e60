"""Run a function on a gloo group of CPU processes (torch.multiprocessing, spawn)."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def _entry(rank: int, world: int, store: str, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_group(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 300.0) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each rank in its own process of one
    gloo group. ``fn`` must be importable (module level) and return picklable values
    (plain Python, not tensors)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world, store, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=timeout) for _ in range(world)]
        for p in procs:
            p.join(timeout=60)
    failures = [msg for _, ok, msg in got if not ok]
    if failures:
        raise AssertionError("a rank failed:\n" + "\n".join(failures))
    return [value for _, _, value in sorted(got, key=lambda g: g[0])]
