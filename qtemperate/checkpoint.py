"""Checkpoints are data, never code: atomic saves, data-only loads, the student file format.

Every write goes through :mod:`qtemperate.atomic` (temporary file in the destination
folder, then :func:`os.replace`), so a run killed mid-write leaves the previous
checkpoint intact.

Every read uses ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
tuples and dicts come back; a file that pickles any other Python object (a whole
``nn.Module``, or a payload whose ``__reduce__`` would run a command) is refused with
one line naming the object (:class:`~qtemperate.errors.CheckpointError`, exit 2), and
nothing in it runs.

``student.pt`` (format ``qtemperate.student/2``) therefore holds the pruned float
architecture as data (:class:`~qtemperate.arch_spec.ArchSpec`: the model name, its
kwargs and every layer's shape), its float weights, the quantization settings and the
trained weights; :func:`load_student` rebuilds the model from them.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtemperate.arch_spec import ArchSpec, ArchSpecError, build_architecture, describe_architecture
from qtemperate.atomic import save_torch_atomic
from qtemperate.bits import FLOAT_BITS
from qtemperate.errors import BadInput, CheckpointError, environment_problem

__all__ = [
    "STATE_DICT_HINT",
    "STUDENT_FORMAT",
    "check_state_dict",
    "load_checkpoint",
    "load_student",
    "save_atomic",
    "save_student",
    "state_dict_from",
    "upgrade_student",
]

STUDENT_FORMAT = "qtemperate.student/2"
LEGACY_STUDENT_FORMAT = "qtemperate.student/1"
STATE_DICT_HINT = (
    "; if it is a whole model saved with torch.save(model, path), save its weights instead: "
    "torch.save(model.state_dict(), path)"
)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + rename).

    Raises:
        DiskFull: no space left; names ``path`` and the bytes the file needs.
    """
    return save_torch_atomic(obj, path)


