"""W&B never costs a run: an online run that cannot start falls back to offline files, fast."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qtemperate.errors import QtemperateWarning
from qtemperate.tracking import wandb_logger as W
from tests import wandb_reader

BOUND_S = 15.0  # the bound from wandb.init to offline files


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_MODE",
                "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b'{"data": {"viewer": {"id": "u1"}}}'

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[type[_Handler]]:
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{httpd.server_port}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler
    httpd.shutdown()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers (a hung proxy or server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    sock.close()


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _online_falls_back(run_dir: Path, why: str) -> W.WandbLogger:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lg = W.WandbLogger("p", run_dir, mode="online", settings={"x_disable_stats": True})
        lg.log({"loss": 1.5}, 3)
        lg.log_summary({"acc": 0.5})
        lg.finish()
    elapsed = time.perf_counter() - t0
    ours = [w for w in rec if issubclass(w.category, QtemperateWarning)]
    assert len(ours) == 1, [str(w.message) for w in rec]  # said once
    text = str(ours[0].message)
    assert why in text and f"wandb sync {lg.run_path}" in text
    assert elapsed < BOUND_S
    assert lg.mode == "offline" and lg.run_path is not None and lg.run_path.name.startswith("offline-run-")
    data = wandb_reader.read_offline_run(run_dir / "wandb")  # W&B-readable files, for `wandb sync`
    assert data["summary"]["acc"] == 0.5 and any(row.get("loss") == 1.5 for row in data["history"])
    assert (run_dir / W.RUN_ID_FILE).read_text() == lg.run_id == data["run_id"]
    return lg


def test_online_without_a_key_falls_back(wandb_env: Path) -> None:
    _online_falls_back(wandb_env / "run", "no W&B API key")


def test_online_without_network_falls_back(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", _closed_port())
    _online_falls_back(wandb_env / "run", "cannot reach http://127.0.0.1")


def test_online_with_a_rejected_key_falls_back(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                               server: type[_Handler]) -> None:
    server.status, server.body = 401, b'{"errors": ["unauthorized"]}'
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)  # type: ignore[attr-defined]
    _online_falls_back(wandb_env / "run", "the W&B API key was rejected (HTTP 401)")


def test_online_with_a_silent_server_falls_back_within_the_bound(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, silent_server: str
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    assert W.ONLINE_CHECK_TIMEOUT_S < BOUND_S - 3  # room for the offline init
    _online_falls_back(wandb_env / "run", "no answer from")


def test_online_check_accepts_a_working_key(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                            server: type[_Handler]) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "d" * 40)
    assert W.wandb_online_problem(server.url) is None  # type: ignore[attr-defined]
    server.body = b'{"data": {"viewer": null}}'
    assert W.wandb_online_problem(server.url) == "the W&B API key was rejected"  # type: ignore[attr-defined]


def test_online_init_failure_after_the_check_falls_back(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    real_init = wandb.init

    def init(*args: Any, **kwargs: Any) -> Any:
        if kwargs["settings"].mode == "online":
            raise TimeoutError("server went away")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(W, "wandb_online_problem", lambda *a, **k: None)
    monkeypatch.setattr(wandb, "init", init)
    _online_falls_back(wandb_env / "run", "wandb.init failed (TimeoutError: server went away)")
