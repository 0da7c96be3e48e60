"""Weights & Biases: online with credentials, offline run files otherwise, never in the way.

``wandb`` is imported lazily inside :class:`WandbLogger`, so ``import qtemperate``
stays fast. Offline runs land in ``run_dir/wandb/offline-run-*/run-<id>.wandb``
(``wandb sync`` uploads them later). A resumed run continues the same W&B run: the
logger keeps the run id in ``run_dir/wandb_run_id.txt`` and, with ``resume=True``,
reopens that id.

W&B never costs a run: before an online run starts, :func:`wandb_online_problem`
asks the W&B server whether the API key works, within :data:`ONLINE_CHECK_TIMEOUT_S`
seconds (``wandb.init`` itself may wait 10 s or more per attempt on an unreachable
server). Without a key, without network, or with a rejected key, the logger writes an
offline run into the run folder instead and says so once, with the ``wandb sync``
command that uploads it later.
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import re
import secrets
import string
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qtemperate.atomic import write_text_atomic
from qtemperate.errors import QtemperateWarning
from qtemperate.tracking.base import MetricLogger, Scalar, plain, safe_name
from qtemperate.tracking.keys import flat_summary

__all__ = [
    "ONLINE_CHECK_TIMEOUT_S",
    "RUN_ID_FILE",
    "WandbLogger",
    "resolve_wandb_mode",
    "wandb_api_key_available",
    "wandb_online_problem",
]

RUN_ID_FILE = "wandb_run_id.txt"
_WANDB_MODES = ("auto", "online", "offline", "disabled")
ONLINE_CHECK_TIMEOUT_S = 8.0
"""Longest the online check may take before the run falls back to offline run files."""


def wandb_api_key_available() -> bool:
    """Whether W&B credentials exist without prompting.

    True when ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` is set, or the netrc
    file (``$NETRC`` or ``~/.netrc``) has an entry for the W&B host
    (``$WANDB_BASE_URL``, default ``api.wandb.ai``).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = re.sub(r"^[a-z]+://", "", base).split("/")[0].split(":")[0]
    return _netrc_key(host) is not None


def _netrc_key(host: str) -> str | None:
    """The password of ``host``'s entry in ``$NETRC`` (else ``~/.netrc``, ``~/_netrc``)."""
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [
        os.path.expanduser("~/.netrc"),
        os.path.expanduser("~/_netrc"),
    ]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return auth[2]
    return None


def _probe(url: str, key: str | None, timeout: float) -> str | None:
    body = json.dumps({"query": "query Viewer { viewer { id } }"}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if key:
        token = base64.b64encode(f"api:{key}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return f"the W&B API key was rejected (HTTP {exc.code})" if key else None
        return f"the W&B server answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {url.rsplit('/', 1)[0]} ({reason})"
    if key and not (answer.get("data") or {}).get("viewer"):
        return "the W&B API key was rejected"
    return None


def wandb_online_problem(base_url: str | None = None, timeout: float = ONLINE_CHECK_TIMEOUT_S) -> str | None:
    """Why an online W&B run cannot start now, or ``None`` when it can.

    Checks, within ``timeout`` seconds in all (name resolution included): an API key
    exists (:func:`wandb_api_key_available`), the server at ``base_url`` (default:
    ``$WANDB_BASE_URL``, else W&B's own default) answers, and it accepts the key.
    """
    if not wandb_api_key_available():
        return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if base_url is None:
        base_url = os.environ.get("WANDB_BASE_URL")
        if not base_url:
            import wandb

            base_url = str(wandb.Settings().base_url)
    base_url = base_url.rstrip("/")
    host = re.sub(r"^[a-z]+://", "", base_url).split("/")[0].split(":")[0]
    key = os.environ.get("WANDB_API_KEY") or _netrc_key(host)
    result: list[str | None] = []
    # A thread bounds the whole check: urllib's timeout does not cover name resolution.
    worker = threading.Thread(target=lambda: result.append(_probe(f"{base_url}/graphql", key, timeout)),
                              daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        return f"no answer from {base_url} within {timeout:.0f} s"
    return result[0]


def resolve_wandb_mode(mode: str = "auto") -> str:
    """Resolve ``"auto"`` to a concrete W&B mode.

    ``auto``: ``$WANDB_MODE`` when set, else ``online`` with credentials
    (:func:`wandb_api_key_available`) and ``offline`` without. Other modes are
    returned unchanged.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in _WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(_WANDB_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode in ("dryrun",):
        return "offline"
    return "online" if wandb_api_key_available() else "offline"


class WandbLogger(MetricLogger):
    """Weights & Biases backend that never raises into training.

    ``wandb.init`` runs in the constructor with ``dir=run_dir``, so offline runs land
    in ``run_dir/wandb/offline-run-*/run-<id>.wandb`` (sync later with
    ``wandb sync``). Any exception from W&B produces one :class:`RuntimeWarning` and
    disables the logger; later calls do nothing.

    Args:
        project: W&B project.
        run_dir: The qtemperate run folder (``runs/<name>``).
        group: W&B group (e.g. the recipe name of a sweep).
        name: Display name of the run.
        mode: ``auto`` (online only with credentials, see :func:`resolve_wandb_mode`),
            ``online``, ``offline`` or ``disabled``.
        tags: Run tags.
        config: Initial config (the recipe).
        entity: W&B entity (team/user).
        run_id: Fixed run id (default: a new id, or the saved one when resuming).
        resume: ``True`` continues the W&B run whose id this logger saved in
            ``run_dir/wandb_run_id.txt`` (W&B policy ``"allow"``: a new run when there
            is none); a string is passed to W&B as the resume policy.
        system_stats: Sample CPU/GPU/memory statistics.
        init_timeout: Seconds ``wandb.init`` may take before it is given up (online,
            after the server has answered :func:`wandb_online_problem`).
        finish_timeout: Seconds ``finish`` waits for an online upload; what is left
            stays on disk for ``wandb sync`` (0 waits forever).
        settings: Extra ``wandb.Settings`` fields, overriding the defaults above.
        job_type: W&B job type (``train`` for a run, ``compare`` for a comparison).
    """

    def __init__(
        self,
        project: str,
        run_dir: str | os.PathLike[str],
        group: str | None = None,
        name: str | None = None,
        mode: str = "auto",
        tags: Iterable[str] | None = None,
        config: Mapping[str, Any] | None = None,
        entity: str | None = None,
        run_id: str | None = None,
        resume: bool | str | None = None,
        system_stats: bool = True,
        init_timeout: float = 30.0,
        finish_timeout: float = 300.0,
        settings: Mapping[str, Any] | None = None,
        job_type: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.mode = resolve_wandb_mode(mode)
        self.run: Any = None
        self.disabled = False
        self._step = 0
        self._finished = False
        self.fallback_reason: str | None = None
        self._finish_timeout = float(finish_timeout)
        self._history_keys: set[str] = set()
        self._summary_keys: set[str] = set()
        if self.mode == "disabled":
            self.disabled = True
            return
        if self.mode == "online":
            self.fallback_reason = wandb_online_problem()
            if self.fallback_reason is not None:
                self.mode = "offline"
        id_file = self.run_dir / RUN_ID_FILE
        if resume is True:
            if run_id is None and id_file.is_file():
                run_id = id_file.read_text().strip() or None
            resume = "allow" if run_id else None
        elif resume is False:
            resume = None
        try:
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            # One id for both attempts: an offline fallback syncs into the same W&B run.
            run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))

            def init(mode: str) -> Any:
                opts: dict[str, Any] = {
                    "init_timeout": float(init_timeout),
                    "console": "off",
                    "x_disable_stats": not system_stats,
                    "reinit": "create_new",
                    "finish_timeout": float(finish_timeout),
                }
                known = getattr(wandb.Settings, "model_fields", None)
                if known:  # drop defaults this wandb version does not have
                    opts = {k: v for k, v in opts.items() if k in known}
                opts.update(settings or {})
                opts["mode"] = mode
                return wandb.init(
                    project=project,
                    entity=entity,
                    dir=str(self.run_dir),
                    group=group,
                    name=name,
                    tags=list(tags) if tags else None,
                    config=plain(dict(config)) if config else None,
                    id=run_id,
                    resume=resume,
                    job_type=job_type,
                    settings=wandb.Settings(**opts),
                )

            try:
                self.run = init(self.mode)
            except Exception as exc:
                if self.mode != "online":
                    raise
                first = (str(exc).strip().splitlines() or [""])[0]
                self.fallback_reason = f"wandb.init failed ({type(exc).__name__}: {first})"
                self.mode = "offline"
                self.run = init("offline")
            if self.run is not None and getattr(self.run, "id", None):
                write_text_atomic(id_file, str(self.run.id))
            if self.fallback_reason is not None:
                where = self.run_path or self.run_dir / "wandb"
                warnings.warn(
                    f"W&B online unavailable: {self.fallback_reason}; logging offline to {where} "
                    f"(upload it later: wandb sync {where})",
                    QtemperateWarning,
                    stacklevel=2,
                )
        except Exception as exc:
            self._fail("wandb.init", exc)

    # -- failure handling -------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> None:
        self.disabled = True
        warnings.warn(
            f"W&B logging disabled after {what} failed: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )

    @property
    def active(self) -> bool:
        """Whether calls still reach W&B."""
        return not self.disabled and self.run is not None and not self._finished

    # -- locations --------------------------------------------------------------

    @property
    def run_path(self) -> Path | None:
        """Folder of this run's files (``run_dir/wandb/offline-run-*`` offline)."""
        if self.run is None:
            return None
        return Path(self.run.settings.sync_dir)

    @property
    def run_file(self) -> Path | None:
        """The run's ``.wandb`` transaction log, readable with ``wandb leet inspect``."""
        if self.run is None:
            return None
        return Path(self.run.settings.sync_file)

    @property
    def run_id(self) -> str | None:
        """W&B run id."""
        return None if self.run is None else str(self.run.id)

    @property
    def url(self) -> str | None:
        """Web URL of an online run (``None`` offline)."""
        return None if self.run is None or self.mode != "online" else self.run.url

    # -- logging ----------------------------------------------------------------

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """``run.log(metrics, step=step)``."""
        if not self.active:
            return
        try:
            self.run.log({str(k): plain(v) for k, v in metrics.items()}, step=int(step))
            self._step = max(self._step, int(step))
            self._history_keys.update(str(k) for k in metrics)
        except Exception as exc:
            self._fail("run.log", exc)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """``run.config.update(config)``."""
        if not self.active:
            return
        try:
            self.run.config.update(plain(dict(config)), allow_val_change=True)
        except Exception as exc:
            self._fail("run.config.update", exc)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """``run.summary.update`` with every value under a flat key
        (:func:`~qtemperate.tracking.keys.flat_summary`: ``stage/<name>/accuracy``,
        ``onnx_latency_ms/1`` ...), so W&B panels can chart each one and no table or
        history key replaces it.

        A key that was also logged as history is warned about: W&B keeps whichever
        of the two it writes last.
        """
        if not self.active:
            return
        try:
            flat = flat_summary(plain(dict(summary)))
            clash = sorted(set(flat) & self._history_keys)
            if clash:
                warnings.warn(
                    f"W&B summary keys also logged as history (the later write wins): {', '.join(clash)}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.run.summary.update(flat)
            self._summary_keys.update(flat)
        except Exception as exc:
            self._fail("run.summary.update", exc)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a ``wandb.Table`` under ``name`` at the latest step."""
        if not self.active:
            return
        self._check_key(name, "table")
        try:
            import wandb

            table = wandb.Table(columns=list(columns), data=[plain(list(r)) for r in rows])
            self.run.log({name: table}, step=self._step)
            self._history_keys.add(name)
        except Exception as exc:
            self._fail("logging table " + repr(name), exc)

    def log_image(self, name: str, path: str | os.PathLike[str]) -> None:
        """Log an image file as a ``wandb.Image`` under ``name`` at the latest step."""
        if not self.active:
            return
        self._check_key(name, "image")
        try:
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=self._step)
            self._history_keys.add(name)
        except Exception as exc:
            self._fail("logging image " + repr(name), exc)

    def log_scatter(
        self, name: str, columns: list[str], rows: list[list[Any]], x: str, y: str, title: str = ""
    ) -> None:
        """Log a table and a W&B scatter chart of its columns ``x`` and ``y`` (a report panel)."""
        if not self.active:
            return
        self._check_key(name, "chart")
        try:
            import wandb

            table = wandb.Table(columns=list(columns), data=[plain(list(r)) for r in rows])
            self.run.log({name: wandb.plot.scatter(table, x, y, title=title)}, step=self._step)
            self._history_keys.add(name)
        except Exception as exc:
            self._fail("logging chart " + repr(name), exc)

    def _check_key(self, name: str, what: str) -> None:
        if name in self._summary_keys:
            warnings.warn(
                f"W&B {what} {name!r} replaces the summary value of the same key", RuntimeWarning, stacklevel=3
            )

    def log_artifact(
        self, path: str | os.PathLike[str], name: str, type: str, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Log a file or folder as a ``wandb.Artifact`` (name sanitised for W&B) with
        ``metadata``. Logging the same name again makes a new version of it.

        A missing path only warns; it does not disable the logger.
        """
        if not self.active:
            return
        p = Path(path)
        if not p.exists():
            warnings.warn(f"W&B artifact {name!r} skipped: {p} does not exist", RuntimeWarning, stacklevel=2)
            return
        try:
            import wandb

            meta = plain(dict(metadata)) if metadata else None
            artifact = wandb.Artifact(safe_name(name), type=type, metadata=meta)
            if p.is_dir():
                artifact.add_dir(str(p))
            else:
                artifact.add_file(str(p))
            self.run.log_artifact(artifact)
        except Exception as exc:
            self._fail("logging artifact " + repr(name), exc)

    def finish(self, exit_code: int | None = None) -> None:
        """``run.finish()``; idempotent.

        Offline, it returns once the run's ``.wandb`` file holds the run's exit record
        (wandb's service may still be writing it when ``run.finish`` returns), so the
        file can be read, compared or synced right away; it waits at most
        ``min(finish_timeout, 60)`` seconds and then warns.
        """
        if self.run is None or self._finished:
            return
        self._finished = True
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._fail("run.finish", exc)
            return
        if self.mode == "offline":
            self._wait_for_log()

    def _wait_for_log(self) -> None:
        from qtemperate.tracking.wandb_reader import WandbReadError, read_wandb_run

        path = self.run_file
        if path is None:
            return
        limit = self._finish_timeout if self._finish_timeout > 0 else 60.0
        deadline, delay, last_size = time.monotonic() + min(limit, 60.0), 0.02, -1
        while True:
            size = path.stat().st_size if path.is_file() else -1
            if size != last_size and size > 0:
                last_size = size
                try:
                    if read_wandb_run(path).exit_code is not None:
                        return
                except WandbReadError:
                    pass  # no run record yet
            if time.monotonic() > deadline:
                warnings.warn(f"W&B run file {path} is still incomplete after run.finish()",
                              RuntimeWarning, stacklevel=3)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