def _unsafe_global(exc: BaseException) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    what: str | None = None,
    hint: str = "",
) -> Any:
    """Load a checkpoint as data (``torch.load(weights_only=True)``).

    Args:
        path: The file.
        map_location: Where tensors go.
        what: The recipe field or file role for messages (``"teacher.checkpoint"``).
        hint: Appended to the refusal of a file that pickles Python objects.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, truncated, not a PyTorch file, it pickles Python objects
            other than tensors and plain data (nothing from it is executed), or a float
            tensor in it holds NaN or infinite values (named by its key path).
    """
    path = Path(path)
    label = f"{what}: " if what else ""
    if not path.is_file():
        raise FileNotFoundError(f"{label}{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{label}cannot load {path}: the file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _unsafe_global(exc)
        if name is not None:
            raise CheckpointError(
                f"{label}refused to load {path}: it pickles the Python object {name}, and loading "
                "that could run code; qtemperate reads checkpoints as data only (tensors, numbers, "
                f"strings, lists, dicts){hint}"
            ) from None
        raise CheckpointError(f"{label}cannot load {path}: not a PyTorch checkpoint, or truncated ({_short(exc)})") from None
    except OSError as exc:
        problem = environment_problem(exc, path)
        if problem is not None:
            raise problem from None
        raise CheckpointError(f"{label}cannot load {path}: {_short(exc)}") from None
    except Exception as exc:  # a foreign or damaged file: name it, never a traceback
        raise CheckpointError(f"{label}cannot load {path}: not a PyTorch checkpoint, or truncated ({_short(exc)})") from None
    bad = _first_non_finite(obj)
    if bad is not None:  # checked here, where every checkpoint enters: nothing trains on it
        raise CheckpointError(
            f"{label}{path}: tensor {bad!r} holds NaN or infinite values (weights of a diverged or "
            "damaged run); use a checkpoint with finite weights"
        )
    return obj


def _first_non_finite(obj: Any, name: str = "") -> str | None:
    """The key path (``state_dict.conv1.weight``) of the first float tensor holding NaN/inf, or None."""
    if isinstance(obj, torch.Tensor):
        dense = obj.layout == torch.strided and (obj.is_floating_point() or obj.is_complex())
        if dense and not bool(torch.isfinite(obj).all()):
            return name or "<the tensor>"
        return None
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _first_non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def state_dict_from(obj: Any, path: str | Path, what: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: the object itself or its ``"state_dict"``.

    Raises:
        CheckpointError: no mapping of names to tensors in it.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        label = f"{what}: " if what else ""
        raise CheckpointError(
            f"{label}{path} does not hold a state dict (a mapping of parameter names to tensors, "
            'or {"state_dict": ...})'
        )
    return dict(obj)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`~qtemperate.errors.BadInput` naming the first key or shape that does not fit.

    Args:
        model: The model the state dict is for.
        state: The state dict.
        where: What to name in the message (``"teacher.checkpoint: t.pt"``).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model")
    if missing:
        problems.append(f"missing {missing[0]!r}")
    if unexpected:
        problems.append(f"unexpected {unexpected[0]!r}")
    if problems:
        count = len(shapes) + len(missing) + len(unexpected)
        more = f" ({count} mismatches)" if count > 1 else ""
        raise BadInput(f"{where} does not fit the model: {'; '.join(problems)}{more}")


def save_student(
    path: str | Path,
    arch: nn.Module,
    model: nn.Module,
    weight_bits: int,
    act_bits: int,
    first_last_bits: int,
    per_channel: bool,
    extra: dict[str, Any] | None = None,
    *,
    arch_model: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    arch_search_path: Sequence[str | Path] = (),
) -> Path:
    """Write ``student.pt``: the architecture as data, quantization settings and weights.

    Args:
        path: Output file (written atomically).
        arch: The (pruned) float model the student was quantized from.
        model: The trained student (quantized, or float when bits are 32).
        weight_bits: Weight bits of ``model`` (32: float).
        act_bits: Activation bits of ``model``.
        first_last_bits: Bits of the first and last layer.
        per_channel: Per-channel weight scales.
        extra: Plain metadata kept in the file.
        arch_model: The name :func:`~qtemperate.models.build_model` builds the unpruned
            architecture from: a registry name (``"resnet20"``), a torchvision name or an
            import path (``"mypkg.nets:make_net"``). Required.
        arch_kwargs: That factory's complete kwargs (``num_classes``, ``in_channels``,
            ``width``, ...). Required.
        arch_search_path: Folders an import-path ``arch_model`` is resolved from (the
            recipe's folder), before ``sys.path``.

    Raises:
        ValueError: ``arch_model``/``arch_kwargs`` missing, or they do not rebuild ``arch``.
    """
    if arch_model is None or arch_kwargs is None:
        raise ValueError(
            "save_student needs arch_model= and arch_kwargs=: the build_model name and kwargs "
            "that built the architecture (e.g. arch_model='resnet20', arch_kwargs={'num_classes': 10, "
            "'in_channels': 3}); the file stores the pruned shapes as data and rebuilds from them"
        )
    spec = describe_architecture(arch, arch_model, arch_kwargs, search_path=arch_search_path)
    payload = {
        "format": STUDENT_FORMAT,
        "arch": spec.to_dict(),
        "arch_state": arch.state_dict(),
        "state_dict": model.state_dict(),
        "weight_bits": int(weight_bits),
        "act_bits": int(act_bits),
        "first_last_bits": int(first_last_bits),
        "per_channel": bool(per_channel),
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    try:  # what cannot be read back as data must not be written
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"save_student: extra holds {_unsafe_global(exc) or 'a Python object'}; "
                         "keep it to numbers, strings, lists and dicts") from None
    return save_atomic(payload, path)


def load_student(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved by :func:`save_student` (nothing in the file is executed).

    Returns:
        The model in eval mode and the payload's metadata (bits, ``extra``, ``arch_model``,
        ``arch_kwargs``).

    Raises:
        CheckpointError: not a student file, an old-format file (a pickled
            architecture: see :func:`upgrade_student`), or weights that do not fit.
    """
    from qtemperate.quantization import quantize  # heavy import, only when needed

    path = Path(path)
    legacy = (
        f"; if it is a student.pt from qtemperate 0.1 ({LEGACY_STUDENT_FORMAT}, a pickled "
        "architecture) and you trust it, convert it once with qtemperate.checkpoint.upgrade_student"
    )
    payload = load_checkpoint(path, what="student file", hint=legacy)
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path}: not a qtemperate student file (format {STUDENT_FORMAT})")
    try:
        spec = ArchSpec.from_dict(payload["arch"])
        arch = build_architecture(spec, payload["arch_state"])
        if payload["weight_bits"] == FLOAT_BITS:
            model = arch
        else:
            model = quantize(
                arch,
                weight_bits=payload["weight_bits"],
                act_bits=payload["act_bits"],
                first_last_bits=payload["first_last_bits"],
                per_channel=payload["per_channel"],
            )
        model.load_state_dict(payload["state_dict"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: student file without {exc.args[0]!r}") from None
    except (ArchSpecError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {_short(exc).split(': ', 1)[-1]}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("arch", "arch_state", "state_dict")}
    meta["arch_model"], meta["arch_kwargs"] = spec.model, spec.kwargs
    return model, meta


def upgrade_student(
    path: str | Path, arch_model: str, arch_kwargs: Mapping[str, Any], out: str | Path | None = None
) -> Path:
    """Convert a qtemperate 0.1 ``student.pt`` (pickled architecture) to the data-only format.

    This one function unpickles the old file, which runs whatever code the file holds:
    call it only on files you wrote yourself or otherwise trust.

    Args:
        path: The old file.
        arch_model: The build_model name of the unpruned architecture (see :func:`save_student`).
        arch_kwargs: Its kwargs.
        out: Where to write the new file (default: replace ``path``).
    """
    old = torch.load(Path(path), map_location="cpu", weights_only=False)  # trusted by the caller
    if not isinstance(old, dict) or old.get("format") != LEGACY_STUDENT_FORMAT:
        raise ValueError(f"{path}: not a {LEGACY_STUDENT_FORMAT} student file")
    arch = old["arch"]
    model = arch
    if old["weight_bits"] != FLOAT_BITS:
        from qtemperate.quantization import quantize

        model = quantize(arch, weight_bits=old["weight_bits"], act_bits=old["act_bits"],
                         first_last_bits=old["first_last_bits"], per_channel=old["per_channel"])
    model.load_state_dict(old["state_dict"])
    return save_student(out or path, arch, model, old["weight_bits"], old["act_bits"], old["first_last_bits"],
                        old["per_channel"], extra=old.get("extra"), arch_model=arch_model, arch_kwargs=arch_kwargs)
