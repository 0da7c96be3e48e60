"""Architectures as data: a (pruned) model saved as its factory, its kwargs and its shapes.

A pruned student is not the model its factory builds: torch-pruning removed
channels, so layers have other widths. Pickling the ``nn.Module`` would store it, but
reading a pickle runs code. :class:`ArchSpec` stores it as plain data instead:

* ``model`` and ``kwargs``: what :func:`qtemperate.models.build_model` builds it from
  (a registry name, a torchvision name or an import path ``pkg.module:factory``);
* ``modules``: every submodule's name and class (the rebuilt tree must match);
* ``shapes``: the shape of every parameter and buffer (pruning changes these);
* ``attrs``: each submodule's plain attributes (``out_channels``, ``in_features``,
  ``num_features``, ``groups``, ... — pruning changes these too);
* ``extra_buffers``: the values of non-persistent buffers (absent from state dicts).

:func:`build_architecture` calls the factory, checks the module tree, resizes every
parameter and buffer to the saved shape and restores the attributes; the state dict
then loads with ``strict=True``. This is what torch-pruning's own
``tp.state_dict``/``tp.load_state_dict`` do (restore each module's ``__dict__``), but
restricted to tensors and plain values, so the file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ARCH_FORMAT", "ArchSpec", "ArchSpecError", "build_architecture", "describe_architecture"]

ARCH_FORMAT = "qtemperate.arch/1"

# nn.Module's own bookkeeping (hooks, parameter tables, ...): never restored from a file.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


class ArchSpecError(ValueError):
    """The saved architecture cannot be rebuilt (the factory builds something else)."""


def _is_plain(value: Any) -> bool:
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return True
    if type(value) in (tuple, list, torch.Size):
        return all(_is_plain(v) for v in value)
    return False


def _plain_copy(value: Any) -> Any:
    if type(value) is torch.Size:
        return tuple(value)
    if type(value) in (tuple, list):
        return type(value)(_plain_copy(v) for v in value)
    return value


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_plain_kwargs(kwargs: Mapping[str, Any], where: str = "kwargs") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
            out[str(key)] = _check_plain_kwargs(value, f"{where}.{key}")
        elif _is_plain(value) or (isinstance(value, list) and all(isinstance(v, Mapping) or _is_plain(v) for v in value)):
            out[str(key)] = value
        else:
            raise ArchSpecError(
                f"{where}.{key} is a {type(value).__name__}; an architecture is rebuilt from plain "
                "data (numbers, strings, lists, dicts), so the factory's kwargs must be plain"
            )
    return out


@dataclass
class ArchSpec:
    """A model's architecture as plain data (see the module docstring)."""

    model: str
    kwargs: dict[str, Any]
    modules: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    search_path: list[str] = field(default_factory=list)
    """Folders an import-path factory is looked up in (the recipe's folder), before ``sys.path``."""

    def to_dict(self) -> dict[str, Any]:
        """A dict of tensors and plain values (``torch.load(weights_only=True)`` reads it)."""
        return {"format": ARCH_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any) -> ArchSpec:
        """Validate what :meth:`to_dict` wrote.

        Raises:
            ArchSpecError: not an architecture record, or a field of the wrong type.
        """
        if not isinstance(raw, Mapping) or raw.get("format") != ARCH_FORMAT:
            raise ArchSpecError(f"not a qtemperate architecture record (format {ARCH_FORMAT})")
        model, kwargs = raw.get("model"), raw.get("kwargs")
        if not isinstance(model, str) or not model or not isinstance(kwargs, Mapping):
            raise ArchSpecError("architecture record without a model name and kwargs")
        modules, shapes = raw.get("modules"), raw.get("shapes")
        attrs, extra = raw.get("attrs") or {}, raw.get("extra_buffers") or {}
        if not isinstance(modules, Mapping) or not isinstance(shapes, Mapping):
            raise ArchSpecError("architecture record without modules and shapes")
        if not all(isinstance(v, torch.Tensor) for v in extra.values()):
            raise ArchSpecError("architecture record: extra_buffers must be tensors")
        return cls(
            model=model,
            kwargs=dict(kwargs),
            modules={str(k): str(v) for k, v in modules.items()},
            shapes={str(k): [int(d) for d in v] for k, v in shapes.items()},
            attrs={str(k): dict(v) for k, v in attrs.items()},
            extra_buffers=dict(extra),
            search_path=[str(p) for p in raw.get("search_path") or []],
        )


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), by full name; shared ones once per owner."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in m._parameters.items():
            if p is not None:
                out[prefix + pname] = p
        for bname, b in m._buffers.items():
            if b is not None:
                out[prefix + bname] = b
    return out


def _attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: _plain_copy(v)
        for k, v in module.__dict__.items()
        if k not in _MODULE_INTERNALS and not k.startswith("__") and _is_plain(v)
    }


