"""Building a recipe's model for its data, and checking that it fits before any training.

A recipe names a model by registry name, torchvision name or import path
(``teacher.model: mypkg.nets:make_net``). Import paths resolve from the recipe's
folder first, then the working directory, then ``sys.path``
(:func:`model_search_path`), so a ``mypkg/`` next to the recipe or in the folder the
command runs from works without ``PYTHONPATH``.

A factory receives the recipe's ``kwargs`` plus the dataset's facts
(``num_classes``, ``in_channels``), but only the facts its signature accepts
(:func:`factory_kwargs`): a factory without ``in_channels`` is not handed one. What it
builds is then checked against the data with one forward pass of a batch shaped like
the data (:func:`check_model`): the logits width must equal the class count (or, for a
multi-output model, the scored head's, with every head the recipe names present).
Every problem is a :class:`ModelSpecError` naming the recipe field, raised by
``qtemperate validate --check-files`` and by ``qtemperate run`` before the run folder
exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qtemperate.heads import Task
from qtemperate.models import resolve_model
from qtemperate.recipe import RecipeError

if TYPE_CHECKING:
    from qtemperate.data import DatasetInfo
    from qtemperate.recipe import Recipe

__all__ = [
    "ModelSpecError",
    "build_for_data",
    "build_recipe_model",
    "check_model",
    "check_outputs_kept",
    "factory_kwargs",
    "model_search_path",
]

DATA_FACTS = ("num_classes", "in_channels")
"""Keyword arguments filled from the dataset when the factory accepts them."""


class ModelSpecError(RecipeError):
    """A recipe's model cannot be built or does not fit the data (bad input: exit 2).

    Attributes:
        field: The recipe field to fix (``teacher.model``, ``student.kwargs.depth`` ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def model_search_path(recipe: Recipe | None = None) -> tuple[Path, ...]:
    """Folders searched (in this order, before ``sys.path``) for a model's import path:
    the recipe's folder (when it was read from a file) and the working directory."""
    folders = [recipe.source_dir] if recipe is not None and recipe.source_dir is not None else []
    cwd = Path.cwd()
    return tuple(dict.fromkeys([*folders, cwd]))


def _parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """``(keyword parameters, takes **kwargs)`` of a factory; ``None`` when unreadable."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C callables
        return None
    params = {
        n: p for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return params, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def factory_kwargs(
    factory: Callable[..., Any],
    kwargs: Mapping[str, Any],
    facts: Mapping[str, Any],
    section: str = "model",
    name: str = "",
) -> dict[str, Any]:
    """The keyword arguments to call ``factory`` with: every recipe kwarg, and the data
    facts the factory accepts (the recipe's own kwargs win over the facts).

    Raises:
        ModelSpecError: a recipe kwarg the factory does not take
            (``<section>.kwargs.<key>``), or a required parameter nobody provides
            (``<section>.kwargs``).
    """
    label = name or getattr(factory, "__name__", "the factory")
    read = _parameters(factory)
    if read is None:
        return {**facts, **kwargs}
    params, open_ended = read
    if not open_ended:
        for key in kwargs:
            if key not in params:
                accepted = ", ".join(params) or "(none)"
                raise ModelSpecError(
                    f"{section}.kwargs.{key}", f"{label}() takes no argument {key!r}; it takes: {accepted}"
                )
    merged = {k: v for k, v in facts.items() if open_ended or k in params}
    merged.update(kwargs)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in merged]
    if missing:
        raise ModelSpecError(
            f"{section}.kwargs",
            f"{label}() needs {', '.join(repr(m) for m in missing)}, which neither {section}.kwargs "
            "nor the data provide",
        )
    return merged


def build_for_data(
    name: str,
    kwargs: Mapping[str, Any],
    num_classes: int,
    in_channels: int,
    device: torch.device | str = "cpu",
    search_path: Sequence[Path] = (),
    section: str = "model",
) -> nn.Module:
    """Build ``name`` with the recipe's ``kwargs`` and the data facts it accepts, on ``device``.

    The recipe's own ``kwargs`` win over the dataset facts (preflight has already
    checked that an explicit ``num_classes`` agrees with the data).

    Raises:
        ModelSpecError: the name does not resolve, the kwargs do not fit the factory's
            signature, the factory fails or returns something that is not a module.
    """
    try:
        factory = resolve_model(name, search_path)
    except KeyError as exc:
        raise ModelSpecError(f"{section}.model", str(exc.args[0])) from None
    call = factory_kwargs(factory, kwargs, {"num_classes": num_classes, "in_channels": in_channels},
                          section, name)
    try:
        model = factory(**call)
    except Exception as exc:  # the user's factory: name it, don't trace back
        shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
        raise ModelSpecError(
            f"{section}.model", f"{name}({shown}) raised {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{section}.model", f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.to(device)


def build_recipe_model(
    recipe: Recipe, section: str, num_classes: int, in_channels: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """The recipe's ``teacher`` or ``student`` model (``section``) for the data."""
    cfg = getattr(recipe, section)
    return build_for_data(cfg.model, cfg.kwargs, num_classes, in_channels, device,
                          model_search_path(recipe), section)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


@torch.no_grad()
def check_model(
    model: nn.Module, info: DatasetInfo, task: Task, section: str, data: str = "the data"
) -> Any:
    """One forward pass of a batch of 2 inputs shaped like the data; return the output.

    Checks: the forward pass runs; a classifier returns ``(2, num_classes)`` logits; a
    multi-output model (``task`` with heads) returns a dict holding the scored head with
    ``(2, num_classes)`` logits and every head with a task loss.

    Raises:
        ModelSpecError: naming ``<section>.model`` (or ``task.*``) and what does not fit.
    """
    where = f"{section}.model"
    was_training = model.training
    model.eval()
    x = torch.randn(2, *info.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    fits = f"data {data} ({info.in_channels}x{info.image_size[0]}x{info.image_size[1]} inputs, {info.num_classes} classes)"
    try:
        out = model(x.to(device))
    except Exception as exc:
        raise ModelSpecError(
            where, f"does not fit {fits}: a forward pass of a {tuple(x.shape)} batch raised "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    finally:
        model.train(was_training)
    want = (2, info.num_classes)
    if not task.multi_head:
        if isinstance(out, Mapping):
            raise ModelSpecError(
                where, f"returns a dict of heads ({', '.join(out)}); name the scored head and each "
                "head's task loss in a task section (task.accuracy_head, task.losses)"
            )
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            raise ModelSpecError(
                where, f"returns {_shape(out)} for a batch of 2, but {fits} needs logits of shape {want}"
            )
        return out
    if not isinstance(out, Mapping):
        raise ModelSpecError(where, f"returns {_shape(out)}, not a dict of heads as the task section says")
    heads = ", ".join(out)
    if task.accuracy_head not in out:
        raise ModelSpecError("task.accuracy_head", f"{task.accuracy_head!r} is not a head of {section}.model ({heads})")
    if tuple(out[task.accuracy_head].shape) != want:
        raise ModelSpecError(
            where, f"head {task.accuracy_head!r} returns {_shape(out[task.accuracy_head])} for a batch of 2, "
            f"but {fits} needs logits of shape {want}"
        )
    for head, spec in task.losses.items():
        if head not in out:
            raise ModelSpecError(f"task.losses.{head}", f"{head!r} is not a head of {section}.model ({heads})")
        if spec.target not in info.targets:
            raise ModelSpecError(
                f"task.losses.{head}.target",
                f"{data} has no target {spec.target!r}; it has: {', '.join(info.targets)}",
            )
    return out


@torch.no_grad()
def check_outputs_kept(before: nn.Module, after: nn.Module, example_input: torch.Tensor) -> None:
    """Pruning must not change what a model outputs (a class head losing classes).

    Compares the output shapes (every head of a dict output) of ``before`` and
    ``after`` on ``example_input``.

    Raises:
        ModelSpecError: naming ``student`` and the head whose shape changed.
    """
    def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
        was = model.training
        model.eval()
        try:
            out = model(example_input)
        finally:
            model.train(was)
        if isinstance(out, Mapping):
            return {h: tuple(v.shape) for h, v in out.items()}
        return {"output": tuple(out.shape)}

    old, new = shapes(before), shapes(after)
    for head, shape in old.items():
        if new.get(head) != shape:
            raise ModelSpecError(
                "student",
                f"pruning changed {head!r} from {shape} to {new.get(head)}: the pruner keeps only "
                "the last layer's outputs, so a model with several output heads loses outputs; give "
                "the student its own architecture (student.model) without pruning",
            )
