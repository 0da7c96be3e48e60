"""Read W&B runs back: offline run files, or online through W&B's public API.

**Offline.** A run writes its transaction log ``run-<id>.wandb`` (under
``wandb/offline-run-*/`` when offline); ``wandb sync`` uploads it later. The file is
a 7-byte header (``:W&B``, the magic ``0xBEE1`` little-endian, version 0) followed by
the LevelDB log format in 32 KiB blocks: each chunk is a 7-byte header (CRC-32 of the
type byte and the data, little-endian; data length, uint16; type: 1 full, 2 first,
3 middle, 4 last) and its data; a block with fewer than 7 bytes left is padded. A
record is a ``wandb_internal_pb2.Record``: the protobuf schema of the installed
``wandb`` package. :func:`read_wandb_run` folds the records as W&B's backend does:
the run record (id, project, group, tags, name, job type), config and summary
updates in order, artifacts with their metadata and files, the exit code. Every
chunk's checksum is verified; a log that ends inside a record (a run still writing,
or killed) is read up to its last whole record.

**Online.** :func:`read_online_runs` lists ``entity/project[/group]`` with
``wandb.Api`` (credentials and network needed; a clear :class:`WandbReadError`
otherwise).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "WandbReadError",
    "WandbRun",
    "find_wandb_run_files",
    "read_online_runs",
    "read_records",
    "read_wandb_run",
    "read_wandb_runs",
]

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_VERSION = 0
_FILE_HEADER = 7
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbReadError(Exception):
    """A W&B run cannot be read (not a run file, corrupt, or online access failed)."""


@dataclass
class WandbRun:
    """What a W&B run holds, as :func:`read_wandb_run` or :func:`read_online_runs` read it.

    Attributes:
        run_id: W&B run id.
        name: Display name.
        project: W&B project.
        entity: W&B entity ("" offline).
        group: W&B group ("" for none).
        job_type: W&B job type ("" for none).
        tags: Run tags.
        config: The run config (user keys; ``_wandb`` left out).
        summary: The run summary (keys as logged; nested where W&B nests).
        artifacts: ``{"name", "type", "metadata", "files"}`` per logged artifact.
        exit_code: The exit code (``None`` while running or killed).
        source: The file (or ``entity/project/run_id``) it was read from.
    """

    run_id: str
    name: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    source: str = ""


# --------------------------------------------------------------------------- the log format


def _chunks(data: bytes, path: Path) -> Iterator[bytes]:
    """The records (reassembled from chunks) of a transaction log's bytes."""
    if len(data) < _FILE_HEADER or data[:4] != _IDENT:
        raise WandbReadError(f"{path}: not a W&B run file (no ':W&B' header)")
    magic, version = struct.unpack("<HB", data[4:7])
    if magic != _MAGIC or version != _VERSION:
        raise WandbReadError(f"{path}: unsupported W&B run file (magic {magic:#x}, version {version})")
    pos, pending = _FILE_HEADER, None
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left  # block trailer
            continue
        if pos + _CHUNK_HEADER > len(data):
            return  # the writer stopped inside a chunk header
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0 and length == 0 and crc == 0:
            pos += left  # zero padding to the end of the block
            continue
        start = pos + _CHUNK_HEADER
        if start + length > len(data):
            return  # the writer stopped inside a record: read what is whole
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise WandbReadError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos = start + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE and pending is not None:
            pending += payload
        elif kind == _LAST and pending is not None:
            yield pending + payload
            pending = None
        else:
            raise WandbReadError(f"{path}: corrupt record at byte {pos} (chunk type {kind})")


