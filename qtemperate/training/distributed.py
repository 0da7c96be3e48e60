"""Data-parallel runs: the process group, who writes, what is shared, how failures end a run.

A run started by ``torchrun --nproc_per_node N -m qtemperate run RECIPE`` (or
``qtemperate run RECIPE --nproc N``, :mod:`qtemperate.launch`) is ``N`` processes
running the same pipeline. This module is the only place that talks to
``torch.distributed``; every helper is the identity in a single process, so the
trainer reads the same either way.

* **Joining** (:func:`init_process_group`): the rank, world size and rendezvous come
  from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``); the backend and timeout from the recipe's
  ``distributed`` section (``auto``: NCCL for CUDA, gloo otherwise). Every collective
  and barrier inherits ``distributed.timeout_s``: a process that hangs ends the others'
  wait with an error naming the timeout instead of leaving them blocked forever.
* **Who writes**: rank 0 alone writes files (checkpoints, ``metrics.jsonl``, W&B,
  ``summary.json``, ONNX); the others wait in the next collective. Files rank 0 reads
  (``checkpoint.pt`` on ``--resume``, ``teacher.pt``, ``student_arch.pt``) reach the
  others by broadcast (:func:`from_main`), so only rank 0 needs the run folder.
* **Identical models** (:func:`sync_module_`): between-epoch work (BatchNorm
  re-estimation, Brevitas calibration, ``set_bit_width``) runs identically on every
  rank; then rank 0's parameters and buffers are broadcast, and whether the ranks
  already agreed bit for bit is returned (and logged). Pruning runs on rank 0 only and
  its architecture is broadcast (a tie in an importance score must not pick different
  channels on different GPUs).
* **Training** (:func:`wrap` / :func:`unwrap`): DistributedDataParallel, with
  BatchNorm synchronised over the global batch when ``distributed.sync_batchnorm``
  (:mod:`~qtemperate.training.sync_batchnorm`).
* **Metrics**: loss parts are averaged over ranks (:func:`mean_over_ranks`: with
  equal per-rank batches the mean of the per-rank means is the global batch mean),
  evaluation sums are added (:func:`sum_over_ranks`), the teacher-logit cache is
  computed in shards and gathered (:func:`gather_shards`).
* **Failures** (:func:`on_failure`): the first rank to fail posts one line (and an
  exit code) in the rendezvous store and leaves the group; the others' pending
  collectives then fail, they read that line and stop with it (:class:`PeerFailed`).
  The reporting rank alone prints it (:func:`failure_of`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from qtemperate.recipe import Recipe

__all__ = [
    "GroupFailure",
    "PeerFailed",
    "barrier",
    "broadcast_object",
    "check_recipe",
    "env_local_rank",
    "env_rank",
    "env_world_size",
    "failure_of",
    "from_main",
    "gather_shards",
    "init_process_group",
    "is_distributed",
    "is_main",
    "mean_over_ranks",
    "on_failure",
    "rank",
    "resolve_backend",
    "rewrap",
    "shutdown",
    "state_digest",
    "sum_over_ranks",
    "sync_module_",
    "unwrap",
    "unwrap_ddp",
    "world_size",
    "wrap",
]

T = TypeVar("T")

FAILURE_KEY = "qtemperate/failure"
ACK_KEY = "qtemperate/failure_acks"
FAILURE_WAIT_S = 5.0
"""How long a failing rank waits for the others to read its line, and how long a rank
whose collective broke waits for a line to appear."""


# -- where this process stands ------------------------------------------------------------
def env_rank() -> int:
    """``RANK`` from the launcher's environment (0 when absent)."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    """``LOCAL_RANK`` (the process's index on its node; 0 when absent)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    """``WORLD_SIZE`` from the launcher's environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process is in an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (the launcher's ``RANK`` before the group is joined)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()


def world_size() -> int:
    """Processes in the group (the launcher's ``WORLD_SIZE`` before it is joined)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world_size()


def is_main() -> bool:
    """Rank 0: the process that writes files and talks to W&B."""
    return rank() == 0


# -- joining and leaving ------------------------------------------------------------------
def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend for ``requested`` (``auto``/``gloo``/``nccl``) on ``device``.

    Raises:
        ValueError: the backend is not built into this torch, or NCCL without CUDA;
            the message names ``distributed.backend``.
    """
    if not dist.is_available():
        raise ValueError("distributed.backend: this torch build has no torch.distributed")
    if requested == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if requested == "nccl":
        if not dist.is_nccl_available():
            raise ValueError("distributed.backend: nccl is not available in this torch build "
                             "(CPU-only torch); use gloo or auto")
        if device.type != "cuda":
            raise ValueError(f"distributed.backend: nccl needs CUDA, but the run's device is {device.type}; "
                             "use gloo or auto")
        return "nccl"
    if requested == "gloo" and not dist.is_gloo_available():
        raise ValueError("distributed.backend: gloo is not available in this torch build; use nccl or auto")
    return requested


def check_recipe(recipe: Recipe, world: int, device: torch.device) -> None:
    """What a run of ``recipe`` over ``world`` processes needs, checked before anything runs.

    Checks (only when ``world > 1``): the backend exists for the device, ``world``
    divides ``data.batch_size`` (the global batch), and activation ranges are
    calibrated (``student.calibration_batches > 0``: otherwise Brevitas would
    initialise them from each process's own first training batches and the ranks'
    models would differ). The training set holding a global batch is checked when
    the data is loaded (:class:`~qtemperate.data.sharding.DistributedEpochSampler`).

    Raises:
        RecipeError: one line naming the field.
    """
    from qtemperate.data.sharding import per_process_batch
    from qtemperate.recipe import RecipeError

    if world <= 1:
        return
    try:
        resolve_backend(recipe.distributed.backend, device)
        per_process_batch(recipe.data.batch_size, world)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    if recipe.student.calibration_batches == 0 and any(s.quantized for s in recipe.stages):
        raise RecipeError(
            f"student.calibration_batches: 0 with {world} processes; Brevitas would set activation ranges "
            "from each process's own first batches and the ranks would diverge; use >= 1"
        )


def init_process_group(backend: str, device: torch.device, timeout_s: float) -> bool:
    """Join the group the launcher started; ``True`` when this call created it.

    Nothing happens in a single process (``WORLD_SIZE`` absent or 1) or when the
    caller already initialised ``torch.distributed`` (its group is used as it is).
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    name = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(name, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives ----------------------------------------------------------------------------
def barrier() -> None:
    """Wait for every rank (gloo's monitored barrier names a rank that never arrives)."""
    if not is_distributed():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(wait_all_ranks=True)
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` holds it, on every rank (pickled; tensors included)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank.

    Used for what only rank 0 may do (read the run folder, prune, write files) and
    the others must agree on.
    """
    if not is_distributed():
        return fn()
    return broadcast_object(fn() if is_main() else None)  # type: ignore[return-value]


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def state_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module.state_dict()``: the
    state that defines the model (non-persistent buffers, e.g. Brevitas's statistics
    scratch space once its ranges are set, are left out)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def sync_module_(module: nn.Module) -> bool:
    """Make every rank's parameters and buffers rank 0's, in place.

    Returns:
        Whether all ranks already held bit-identical tensors (``True`` in a single
        process). Every rank runs the between-epoch work identically, so on a
        deterministic device this is ``True``; the broadcast makes the models equal
        even where a non-deterministic kernel would have drifted them by an ulp.
    """
    if not is_distributed():
        return True
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(module))
    for _, t in _tensors(module):
        dist.broadcast(t.data, src=0)
    return len(set(digests)) == 1


def mean_over_ranks(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Each value averaged over ranks, as floats (one all-reduce for all of them).

    With equal per-rank batches the mean of the ranks' batch means is the mean over
    the global batch: the number a single process with that batch would log.
    """
    keys = list(values)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(()).cpu() for k in keys])
    if is_distributed():
        stacked = _all_reduce_sum(stacked) / dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over ranks (float64)."""
    if not is_distributed():
        return list(values)
    return _all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; the values are tiny, so the copy costs nothing.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device)
    dist.all_reduce(out)
    return out.cpu()


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``0..n-1`` in order from the contiguous shards of every rank.

    ``local`` holds this rank's rows :func:`qtemperate.data.sharding.shard_range`
    ``(n, rank, world)``; shards are padded to equal length for the all-gather.
    """
    if not is_distributed():
        return local
    from qtemperate.data.sharding import shard_range

    w = dist.get_world_size()
    size = len(shard_range(n, 0, w))
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: len(shard_range(n, r, w))] for r, p in enumerate(parts)])


# -- training -----------------------------------------------------------------------------
def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = True) -> nn.Module:
    """``model`` ready for data-parallel training (itself in a single process).

    Its BatchNorms become synchronised ones in place (when ``sync_batchnorm``), then
    it is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, whose
    construction broadcasts rank 0's parameters and buffers. Optimizers built on
    ``model.parameters()`` before or after stay valid (the parameters are shared).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    from qtemperate.training.sync_batchnorm import convert_sync_batchnorm

    if sync_batchnorm:
        model = convert_sync_batchnorm(model, device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rewrap(model: nn.Module, device: torch.device) -> nn.Module:
    """A fresh DistributedDataParallel around the module ``model`` wraps (``model`` itself
    when it is not wrapped): after ``requires_grad`` changed (a freeze), DDP must be
    rebuilt, since it expects a gradient for every parameter that required one when
    it was built."""
    inner = unwrap_ddp(model)
    if inner is model:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(inner, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    inner = getattr(model, "module", None)
    if inner is not None and type(model).__name__ == "DistributedDataParallel":
        return inner
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind :func:`wrap`, with its plain BatchNorm classes back."""
    from qtemperate.training.sync_batchnorm import revert_sync_batchnorm

    return revert_sync_batchnorm(unwrap_ddp(model))


# -- failures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupFailure:
    """How a failure ends this process: the group's one line, exit code, and whether
    this process prints it (one process per group does)."""

    line: str
    exit_code: int
    prints: bool


class PeerFailed(RuntimeError):
    """Another rank failed; this rank stops with that rank's line and exit code."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code


_ATTR = "qtemperate_group_failure"


def failure_of(exc: BaseException) -> GroupFailure | None:
    """The group failure :func:`on_failure` attached to ``exc`` (``None``: not distributed)."""
    return getattr(exc, _ATTR, None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_collective_error(exc: BaseException) -> bool:
    """A failed collective: the consequence of another rank's failure, not a cause."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset",
                            "monitoredBarrier", "Timed out", "timed out", "ProcessGroup",
                            "Application timeout", "pair closure")  # gloo, when its timeout fires mid-transfer
    )


def _exit_code(exc: BaseException) -> int:
    """The exit code :mod:`qtemperate.errors` gives this failure (2 bad input, 3 environment,
    4 diverged, 1 a bug)."""
    from qtemperate.errors import classify

    return classify(exc)[0]


def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no store reachable: failures then end with this rank's own line
        return None


def _post(store: Any, line: str, code: int) -> tuple[str, int, bool]:
    """Post ``line`` unless a rank posted first; return the group's line, code, and
    whether ours won."""
    payload = f"{code}\n{rank()}\n{line}"  # the rank makes equal lines from two ranks distinct
    try:
        won = store.compare_set(FAILURE_KEY, "", payload).decode()
    except Exception:
        return line, code, True
    head, _, text = won.partition("\n")
    return text.partition("\n")[2], int(head), won == payload


def _read_posted(store: Any, wait_s: float) -> tuple[str, int] | None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([FAILURE_KEY]):
                head, _, text = store.get(FAILURE_KEY).decode().partition("\n")
                return text.partition("\n")[2], int(head)
        except Exception:
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def on_failure(exc: BaseException) -> None:
    """End this rank's part of a failed run (call in an ``except`` block, then re-raise).

    In a single process it only attaches ``GroupFailure(str(exc), code, True)``. In a
    group:

    * ``exc`` is a failed collective (another rank stopped or timed out): the line the
      first failing rank posted is read and :class:`PeerFailed` raised with it; when
      none was posted (a killed process posts nothing) this rank posts its own
      ("... another process stopped (killed, lost or out of memory) or did not answer
      within distributed.timeout_s").
    * otherwise ``exc`` is this rank's own failure: it is posted (first one wins),
      the group is left so that the others' pending collectives fail at once, and this
      rank waits briefly for them to read the line.

    Exactly one rank of the group gets ``prints=True``.
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit) or failure_of(exc) is not None:
        return
    code = _exit_code(exc)
    if not is_distributed():  # a single process, or before the group exists: the node's first says it
        setattr(exc, _ATTR, GroupFailure(_one_line(exc), code, env_local_rank() == 0))
        return
    me, w = dist.get_rank(), dist.get_world_size()
    store = _store()
    if _is_collective_error(exc):
        posted = _read_posted(store, FAILURE_WAIT_S) if store is not None else None
        if posted is None:
            line = (f"rank {me} of {w}: the process group failed ({_one_line(exc)}): another process "
                    "stopped (killed, lost or out of memory) or did not answer within distributed.timeout_s")
            text, code, mine = _post(store, line, 1) if store is not None else (line, 1, True)
        else:
            (text, code), mine = posted, False
            with contextlib.suppress(Exception):
                store.add(ACK_KEY, 1)
        err = PeerFailed(text, code)
        setattr(err, _ATTR, GroupFailure(text, code, mine))
        raise err from exc
    line = _one_line(exc)
    if type(exc).__module__.split(".")[0] != "qtemperate" and not isinstance(exc, FileNotFoundError):
        line = f"rank {me} of {w}: {type(exc).__name__}: {line}"  # an unexpected error: say where
    text, code, mine = _post(store, line, code) if store is not None else (line, code, True)
    setattr(exc, _ATTR, GroupFailure(text, code, mine))
    if not mine:  # failed at the same point as the first (e.g. a NaN every rank saw)
        with contextlib.suppress(Exception):
            store.add(ACK_KEY, 1)
    shutdown()  # the others' pending collectives fail now instead of at the timeout
    if mine and store is not None:
        deadline = time.monotonic() + FAILURE_WAIT_S
        while time.monotonic() < deadline:
            try:
                if store.add(ACK_KEY, 0) >= w - 1:
                    break
            except Exception:
                break
            time.sleep(0.05)
