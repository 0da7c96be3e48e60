"""One rank of a data-parallel test run: the CLI's run path plus probes and injected faults.

Started by :func:`qtemperate.launch.launch_local` as ``python -m tests.dist_entry SPEC``.
``SPEC`` is a JSON file: ``recipe`` (a raw recipe dict), ``run_dir``, ``out`` (folder for
``rank<r>.json``), optional ``resume``, ``stop_after_epochs`` and ``fault``
(``{"rank": r, "epoch": e, "kind": "raise" | "nan" | "kill" | "hang"}``, applied when
rank ``r`` starts global epoch ``e``).

Probes, written per rank: the digest of the student after every epoch, the digest after
every :func:`~qtemperate.training.distributed.sync_module_` and whether the ranks already
agreed before it, the teacher-logit cache digest, the summary, and on failure the exit
code and the line.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch


def main(spec_path: str) -> int:
    from qtemperate import losses
    from qtemperate.launch import exit_code_for
    from qtemperate.recipe import parse_recipe
    from qtemperate.trainer import Trainer
    from qtemperate.training import distributed
    from qtemperate.training.loop import Distiller

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    probes: dict[str, Any] = {"epochs": [], "synced": [], "agreed": [], "cache": None}
    fault = spec.get("fault")

    real_epoch = Distiller.train_epoch

    def train_epoch(self: Distiller, loader: Any, epoch: int, *args: Any, **kwargs: Any) -> dict[str, float]:
        if fault and fault["rank"] == rank and fault["epoch"] == epoch:
            kind = fault["kind"]
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank}")
            if kind == "nan":
                real_loss = losses.TemperateLoss.forward

                def poisoned(loss_self: Any, s: Any, t: Any, y: Any) -> Any:
                    out = real_loss(loss_self, s, t, y)
                    out["loss"] = out["loss"] * float("nan")
                    return out

                losses.TemperateLoss.forward = poisoned  # type: ignore[method-assign]
        if probes["cache"] is None and self.teacher.cache is not None:
            probes["cache"] = hashlib.sha256(self.teacher.cache.numpy().tobytes()).hexdigest()
        means = real_epoch(self, loader, epoch, *args, **kwargs)
        probes["epochs"].append(distributed.state_digest(distributed.unwrap_ddp(self.student)))
        return means

    real_sync = distributed.sync_module_

    def sync(module: torch.nn.Module) -> bool:
        agreed = real_sync(module)
        probes["agreed"].append(agreed)
        probes["synced"].append(distributed.state_digest(module))
        return agreed

    Distiller.train_epoch = train_epoch  # type: ignore[method-assign]
    distributed.sync_module_ = sync  # the trainer and teacher call it through the module

    out = Path(spec["out"])
    recipe = parse_recipe(spec["recipe"])
    try:
        probes["summary"] = Trainer(
            recipe, run_dir=spec["run_dir"], resume=spec.get("resume", False), progress=False,
            stop_after_epochs=spec.get("stop_after_epochs"),
        ).run()
        code = 0
    except Exception as exc:
        code = exit_code_for(exc)
        report = distributed.failure_of(exc)
        probes["error"] = report.line if report is not None else str(exc)
        if code is None:
            raise
    probes["exit"] = code
    (out / f"rank{rank}.json").write_text(json.dumps(probes, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
