"""What the failure paths cost: W&B's offline fallback and the size-target dry run.

* W&B: seconds from ``WandbLogger(mode="online")`` to a logger writing offline run
  files, for each way an online run cannot start (no key, no network, a rejected key,
  a server that never answers); the issue's bound is 15 s.
* The dry run a run makes before its teacher trains
  (:func:`qtemperate.training.student.check_student_target`): seconds for a recipe,
  next to the teacher training it protects.

Run (on a quiet machine, under the shared measurement lock)::

    flock /work/wt/measure.lock .venv/bin/python bench/failure_paths.py --out bench/results/failure_paths.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any


class _Reject(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


_KEEP: list[Any] = []  # the servers' sockets live as long as the benchmark


def _servers() -> dict[str, str]:
    reject = http.server.HTTPServer(("127.0.0.1", 0), _Reject)
    threading.Thread(target=reject.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (kernel backlog), never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    _KEEP.extend([reject, silent])
    return {
        "rejected key (HTTP 401)": f"http://127.0.0.1:{reject.server_port}",
        "server never answers": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "no network (connection refused)": f"http://127.0.0.1:{closed_port}",
    }


def wandb_fallback(repeats: int) -> dict[str, list[float]]:
    from qtemperate.tracking.wandb_logger import WandbLogger

    out: dict[str, list[float]] = {}
    cases: dict[str, str | None] = {"no API key": None, **_servers()}
    for case, url in cases.items():
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                env = {"WANDB_DIR": tmp, "NETRC": os.path.join(tmp, "none"), "WANDB_SILENT": "true"}
                saved = {k: os.environ.get(k) for k in (*env, "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE")}
                os.environ.update(env)
                os.environ.pop("WANDB_MODE", None)
                if url is None:
                    os.environ.pop("WANDB_API_KEY", None)
                    os.environ.pop("WANDB_BASE_URL", None)
                else:
                    os.environ.update(WANDB_API_KEY="k" * 40, WANDB_BASE_URL=url)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lg = WandbLogger("bench", Path(tmp) / "run", mode="online", settings={"x_disable_stats": True})
                times.append(time.perf_counter() - t0)
                assert lg.mode == "offline" and lg.active, case
                lg.finish()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        out[case] = times
    return out


def target_check(recipe_path: str, repeats: int) -> dict[str, Any]:
    import torch

    from qtemperate.preflight import dataset_info
    from qtemperate.recipe import load_recipe
    from qtemperate.training.student import check_student_target

    recipe = load_recipe(recipe_path)
    info = dataset_info(recipe.data.name, recipe.data.kwargs)
    example = torch.randn(1, info.in_channels, *info.image_size)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        check_student_target(recipe, info.num_classes, info.in_channels, example)
        times.append(time.perf_counter() - t0)
    return {"recipe": recipe_path, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    wb = wandb_fallback(args.repeats)
    checks = [target_check(r, args.repeats) for r in ("recipes/fashion_mnist_quickstart.yaml",)]
    result = {
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "wandb_fallback_s": {k: {"median": statistics.median(v), "max": max(v), "all": v} for k, v in wb.items()},
        "target_check_s": [{**c, "median": statistics.median(c["seconds"])} for c in checks],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