def describe_architecture(
    model: nn.Module, name: str, kwargs: Mapping[str, Any], verify: bool = True,
    search_path: Sequence[str | Path] = (),
) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``, built by ``build_model(name, **kwargs)`` then pruned.

    Args:
        model: The model (pruned or not; float, before quantization).
        name: What :func:`~qtemperate.models.build_model` resolves: a registry name
            (``"resnet20"``), a torchvision name or an import path
            (``"mypkg.nets:make_net"``).
        kwargs: The factory's keyword arguments, complete (``num_classes``,
            ``in_channels``, ...): plain data.
        verify: Rebuild the architecture now and check it matches, so a factory that
            cannot rebuild it (another tree, a lambda) fails when saving, not when loading.
        search_path: Folders an import-path ``name`` is resolved from (before ``sys.path``).

    Raises:
        ArchSpecError: kwargs that are not plain data, or a factory that does not
            rebuild this architecture.
    """
    plain_kwargs = _check_plain_kwargs(kwargs)
    persistent = set(model.state_dict().keys())
    tensors = _tensors(model)
    spec = ArchSpec(
        model=name,
        kwargs=plain_kwargs,
        modules={n: _class_name(m) for n, m in model.named_modules()},
        shapes={n: list(t.shape) for n, t in tensors.items()},
        attrs={n: a for n, m in model.named_modules() if (a := _attrs(m))},
        extra_buffers={
            n: t.detach().cpu().clone()
            for n, t in tensors.items()
            if n not in persistent and not isinstance(t, nn.Parameter)
        },
        search_path=[str(p) for p in search_path],
    )
    if verify:
        rebuilt = build_architecture(spec)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))[:3]
            raise ArchSpecError(
                f"build_model({name!r}, **kwargs) does not rebuild this architecture "
                f"(state dict differs: {diff}); pass the factory and kwargs that built it"
            )
    return spec


def build_architecture(
    spec: ArchSpec, state_dict: Mapping[str, torch.Tensor] | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """Rebuild the model :func:`describe_architecture` described (and load ``state_dict``).

    Raises:
        ArchSpecError: the factory cannot be resolved, or builds a different module tree,
            or the state dict does not fit.
    """
    from qtemperate.models import resolve_model

    try:
        with torch.random.fork_rng(devices=[]):  # rebuilding must not shift the run's random draws
            model = resolve_model(spec.model, spec.search_path)(**spec.kwargs)
    except (KeyError, TypeError, ValueError, ImportError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ArchSpecError(f"cannot build model {spec.model!r}: {msg}") from None
    built = {n: _class_name(m) for n, m in model.named_modules()}
    if built != spec.modules:
        missing = [n for n in spec.modules if n not in built]
        extra = [n for n in built if n not in spec.modules]
        changed = [n for n in spec.modules if n in built and built[n] != spec.modules[n]]
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"{changed[0]} is {built[changed[0]]}, saved {spec.modules[changed[0]]}")
        raise ArchSpecError(
            f"model {spec.model!r} now builds a different module tree than the saved one ({what}); "
            "was its code changed since the file was written?"
        )
    replaced: dict[int, torch.Tensor] = {}  # keep tied parameters tied
    seen: set[str] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for key, value in spec.attrs.get(mname, {}).items():
            # Only the plain attributes the factory's own module has (widths, groups, ...):
            # a file never adds attributes or touches nn.Module's bookkeeping.
            if key in m.__dict__ and key not in _MODULE_INTERNALS and _is_plain(m.__dict__[key]) and _is_plain(value):
                m.__dict__[key] = value
        for table in (m._parameters, m._buffers):
            for tname, t in list(table.items()):
                if t is None:
                    continue
                full = prefix + tname
                if full not in spec.shapes:
                    raise ArchSpecError(f"model {spec.model!r} has {full!r}, which the saved architecture lacks")
                seen.add(full)
                shape = tuple(spec.shapes[full])
                if id(t) in replaced:
                    table[tname] = replaced[id(t)]  # type: ignore[assignment]
                    continue
                if tuple(t.shape) != shape or full in spec.extra_buffers:
                    if full in spec.extra_buffers:
                        new = spec.extra_buffers[full].to(dtype=t.dtype).clone()
                    else:
                        new = torch.zeros(shape, dtype=t.dtype)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    replaced[id(t)] = new
                    table[tname] = new  # type: ignore[assignment]
    missing = sorted(set(spec.shapes) - seen)
    if missing:
        raise ArchSpecError(f"model {spec.model!r} lacks {missing[:3]} of the saved architecture")
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ArchSpecError(f"the saved weights do not fit the rebuilt {spec.model!r}: "
                                f"{_first_line(exc)}") from None
    return model.to(device)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(exc).__name__