def read_records(path: str | Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order.

    Raises:
        WandbReadError: not a W&B run file, or a corrupt one.
        FileNotFoundError: no such file.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # the schema the installed wandb writes

    p = Path(path)
    for payload in _chunks(p.read_bytes(), p):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf's DecodeError
            raise WandbReadError(f"{p}: undecodable record ({type(exc).__name__})") from None
        yield record


def _value(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _apply(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    node = target
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    node[keys[-1]] = _value(item.value_json)


def _remove(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    node: Any = target
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def _fold(record: Any, run: WandbRun) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        run.run_id = r.run_id or run.run_id
        run.name = r.display_name or run.name
        run.project = r.project or run.project
        run.entity = r.entity or run.entity
        run.group = r.run_group or run.group
        run.job_type = r.job_type or run.job_type
        run.tags = list(r.tags) or run.tags
        for item in r.config.update:
            _apply(run.config, item)
        for item in r.summary.update:
            _apply(run.summary, item)
    elif kind == "config":
        for item in record.config.update:
            _apply(run.config, item)
        for item in record.config.remove:
            _remove(run.config, item)
    elif kind == "summary":
        for item in record.summary.update:
            _apply(run.summary, item)
        for item in record.summary.remove:
            _remove(run.summary, item)
    elif kind == "artifact":
        a = record.artifact
        run.artifacts.append({
            "name": a.name,
            "type": a.type,
            "metadata": _value(a.metadata) if a.metadata else {},
            "files": [c.path for c in a.manifest.contents],
        })
    elif kind == "exit":
        run.exit_code = int(record.exit.exit_code)


def read_wandb_run(path: str | Path) -> WandbRun:
    """Read one ``.wandb`` file (see the module docstring).

    Raises:
        WandbReadError: not a W&B run file, a corrupt one, or one without a run record.
    """
    p = Path(path)
    run = WandbRun(run_id="", source=str(p))
    for record in read_records(p):
        _fold(record, run)
    if not run.run_id:
        raise WandbReadError(f"{p}: W&B run file without a run record")
    run.config.pop("_wandb", None)
    return run


# --------------------------------------------------------------------------- folders


def find_wandb_run_files(path: str | Path) -> list[Path]:
    """The ``.wandb`` files of a path: the file itself, a run's sync folder
    (``offline-run-*``), a ``wandb`` folder, or a folder holding one (a qtemperate run).

    Returns:
        The files, oldest first (empty when there are none).
    """
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix == ".wandb" else []
    found: set[Path] = set()
    for folder in (p, p / "wandb"):
        if folder.is_dir():
            # resolve(): wandb/latest-run is a link to one of the run folders
            found.update(f.resolve() for f in folder.glob("run-*.wandb"))
            found.update(f.resolve() for f in folder.glob("*run-*/run-*.wandb"))
    return sorted(found, key=lambda f: (f.stat().st_mtime, str(f)))


def read_wandb_runs(path: str | Path) -> list[WandbRun]:
    """Every W&B run under ``path`` (:func:`find_wandb_run_files`), one per run id.

    A resumed run writes one file per session under the same id; they are folded
    in order into one run (later config and summary values win).

    Raises:
        WandbReadError: a file cannot be read.
    """
    runs: dict[str, WandbRun] = {}
    for f in find_wandb_run_files(path):
        one = read_wandb_run(f)
        prev = runs.get(one.run_id)
        if prev is None:
            runs[one.run_id] = one
            continue
        prev.config.update(one.config)
        prev.summary.update(one.summary)
        prev.artifacts += one.artifacts
        prev.exit_code = one.exit_code if one.exit_code is not None else prev.exit_code
        prev.tags = one.tags or prev.tags
        prev.name, prev.group = one.name or prev.name, one.group or prev.group
        prev.source = one.source
    return list(runs.values())


# --------------------------------------------------------------------------- online

_ONLINE_PATH = re.compile(r"^(?:wandb:)?([\w.-]+)/([\w.-]+)(?:/([\w.-]+))?$")


def parse_online_path(text: str) -> tuple[str, str, str | None] | None:
    """``(entity, project, group)`` of ``[wandb:]entity/project[/group]``; else ``None``."""
    m = _ONLINE_PATH.match(text)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def read_online_runs(path: str, api: Any = None, timeout: float = 30.0) -> list[WandbRun]:
    """The runs of ``entity/project[/group]`` on the W&B server.

    Args:
        path: ``[wandb:]entity/project`` or ``[wandb:]entity/project/group``.
        api: A ``wandb.Api``-like object (tests pass one); default: ``wandb.Api``,
            which needs credentials and network.
        timeout: Seconds per API request.

    Raises:
        WandbReadError: a malformed path, no credentials, or the server could not be read.
    """
    parsed = parse_online_path(path)
    if parsed is None:
        raise WandbReadError(f"{path}: not a W&B path entity/project[/group]")
    entity, project, group = parsed
    if api is None:
        from qtemperate.tracking.wandb_logger import wandb_api_key_available

        if not wandb_api_key_available():
            raise WandbReadError(
                f"{path}: reading W&B runs online needs credentials (WANDB_API_KEY or `wandb login`) "
                "and network; offline, pass the runs' folders or their wandb/ folders instead"
            )
        try:
            import wandb

            api = wandb.Api(timeout=int(timeout))
        except Exception as exc:
            raise WandbReadError(f"{path}: cannot reach W&B ({type(exc).__name__}: {exc})") from None
    try:
        listed = api.runs(f"{entity}/{project}", filters={"group": group} if group else None)
        out = []
        for r in listed:
            summary = getattr(r, "summary_metrics", None)
            if summary is None:
                summary = dict(r.summary)
            out.append(WandbRun(
                run_id=str(r.id), name=str(getattr(r, "name", "") or ""), project=project, entity=entity,
                group=str(getattr(r, "group", "") or ""), job_type=str(getattr(r, "job_type", "") or ""),
                tags=list(getattr(r, "tags", []) or []),
                config={k: v for k, v in dict(getattr(r, "config", {}) or {}).items() if k != "_wandb"},
                summary=dict(summary), source=f"{entity}/{project}/{r.id}",
            ))
    except WandbReadError:
        raise
    except Exception as exc:  # network, authentication, a missing project
        msg = " ".join(str(exc).split())[:300]
        raise WandbReadError(f"{path}: cannot read the runs from W&B ({type(exc).__name__}: {msg})") from None
    return out
