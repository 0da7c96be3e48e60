"""Structured channel pruning to a parameter or MAC budget with torch-pruning (DepGraph).

torch-pruning's ``pruning_ratio`` is a per-layer *channel* ratio; what a user wants
is a budget ("keep half of the parameters"). :func:`prune` bridges the two:

1. A uniform (local) channel ratio ``r`` makes every prunable group keep
   ``int(n * (1 - r))`` of its ``n`` channels, whichever channels the importance
   picks, so the parameter / MAC count after pruning is a deterministic,
   decreasing step function of ``r``. :func:`prune` searches ``r`` with a
   bracketing secant (Illinois) search on cheap one-shot trial prunings of a
   copy (random importance, one step) until the count is within half a percent
   of the target (or the step function's nearest step is found).
2. The real pruning then runs with the requested importance in
   ``iterative_steps`` steps (:func:`pruning_plan`) to the found ratio, the
   result is counted again and, should it miss, ``r`` is corrected and the real
   pruning redone.
3. Optionally the BatchNorm statistics are re-estimated on a few batches
   (:func:`recalibrate_batchnorm`); without that a pruned network's accuracy
   collapses because the running statistics no longer match the narrower layers.

The output layers keep their widths, and the result is checked against that rule: the
pruned model's outputs must have the names and shapes the input model's had. Attention
found in the module tree (:mod:`qtemperate.attention_heads`) loses whole heads. When
torch-pruning cannot finish, fewer steps and then the layers whose pruning breaks the
forward (found by trying each group alone) are tried, and what worked is said.

The input model is never modified: pruning works on a deep copy, so a teacher
passed in stays intact.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from qtemperate.attention_heads import (
    AttentionHeads,
    attention_like,
    find_attention,
    write_head_count,
)
from qtemperate.fx_graph import call_model, flatten_outputs, output_layer_names, output_producers
from qtemperate.registry import Registry

__all__ = [
    "IMPORTANCES",
    "ChannelPruner",
    "PruneReport",
    "UnreachableTarget",
    "count_params_macs",
    "prune",
    "pruning_plan",
    "recalibrate_batchnorm",
]

IMPORTANCES: Registry[Callable[[], tp.importance.Importance]] = Registry("importance")
IMPORTANCES.register("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("random", tp.importance.RandomImportance)
IMPORTANCES.register("lamp", lambda: tp.importance.LAMPImportance(p=2))
IMPORTANCES.register("fpgm", lambda: tp.importance.FPGMImportance(p=2))

#: Search stops once the trial count is this close to the target (fraction of original).
_SEARCH_TOL = 0.005
#: A result further than this from the target (fraction of original) is a miss.
_ACCEPT_TOL = 0.03
_MAX_TRIALS = 24
_MAX_REFINES = 2
_WIDTH_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# DepGraph operation nodes whose pruning functions change nothing (no sizes to update).
_STATELESS_OPS = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp)
# What torch-pruning raises when it loses track of a dimension (it asserts, indexes, reshapes).
_TP_ERRORS = (IndexError, RuntimeError, KeyError, AssertionError, ValueError)
#: Most layers the fallback search adds to ignored_layers before it gives up.
_MAX_BREAKING = 16


class _Broken(Exception):
    """torch-pruning could not finish, or the pruned model's forward fails: another setting
    (fewer steps, more ignored layers) may work. Never leaves this module."""


class UnreachableTarget(ValueError):
    """The requested kept fraction is below what ``max_layer_ratio`` allows.

    Attributes:
        smallest: The smallest kept fraction (of params or MACs) that is achievable.
    """

    def __init__(self, message: str, smallest: float) -> None:
        super().__init__(message)
        self.smallest = smallest


@dataclass
class PruneReport:
    """What :func:`prune` did.

    Attributes:
        params_before: Parameters of the input model.
        params_after: Parameters of the pruned model.
        macs_before: Multiply-accumulates of one forward pass on ``example_inputs``.
        macs_after: Same, pruned model.
        params_ratio: ``params_after / params_before``.
        macs_ratio: ``macs_after / macs_before``.
        channel_ratio: Uniform per-group channel pruning ratio used (fraction removed).
        target: ``"params"`` or ``"macs"``.
        target_ratio: Requested kept fraction of ``target``.
        importance: Importance criterion name (or class name if an object was given).
        iterative_steps: Pruning steps of the real run.
        trials: Trial prunings spent by the ratio search (including refinements).
        seconds: Wall time of the whole call.
        layer_widths: Conv/Linear name -> (out channels/features before, after).
        heads: q/k/v (or qkv) layer name -> (heads before, after), for every attention
            module whose whole heads were pruned (found in the module tree or given).
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    params_ratio: float
    macs_ratio: float
    channel_ratio: float
    target: str
    target_ratio: float
    importance: str
    iterative_steps: int
    trials: int
    seconds: float
    layer_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        """The kept fraction of the targeted quantity (params or MACs)."""
        return self.params_ratio if self.target == "params" else self.macs_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON/W&B-friendly dict (widths as ``[before, after]`` lists)."""
        out = asdict(self)
        out["layer_widths"] = {k: list(v) for k, v in self.layer_widths.items()}
        out["heads"] = {k: list(v) for k, v in self.heads.items()}
        out["achieved_ratio"] = self.achieved_ratio
        return out


# ---------------------------------------------------------------------------
# Small public helpers
# ---------------------------------------------------------------------------


def pruning_plan(steps: int, target: float) -> list[float]:
    """Cumulative channel pruning ratio after each of ``steps`` iterative steps.

    The schedule is linear: step ``i`` (1-based) has removed ``target * i / steps``
    of every group's original channels, the last step exactly ``target``.

    Args:
        steps: Number of iterative steps (>= 1).
        target: Final channel pruning ratio (fraction of channels removed), in [0, 1).

    Returns:
        ``steps`` non-decreasing ratios ending at ``target``.

    Raises:
        ValueError: if ``steps`` < 1 or ``target`` is outside [0, 1).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1), got {target!r}")
    return [target * (i / steps) for i in range(1, steps)] + [float(target)]


def _tp_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """torch-pruning scheduler signature: a leading 0 for step 0, then the plan."""
    return [0.0, *pruning_plan(steps, pruning_ratio)]


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_params_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Parameters and MACs of one forward pass of a float model.

    Parameters are ``sum(p.numel() for p in model.parameters())``; MACs come from
    ``torch_pruning.utils.count_ops_and_params`` (which runs a deep copy in eval
    mode, so the model and its BatchNorm statistics are untouched).

    Args:
        model: A float ``nn.Module``.
        example_inputs: A tensor, or a tuple/list of positional inputs, or a dict of
            keyword inputs; moved to the model's device.

    Returns:
        ``(params, macs)``.
    """
    inputs = _to_device(example_inputs, _model_device(model))
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, inputs)
    return _num_params(model), int(macs)


def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], max_batches: int = 20) -> int:
    """Re-estimate BatchNorm running statistics in place.

    Running statistics are reset and re-accumulated as a cumulative (equal-weight)
    average (``momentum=None``) over up to ``max_batches`` batches, with only the
    BatchNorm layers in train mode (dropout etc. stay in eval) and no gradients.
    The model's training flag and BN momenta are restored afterwards.

    Args:
        model: Model to recalibrate (modified in place).
        loader: Yields ``(x, y, ...)`` tuples/lists (first element used) or inputs.
        max_batches: Upper bound on batches to use (>= 1).

    Returns:
        Number of batches used.

    Raises:
        ValueError: if ``max_batches`` < 1.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    device = _model_device(model)
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(_to_device(x, device))
                used += 1
                if used >= max_batches:
                    break
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    return used


# ---------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------


def _default_classifier(model: nn.Module) -> nn.Module | None:
    """The last registered ``nn.Linear`` (else the last conv): its outputs are kept."""
    last: nn.Module | None = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                last = m
    return last


def _widths(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def _cache_groups(dg: tp.DependencyGraph) -> None:
    """Make ``dg.get_all_groups`` compute each distinct query once (for a graph whose model
    is never pruned: its groups are read, never changed, by the pruner)."""
    compute = dg.get_all_groups
    cache: dict[tuple[Any, ...], list[Any]] = {}

    def get_all_groups(ignored_layers: Sequence[Any] = (), root_module_types: Sequence[type] = (
            tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)) -> Iterable[Any]:
        key = (tuple(id(m) for m in ignored_layers), tuple(root_module_types))
        if key not in cache:
            cache[key] = list(compute(ignored_layers=list(ignored_layers), root_module_types=root_module_types))
        return iter(cache[key])

    dg.get_all_groups = get_all_groups  # type: ignore[method-assign]


def _params_after(module: nn.Module, out_removed: int, in_removed: int) -> int | None:
    """Own parameters of ``module`` after removing output / input channels (None: unknown kind)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        out, inp = module.out_channels - out_removed, module.in_channels - in_removed
        return out * inp * math.prod(module.kernel_size) + (out if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        out, inp = module.out_features - out_removed, module.in_features - in_removed
        return out * inp + (out if module.bias is not None else 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        n = module.num_features - max(out_removed, in_removed)
        return 2 * n if module.affine else 0
    return None


class _Pruning:
    """State shared by the ratio search and the real run (one :func:`prune` call)."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ignored_names: list[str],
        target: str,
        max_layer_ratio: float,
        round_to: int | None = None,
        attentions: Sequence[AttentionHeads] = (),
        outputs: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.model = model  # unpruned working copy, eval mode
        self.round_to = round_to
        self.attentions = list(attentions)
        self.heads = {layer: a.heads for a in self.attentions for layer in a.layers}
        self.inputs = example_inputs
        self.outputs = outputs if outputs is not None else _output_shapes(model, example_inputs)
        self.ignored_names = ignored_names
        self.target = target
        self.max_layer_ratio = max_layer_ratio
        self.params0, self.macs0 = count_params_macs(model, example_inputs)
        self.trials = 0
        self.r_max: float | None = None  # ratio_upper_bound, computed once
        self._planner: tp.pruner.BasePruner | None = None  # one DepGraph for every trial
        self._replayable = False  # set with the pruner: groups can be read without pruning
        self._counts_widths = target == "params"  # trials count params from widths, no copy pruned

    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.ignored_names]

    def ratio_upper_bound(self) -> float:
        """Largest uniform ratio keeping every group at >= (1 - max) of its width (and >= 1)."""
        dg = self._trial_pruner().DG
        ignored = [s for m in self._ignored(self.model) for s in m.modules()]
        head_layers = {self.model.get_submodule(n): h for n, h in self.heads.items()}
        bound = 1.0
        if self.r_max is not None:
            return self.r_max
        for h in head_layers.values():
            keep = max(1, math.ceil(h * (1.0 - self.max_layer_ratio) - 1e-9))
            if keep < h:
                bound = min(bound, (h - keep) / h)
        for group in dg.get_all_groups(
            ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]
        ):
            if any(dep.target.module in head_layers for dep, _ in group):
                continue  # width inside heads is not pruned: whole heads are
            n = len(group[0][1]) // _channel_groups(dg, group)
            keep = max(1, math.ceil(n * (1.0 - self.max_layer_ratio) - 1e-9))
            if keep >= n:
                continue  # never pruned
            bound = min(bound, 1.0 - keep / n)
        self.r_max = max(0.0, bound - 1e-9)
        return self.r_max

    def _pruner(
        self, model: nn.Module, ratio: float, importance: tp.importance.Importance, steps: int,
        extra_ignored: Sequence[str] = (),
    ) -> tp.pruner.BasePruner:
        """torch-pruning's pruner of ``model`` (a copy of the working model) to ``ratio``."""
        heads = {model.get_submodule(n): h for n, h in self.heads.items()}
        return tp.pruner.BasePruner(
            model,
            self.inputs,
            importance=importance,
            pruning_ratio=ratio,
            max_pruning_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            iterative_steps=steps,
            iterative_pruning_ratio_scheduler=_tp_scheduler,
            ignored_layers=self._ignored(model) + [model.get_submodule(n) for n in extra_ignored],
            # fresh dicts: torch-pruning's defaults are shared mutable dicts that would keep
            # every trial copy alive and leak its channel groups into the next pruner
            in_channel_groups={},
            out_channel_groups={},
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=not heads,
            head_pruning_ratio=ratio if heads else 0.0,
        )

    def _write_heads(self, model: nn.Module, now: list[int]) -> None:
        """Set each attention module's head count (and width) attributes to what ``model``'s
        q/k/v layers now hold: ``h' = out_features / (out_features_before / h)``.

        ``now[i]`` is the count ``self.attentions[i]``'s module holds (updated): the attributes
        equal to it change.
        """
        for i, a in enumerate(self.attentions):
            per_head = self.model.get_submodule(a.layers[0]).out_features // a.heads
            after = model.get_submodule(a.layers[0]).out_features // per_head
            write_head_count(model.get_submodule(a.module), now[i], after, a.head_dim)
            now[i] = after

    def run(self, ratio: float, importance: tp.importance.Importance, steps: int) -> nn.Module:
        """Prune a fresh copy of the working model to channel ratio ``ratio``.

        Raises:
            _Broken: torch-pruning lost track of a dimension.
        """
        model = copy.deepcopy(self.model)
        if ratio <= 0.0:
            return model
        if self.heads:
            # torch-pruning applies each step's cumulative head ratio to the heads that are
            # left, so iterative steps would remove all heads: heads go in one step
            steps = 1
        elif steps == 1:
            self._trial_pruner()  # decides whether groups can be replayed
            if self._replayable:
                try:
                    return self._replay(model, ratio, importance)
                except _TP_ERRORS as exc:
                    raise _Broken(f"torch-pruning failed ({type(exc).__name__}: {exc})") from exc
        try:
            pruner = self._pruner(model, ratio, importance, steps)
            for _ in range(steps):
                pruner.step()
        except _TP_ERRORS as exc:  # torch-pruning lost track of a dim
            raise _Broken(f"torch-pruning failed ({type(exc).__name__}: {exc})") from exc
        self._write_heads(model, [a.heads for a in self.attentions])
        return model

    def breaking_layers(self) -> tuple[list[str], set[str]] | None:
        """Layers whose pruning breaks the model, found by trying each group on its own.

        A one-step pruner at ratio ``min(0.5, max_layer_ratio)`` (every group of two or more
        channels loses some) ranks the groups of the working model in torch-pruning's
        interactive mode; each group is applied alone to a fresh copy (head counts
        written), the forward runs and the outputs' shapes are compared. The root layer of
        every group that breaks it is to be ignored. A group torch-pruning fails on while
        ranking or building it is ignored too, and the pass starts again without it.

        Returns:
            ``(root layers to ignore, every layer of their groups)``, or ``None`` when
            torch-pruning fails with no group to blame or more than :data:`_MAX_BREAKING`
            restarts are needed.
        """
        ratio = min(0.5, self.max_layer_ratio)
        names = _Names(self.model)
        found: list[str] = []
        touched: set[str] = set()
        for _ in range(_MAX_BREAKING):
            try:  # on the working model: interactive, nothing of it is pruned
                pruner = self._pruner(self.model, ratio, tp.importance.GroupMagnitudeImportance(p=2), 1, found)
            except _TP_ERRORS:  # the dependency graph itself: no group to blame
                return None
            roots = _record_roots(pruner.DG)
            groups = pruner.step(interactive=True)
            while True:
                try:
                    group = next(groups)
                except StopIteration:
                    return found, touched
                except _TP_ERRORS:  # while ranking or building a group: the group last met
                    root = names.modules.get(roots[-1]) if roots else None
                    if root is None or root in found:
                        return None
                    found.append(root)
                    touched |= _group_members(pruner.DG, roots[-1], names.modules)
                    break  # a new pass without it
                model = copy.deepcopy(self.model)
                try:
                    _apply_group(group, model, names)
                    self._write_heads(model, [a.heads for a in self.attentions])
                    ok = _output_shapes(model, self.inputs) == self.outputs
                except Exception:  # any failure of the pruned forward is this group's
                    ok = False
                if not ok:
                    root = names.modules.get(group[0].dep.target.module)
                    if root is None:
                        return None
                    found.append(root)
                    touched |= {names.modules[d.target.module] for d, _ in group if d.target.module in names.modules}
        return None

    def measure(self, model: nn.Module) -> float:
        """Kept fraction of the targeted quantity."""
        if self.target == "params":
            return _num_params(model) / self.params0
        return count_params_macs(model, self.inputs)[1] / self.macs0

    def _trial_pruner(self) -> tp.pruner.BasePruner:
        """A one-step pruner on the (never modified) working model: its DepGraph serves every trial."""
        if self._planner is None:
            self._planner = tp.pruner.BasePruner(
                self.model,
                self.inputs,
                importance=tp.importance.RandomImportance(),
                pruning_ratio=0.0,
                max_pruning_ratio=self.max_layer_ratio,
                round_to=self.round_to,
                iterative_steps=1,
                iterative_pruning_ratio_scheduler=_tp_scheduler,
                ignored_layers=self._ignored(self.model),
                in_channel_groups={},  # fresh dicts (torch-pruning's defaults are shared)
                out_channel_groups={},
            )
            _cache_groups(self._planner.DG)  # the working model is never pruned: groups stay
            in_model = {id(m) for m in self.model.modules()}
            # Concat/split/slice nodes keep sizes that pruning updates group by group: with
            # them the groups must be pruned one after another, on a copy, as before.
            # Whole-head pruning is torch-pruning's own (num_heads): not replayed either.
            self._replayable = not self.heads and all(
                id(m) in in_model or isinstance(m, _STATELESS_OPS) for m in self._planner.DG.module2node
            )
            self._counts_widths = self._counts_widths and self._replayable
        return self._planner

    def _select(self, ratio: float) -> Any:
        """The one-step pruner's groups at ``ratio`` (interactive: nothing is pruned)."""
        pruner = self._trial_pruner()
        pruner.pruning_ratio = ratio
        pruner.per_step_pruning_ratio = _tp_scheduler(ratio, 1)
        pruner.current_step = 0
        return pruner.step(interactive=True)

    def _replay(self, model: nn.Module, ratio: float, importance: tp.importance.Importance) -> nn.Module:
        """One-step pruning of ``model`` (a copy of the working model) without a new DepGraph.

        The working model's pruner chooses the channels with ``importance`` (the copy has
        the same weights) and each group's pruning functions are applied to the copy's
        module of the same name: what ``group.prune()`` does to the working model.
        """
        pruner = self._trial_pruner()
        names = _Names(self.model)
        pruner.importance, random_importance = importance, pruner.importance
        try:
            for group in self._select(ratio):
                _apply_group(group, model, names)
        finally:
            pruner.importance = random_importance
        return model

    def trial_params(self, ratio: float) -> int | None:
        """Parameters after a one-step prune at ``ratio``, counted from the pruned widths.

        The pruner's groups and channel counts are read in interactive mode without
        pruning anything (so one DepGraph serves the whole search); a layer's parameters
        follow from its widths for Conv (``groups == 1``), Linear and BatchNorm layers.
        ``None`` when a pruned layer is of another kind (the caller prunes a copy instead).
        """
        pruner = self._trial_pruner()
        if not self._replayable:
            return None
        removed: dict[tuple[int, bool], int] = {}
        modules: dict[int, nn.Module] = {}
        for group in self._select(ratio):
            for dep, idxs in group:
                if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                    return None
                module = dep.target.module
                if not isinstance(module, nn.Module) or next(module.parameters(recurse=False), None) is None:
                    continue  # an operation or a parameter-free layer: nothing to count
                out = pruner.DG.is_out_channel_pruning_fn(dep.handler)
                modules[id(module)] = module
                removed[(id(module), out)] = max(removed.get((id(module), out), 0), len(idxs))
        total = _num_params(self.model)
        for key, module in modules.items():
            after = _params_after(module, removed.get((key, True), 0), removed.get((key, False), 0))
            if after is None:
                return None
            total += after - sum(p.numel() for p in module.parameters(recurse=False))
        return total

    def trial(self, ratio: float) -> float:
        """Kept fraction after a one-step prune at ``ratio`` (random importance).

        Raises:
            _Broken: torch-pruning lost track of a dimension.
        """
        self.trials += 1
        try:
            if self._counts_widths:
                params = self.trial_params(ratio)
                if params is not None:
                    return params / self.params0
                self._counts_widths = False  # a layer whose parameters the widths do not give
            return self.measure(self.run(ratio, tp.importance.RandomImportance(), 1))
        except _TP_ERRORS as exc:
            raise _Broken(f"torch-pruning failed ({type(exc).__name__}: {exc})") from exc

    def search(self, goal: float, r_max: float) -> tuple[float, float]:
        """Find the uniform ratio whose kept fraction is nearest ``goal``.

        Illinois (bracketing secant) search on the decreasing step function
        ``f(r)``; returns ``(ratio, f(ratio))``.
        """
        lo, f_lo = 0.0, 1.0  # f_lo >= goal
        if goal >= 1.0:
            return lo, f_lo
        hi, f_hi = r_max, self.trial(r_max)  # want f_hi <= goal
        if f_hi > goal + _ACCEPT_TOL:
            raise UnreachableTarget(
                f"target_{self.target}_ratio={goal} is unreachable with "
                f"max_layer_ratio={self.max_layer_ratio}: the smallest achievable kept "
                f"fraction is {f_hi:.4f}",
                smallest=f_hi,
            )
        if f_hi >= goal:
            return hi, f_hi
        # Initial guess: params/MACs scale roughly with (1 - r)^2.
        r = min(max(1.0 - math.sqrt(goal), 1e-6), r_max * (1 - 1e-6))
        side = 0
        for _ in range(_MAX_TRIALS):
            f = self.trial(r)
            if abs(f - goal) <= _SEARCH_TOL:
                return r, f
            if f > goal:
                lo, f_lo = r, f
                if side == -1:
                    f_hi = goal + (f_hi - goal) / 2  # Illinois: halve the stale end
                side = -1
            else:
                hi, f_hi = r, f
                if side == 1:
                    f_lo = goal + (f_lo - goal) / 2
                side = 1
            if hi - lo < 1e-4:
                break
            r = lo + (f_lo - goal) * (hi - lo) / (f_lo - f_hi)
            r = min(max(r, lo + 1e-5 * (hi - lo)), hi - 1e-5 * (hi - lo))
        # Converged on a step of f: return the closer side (re-measured, the
        # Illinois halving may have altered the stored values).
        f_lo_true, f_hi_true = self.trial(lo), self.trial(hi)
        if abs(f_lo_true - goal) <= abs(f_hi_true - goal):
            return lo, f_lo_true
        return hi, f_hi_true


class _Names:
    """Qualified names of a model's modules and parameters, by object."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {m: n for n, m in model.named_modules()}
        self.params = {p: n for n, p in model.named_parameters()}


def _apply_group(group: Any, model: nn.Module, names: _Names) -> None:
    """Apply a pruning group of one model to ``model``, a copy of it (same names).

    Each dependency's own call (pruning dim, index mapping, handler) runs on the copy's
    module of the same name, as ``group.prune()`` does on the original; an unwrapped
    parameter (a position embedding) is replaced on its parent module as torch-pruning does.
    Element-wise and reshape nodes have nothing to prune.
    """
    for dep, idxs in group:
        node, original = dep.target, dep.target.module
        if node.type == tp.ops.OPTYPE.PARAMETER:
            name = names.params.get(original)
            if name is None:
                continue
            parent_name, _, attr = name.rpartition(".")
            node.module = model.get_parameter(name)
            try:
                pruned = dep(idxs)
            finally:
                node.module = original
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, pruned)
        elif original in names.modules:
            node.module = model.get_submodule(names.modules[original])
            try:
                dep(idxs)
            finally:
                node.module = original


def _record_roots(dg: tp.DependencyGraph) -> list[nn.Module]:
    """Record the root module of each group torch-pruning works on from now on (the list
    returned, newest last): when it fails while ranking or building a group, that names it.

    The pruner ranks the groups ``dg.get_all_groups`` yields, one by one, then builds each
    group to prune with ``dg.get_pruning_group``; a group is recorded as it is yielded, then
    (once all are ranked) as it is built.
    """
    roots: list[nn.Module] = []
    ranking = [False]
    all_groups, build = dg.get_all_groups, dg.get_pruning_group

    def get_all_groups(*args: Any, **kwargs: Any) -> Iterable[Any]:
        ranking[0] = True
        for group in all_groups(*args, **kwargs):
            roots.append(group[0].dep.target.module)
            yield group
        ranking[0] = False

    def get_pruning_group(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not ranking[0]:
            roots.append(module)
        return build(module, *args, **kwargs)

    dg.get_all_groups = get_all_groups  # type: ignore[method-assign]
    dg.get_pruning_group = get_pruning_group  # type: ignore[method-assign]
    return roots


def _group_members(dg: tp.DependencyGraph, root: nn.Module, names: Mapping[nn.Module, str]) -> set[str]:
    """Names of the layers in ``root``'s output-channel group (empty when it cannot be built)."""
    pruner = dg.get_pruner_of_module(root)
    try:
        group = dg.get_pruning_group(root, pruner.prune_out_channels, [0])
    except Exception:  # only used to tell which attention modules the group touches
        return {names[root]} if root in names else set()
    return {names[d.target.module] for d, _ in group if d.target.module in names}


def _channel_groups(dg: tp.DependencyGraph, group: Any) -> int:
    """Interleaved channel groups of a pruning group, as torch-pruning's ``BasePruner`` counts them.

    GroupNorm ``num_groups`` and grouped (not depthwise) convolutions; the largest wins.
    """
    out = 1
    for dep, _ in group:
        m = dep.target.module
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
            continue
        out_fn = dg.is_out_channel_pruning_fn(dep.handler)
        get = pruner.get_out_channel_groups if out_fn else pruner.get_in_channel_groups
        try:
            out = max(out, int(get(m)))
        except Exception:  # a pruner without channel groups
            continue
    return out


def _check_heads(model: nn.Module, attention_heads: Mapping[nn.Module, int] | None) -> list[AttentionHeads]:
    """The attention modules of ``attention_heads`` (validated), one per parent of the layers."""
    if not attention_heads:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    by_parent: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
    for layer, h in attention_heads.items():
        if id(layer) not in names:
            raise ValueError(f"attention_heads contains a module that is not part of model: {layer!r}")
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"attention_heads: {names[id(layer)]} is a {type(layer).__name__}; give the q/k/v "
                "(or fused qkv) nn.Linear layers of a hand-written attention (nn.MultiheadAttention "
                "needs no entry: torch-pruning shrinks its head size)"
            )
        if not isinstance(h, int) or isinstance(h, bool) or h < 1 or layer.out_features % h:
            raise ValueError(
                f"attention_heads[{names[id(layer)]}] must be an int >= 1 dividing its "
                f"{layer.out_features} outputs, got {h!r}"
            )
        name = names[id(layer)]
        # grouped by head count too: grouped-query attention gives k/v fewer heads than q
        by_parent.setdefault((name.rpartition(".")[0], h), []).append((name, h, layer.out_features))
    out = []
    for (parent, _), layers in by_parent.items():
        h = layers[0][1]
        # one layer is a fused qkv (torch-pruning's rule too): 3 * h heads of equal size
        per_layer = layers[0][2] // 3 if len(layers) == 1 and layers[0][2] % (3 * h) == 0 else layers[0][2]
        out.append(AttentionHeads(parent, tuple(n for n, _, _ in layers), h, per_layer // h, found=False))
    return out


_PRUNING_HINT = (
    "A forward that reshapes with a fixed head count or width (hand-written attention) "
    "needs attention_heads={q_layer: heads, k_layer: heads, v_layer: heads} (or "
    "{qkv_layer: heads}) so whole heads are removed, and must reshape with -1 rather than a "
    "width captured before pruning; otherwise add the layers whose width must not change "
    "to ignored_layers"
)


_HEADS_GIVEN_HINT = (
    "It could not follow the attention even with whole heads removed and num_heads (attn_dim, "
    "all_head_size) updated: split q/k/v with qkv.unbind(0) rather than by indexing, reshape "
    "with self.num_heads and self.head_dim or -1 rather than a width captured before pruning "
    "(such as c from x.shape), or put the attention's layers in ignored_layers"
)

_NO_ATTENTION_HINT = "Add the layers whose width must not change to ignored_layers"


def _hint(model: nn.Module, attentions: Sequence[AttentionHeads]) -> str:
    """The advice that applies to this model: attention advice only where there is attention."""
    if attentions:
        modules = ", ".join(a.module or "(model)" for a in attentions[:4]) + (" ..." if len(attentions) > 4 else "")
        return f"Attention with whole heads pruned: {modules}. {_HEADS_GIVEN_HINT}"
    if attention_like(model):
        return _PRUNING_HINT
    return _NO_ATTENTION_HINT


def _output_shapes(model: nn.Module, inputs: Any) -> dict[str, tuple[int, ...]]:
    """``{output path: shape}`` of one forward pass (paths as :func:`flatten_outputs` names them)."""
    with torch.no_grad():
        return {path: tuple(t.shape) for path, t in flatten_outputs(call_model(model, inputs))}


def _check_forward(model: nn.Module, inputs: Any) -> dict[str, tuple[int, ...]]:
    """Output shapes of the pruned model; a broken forward is :class:`_Broken`."""
    try:
        return _output_shapes(model, inputs)
    except Exception as exc:
        raise _Broken(f"the pruned model's forward fails ({type(exc).__name__}: {exc})") from exc


def _check_outputs(
    pruned: nn.Module, inputs: Any, before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]],
    widths_before: dict[str, int],
) -> None:
    """Refuse a pruned model whose outputs differ in name or shape from the input model's.

    The output layers keep their widths by construction; this is the invariant behind that
    rule, checked on the result whatever the tracer found. The message names the output and
    the layers producing it (read off the pruned model's autograd graph) whose width changed.

    Raises:
        ValueError: naming the first output that differs.
    """
    if before == after:
        return
    missing = [p for p in before if p not in after]
    extra = [p for p in after if p not in before]
    if missing or extra:
        raise ValueError(
            f"pruning changed the model's outputs: {missing or 'none'} missing, {extra or 'none'} "
            "new; refusing the pruned model"
        )
    path = next(p for p in before if before[p] != after[p])
    widths = _widths(pruned)
    try:
        producers = output_producers(pruned, inputs, lambda m: isinstance(m, _WIDTH_TYPES))[path]
    except Exception:  # the autograd walk is only for the message
        producers = set()
    changed = sorted(n for n in producers if widths_before.get(n) != widths.get(n))
    culprits = changed or sorted(n for n in widths if widths_before.get(n) != widths[n])[:5]
    why = ", ".join(f"{n} (out width {widths_before.get(n)} -> {widths.get(n)})" for n in culprits)
    raise ValueError(
        f"pruning changed {path} from shape {before[path]} to {after[path]}: it comes from "
        f"{why or 'a layer whose width changed'}. Put {', '.join(culprits) or 'that layer'} in "
        "ignored_layers; refusing the pruned model"
    )


def _check_target(params_ratio: float | None, macs_ratio: float | None) -> tuple[str, float, str]:
    """``(target, goal, argument name)`` of exactly one of the two ratios in (0, 1]."""
    if (params_ratio is None) == (macs_ratio is None):
        raise ValueError(
            "give exactly one of target_params_ratio and target_macs_ratio, got "
            f"target_params_ratio={params_ratio!r}, target_macs_ratio={macs_ratio!r}"
        )
    if params_ratio is not None:
        target, goal, arg = "params", params_ratio, "target_params_ratio"
    else:
        target, goal, arg = "macs", macs_ratio, "target_macs_ratio"
    if not isinstance(goal, (int, float)) or isinstance(goal, bool) or not 0.0 < goal <= 1.0:
        raise ValueError(f"{arg} must be in (0, 1], got {goal!r}")
    return target, float(goal), arg


def _check_counts(iterative_steps: int, max_layer_ratio: float, bn_batches: int, round_to: int | None) -> None:
    if not isinstance(iterative_steps, int) or isinstance(iterative_steps, bool) or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be an int >= 1, got {iterative_steps!r}")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio!r}")
    if bn_batches < 1:
        raise ValueError(f"bn_batches must be >= 1, got {bn_batches!r}")
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ValueError(f"round_to must be None or an int >= 1, got {round_to!r}")


def _importance_factory(
    importance: str | tp.importance.Importance,
) -> tuple[str, Callable[[], tp.importance.Importance]]:
    """``(name, factory)`` of an importance given by registry key or as an object."""
    if isinstance(importance, str):
        return importance, IMPORTANCES.get(importance)  # KeyError lists known importances
    if isinstance(importance, tp.importance.Importance):
        return type(importance).__name__, lambda: importance
    raise ValueError(
        f"importance must be a name ({', '.join(IMPORTANCES.keys())}) or a "
        f"torch_pruning Importance, got {importance!r}"
    )


def _output_layer_names(model: nn.Module, inputs: Any) -> list[str]:
    """The conv/linear layers producing the model's outputs: every head of a multi-output model.

    Found on the FX graph traced with every conv/linear subclass kept whole (timm's
    ``Linear`` is the classifier, not its ``F.linear``), else on the autograd graph of one
    forward pass; when both fail, :func:`_default_classifier`.
    """
    names = output_layer_names(model, lambda m: isinstance(m, _WIDTH_TYPES), inputs)
    if names:
        return sorted(names)
    classifier = _default_classifier(model)
    return [n for n, m in model.named_modules() if m is classifier][:1]


def _ignored_names(model: nn.Module, ignored_layers: Sequence[nn.Module] | None) -> list[str]:
    """Qualified names of the ignored modules."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[str] = []
    for m in ignored_layers or []:
        if id(m) not in names:
            raise ValueError(f"ignored_layers contains a module that is not part of model: {m!r}")
        out.append(names[id(m)])
    return out


def prune(
    model: nn.Module,
    example_inputs: Any,
    target_params_ratio: float | None = None,
    target_macs_ratio: float | None = None,
    importance: str | tp.importance.Importance = "l2",
    iterative_steps: int = 16,
    ignored_layers: Sequence[nn.Module] | None = None,
    max_layer_ratio: float = 0.9,
    calibration_loader: Iterable[Any] | None = None,
    bn_batches: int = 20,
    round_to: int | None = None,
    attention_heads: Mapping[nn.Module, int] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Channel-prune a float model to a parameter or MAC budget.

    The input ``model`` is not modified: a deep copy is pruned and returned (in the
    input's train/eval mode). The output layers (every conv/linear whose output reaches
    a model output: the classifier, or each head of a model returning a dict/tuple; found
    on the FX graph with every conv/linear subclass such as timm's ``Linear`` kept whole,
    else on the autograd graph of one forward pass) and every module in ``ignored_layers``
    keep their output width. The result is checked: every output of the pruned model on
    ``example_inputs`` has the name and shape it had, or the call is refused.

    Attention modules written the timm / Hugging Face way (:mod:`qtemperate.attention_heads`:
    q/k/v or fused qkv Linears and a ``num_heads``-style attribute) lose whole heads without
    being named, and their head count and attention width attributes follow.

    When torch-pruning cannot finish the model (it loses track of a dimension, or the pruned
    forward breaks), one step is tried instead of ``iterative_steps``, then the layers whose
    pruning breaks the model are found group by group and kept at full width; what worked
    is said in a warning, what did not in the error.

    Args:
        model: Float model (conv/linear/BN; residual adds are followed by DepGraph).
        example_inputs: Tensor / tuple / dict of example inputs for tracing and MAC
            counting; moved to the model's device.
        target_params_ratio: Fraction of parameters to keep, in (0, 1].
        target_macs_ratio: Fraction of MACs to keep, in (0, 1]. Give exactly one.
        importance: Key of :data:`IMPORTANCES` (``"l1"``, ``"l2"``, ``"random"``,
            ``"lamp"``, ``"fpgm"``) or a ``torch_pruning`` importance object.
        iterative_steps: Steps of the real pruning run (see :func:`pruning_plan`).
        ignored_layers: Modules of ``model`` whose outputs must not be pruned.
        max_layer_ratio: Largest fraction of any layer's channels that may be removed,
            in (0, 1]; every pruned layer keeps >= ``(1 - max_layer_ratio)`` of its
            width (and at least one channel).
        calibration_loader: If given, BatchNorm statistics are re-estimated on up to
            ``bn_batches`` of its batches after pruning (strongly recommended).
        bn_batches: Batches used for BatchNorm re-estimation.
        round_to: Keep channel counts multiples of this (e.g. 8). Integer GEMM kernels
            (onnxruntime's QLinearConv, most NPUs) run odd widths far slower: a
            ResNet-8 pruned to widths like 15/30/61 ran int8 barely faster than float.
            Coarser widths make the target harder to hit exactly.
        attention_heads: ``{layer: heads}`` for the q/k/v (or fused qkv) ``nn.Linear``
            layers of attention the module tree does not show (found attention needs no
            entry; an entry replaces what was found for that module). Whole heads are
            removed (at the same uniform ratio as channels, at least one head kept) instead
            of channels inside heads; the parent module's head count (``num_heads``,
            ``num_attention_heads``, ``n_heads``, ``heads``) becomes the new count ``h'`` and
            its width (``attn_dim``, ``all_head_size``) ``h' * head_dim``, the head size kept,
            so a forward reshaping to ``(b, n, self.num_heads, self.head_dim)`` stays valid.
            ``nn.MultiheadAttention`` needs no entry (its attention width is its
            ``embed_dim``: torch-pruning shrinks its head size consistently). With heads the
            pruning runs in one step (torch-pruning's iterative head schedule would remove
            every head).

    Returns:
        ``(pruned_model, report)``; ``report.achieved_ratio`` is within 0.03 of the
        target unless the channel granularity of a tiny model forbids it (then a
        warning is issued).

    Raises:
        ValueError: on a bad argument (both or neither target, a ratio outside
            (0, 1], bad ``iterative_steps``/``max_layer_ratio``/``bn_batches``, a
            module of ``ignored_layers`` not in ``model``), an unreachable target, a model
            torch-pruning cannot prune (saying what was tried), or a pruned model whose
            outputs changed (naming the output and the layer).
        KeyError: for an unknown ``importance`` name (the message lists known ones).
    """
    start = time.perf_counter()
    target, goal, _ = _check_target(target_params_ratio, target_macs_ratio)
    _check_counts(iterative_steps, max_layer_ratio, bn_batches, round_to)
    _importance_factory(importance)  # an unknown name fails before any work
    pruner = ChannelPruner(model, example_inputs, target, max_layer_ratio, round_to, ignored_layers,
                           attention_heads=attention_heads)
    return pruner.prune(goal, importance, iterative_steps, calibration_loader, bn_batches, _start=start)


class ChannelPruner:
    """Prune copies of one float model to several budgets, sharing one dependency graph.

    :func:`prune` is ``ChannelPruner(...).prune(goal, ...)``; a caller that prunes the same
    model to several budgets (the planner's bytes search) keeps the pruner, so every ratio
    search runs on the same DepGraph (built once) and the same unpruned working copy. A
    setting found to work after torch-pruning failed (one step, more ignored layers) is kept
    for the later calls, and each call's warning repeats it.

    Args:
        model: Float model (not modified; a deep copy is kept).
        example_inputs: Inputs for tracing and MAC counting.
        target: ``"params"`` or ``"macs"``: what :meth:`prune`'s goal is a fraction of.
        max_layer_ratio: As :func:`prune`.
        round_to: As :func:`prune`.
        ignored_layers: As :func:`prune` (modules of ``model``).
        attention_heads: As :func:`prune`.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        target: str = "params",
        max_layer_ratio: float = 0.9,
        round_to: int | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        attention_heads: Mapping[nn.Module, int] | None = None,
    ) -> None:
        if target not in ("params", "macs"):
            raise ValueError(f"target must be 'params' or 'macs', got {target!r}")
        _check_counts(1, max_layer_ratio, 1, round_to)
        self.target = target
        self.was_training = model.training
        work = copy.deepcopy(model).eval()  # eval: tracing forwards must not touch BN stats
        self.inputs = _to_device(example_inputs, _model_device(work))
        given = _check_heads(model, attention_heads)
        ignored = _ignored_names(model, ignored_layers)
        try:
            outputs = _output_shapes(work, self.inputs)
        except Exception as exc:
            raise ValueError(
                f"the model's forward fails on example_inputs ({type(exc).__name__}: {exc})"
            ) from exc
        ignored += [n for n in _output_layer_names(work, self.inputs) if n not in ignored]
        given_layers = {n for a in given for n in a.layers}
        found = [
            a for a in find_attention(work)
            if not given_layers.intersection(a.layers) and not set(ignored).intersection(a.layers)
        ]
        self.state = _Pruning(work, self.inputs, ignored, target, max_layer_ratio, round_to,
                              given + found, outputs)
        self.widths_before = _widths(work)
        self._steps: int | None = None  # the steps a fallback found to work (None: as asked)
        self._note = ""  # what the fallback changed, repeated in a warning by every prune

    def _attempt(
        self, state: _Pruning, goal: float, imp_factory: Callable[[], tp.importance.Importance], steps: int,
    ) -> tuple[nn.Module, float, dict[str, tuple[int, ...]]]:
        """``(pruned model, channel ratio, output shapes)`` of one try at ``goal``.

        Raises:
            _Broken: torch-pruning cannot finish, or the pruned forward fails.
            UnreachableTarget: ``goal`` is below what ``max_layer_ratio`` allows.
        """
        state.trials = 0
        try:
            r_max = state.ratio_upper_bound()
        except _TP_ERRORS as exc:
            raise _Broken(f"torch-pruning failed ({type(exc).__name__}: {exc})") from exc
        ratio, predicted = state.search(goal, r_max)
        pruned = state.run(ratio, imp_factory(), steps)
        achieved = state.measure(pruned)
        for _ in range(_MAX_REFINES):
            if abs(achieved - goal) <= _ACCEPT_TOL or math.isclose(achieved, predicted):
                break
            # The real run disagreed with the trial: shift the goal by the offset and redo.
            ratio, predicted = state.search(min(1.0, max(1e-6, 2 * goal - achieved)), r_max)
            pruned = state.run(ratio, imp_factory(), steps)
            achieved = state.measure(pruned)
        return pruned, ratio, _check_forward(pruned, self.inputs)

    def _recover(
        self, goal: float, imp_factory: Callable[[], tp.importance.Importance], steps: int, first: _Broken,
    ) -> tuple[nn.Module, float, dict[str, tuple[int, ...]]]:
        """Try what else may work after ``first``: one step, then the breaking layers ignored.

        What works becomes this pruner's setting (kept for later calls) and is said in a
        warning; when nothing works the error lists every try and the advice that applies.
        """
        state = self.state
        tried = [f"with iterative_steps={steps}: {first}"]
        if steps > 1 and not state.heads:
            try:
                result = self._attempt(state, goal, imp_factory, 1)
            except _Broken as exc:
                tried.append(f"in 1 step: {exc}")
            else:
                self._steps = 1
                self._note = (f"torch-pruning could not prune this model with iterative_steps={steps} "
                              f"({first}); pruned in 1 step instead")
                return result
        breaking = state.breaking_layers()
        if breaking is not None and breaking[0]:
            roots, touched = breaking
            keep = [a for a in state.attentions if not touched.intersection(a.layers)]
            fallback = _Pruning(state.model, state.inputs, state.ignored_names + roots, state.target,
                                state.max_layer_ratio, state.round_to, keep, state.outputs)
            shown = ", ".join(roots[:6]) + (f" and {len(roots) - 6} more" if len(roots) > 6 else "")
            label = f"with {shown} also in ignored_layers"
            for n in dict.fromkeys([steps, 1]) if not fallback.heads else [1]:
                try:
                    result = self._attempt(fallback, goal, imp_factory, n)
                except _Broken as exc:
                    tried.append(f"{label}, {n} step(s): {exc}")
                    continue
                except UnreachableTarget as exc:
                    tried.append(f"{label}: it works, but the smallest kept fraction is {exc.smallest:.4f}")
                    break
                self.state, self._steps = fallback, n
                dropped = [a.module for a in state.attentions if a not in keep]
                self._note = (
                    f"torch-pruning could not prune this model ({first}); pruned {label} (pruning "
                    "them breaks the forward; found by trying group by group)"
                    + (f", in {n} step(s) instead of {steps}" if n != steps and not state.heads else "")
                    + (f"; attention {', '.join(dropped)} keeps all its heads" if dropped else "")
                )
                return result
        elif breaking is None:
            tried.append("no set of layers to ignore was found by trying group by group")
        raise ValueError(
            f"torch-pruning could not prune this model. Tried {'; '.join(tried)}. "
            f"{_hint(state.model, state.attentions)}"
        ) from first

    def prune(
        self,
        goal: float,
        importance: str | tp.importance.Importance = "l2",
        iterative_steps: int = 16,
        calibration_loader: Iterable[Any] | None = None,
        bn_batches: int = 20,
        _start: float | None = None,
    ) -> tuple[nn.Module, PruneReport]:
        """A pruned copy keeping ``goal`` of the target quantity (see :func:`prune`)."""
        start = time.perf_counter() if _start is None else _start
        arg = f"target_{self.target}_ratio"
        if not isinstance(goal, (int, float)) or isinstance(goal, bool) or not 0.0 < goal <= 1.0:
            raise ValueError(f"{arg} must be in (0, 1], got {goal!r}")
        _check_counts(iterative_steps, self.state.max_layer_ratio, bn_batches, self.state.round_to)
        imp_name, imp_factory = _importance_factory(importance)
        steps = self._steps or iterative_steps
        try:
            pruned, ratio, outputs = self._attempt(self.state, goal, imp_factory, steps)
        except _Broken as first:
            pruned, ratio, outputs = self._recover(goal, imp_factory, steps, first)
        if self._note:
            warnings.warn(self._note, stacklevel=3)
        state, target = self.state, self.target
        achieved = state.measure(pruned)
        if abs(achieved - goal) > _ACCEPT_TOL:
            warnings.warn(
                f"pruning reached {target} ratio {achieved:.4f}, more than {_ACCEPT_TOL} from "
                f"{arg}={goal}: the model's channel granularity is too coarse",
                stacklevel=3,
            )
        _check_outputs(pruned, self.inputs, state.outputs, outputs, self.widths_before)

        if calibration_loader is not None:
            recalibrate_batchnorm(pruned, calibration_loader, bn_batches)
        pruned.train(self.was_training)

        params_after, macs_after = count_params_macs(pruned, self.inputs)
        widths_after = _widths(pruned)
        report = PruneReport(
            params_before=state.params0,
            params_after=params_after,
            macs_before=state.macs0,
            macs_after=macs_after,
            params_ratio=params_after / state.params0,
            macs_ratio=macs_after / state.macs0 if state.macs0 else 1.0,
            channel_ratio=ratio,
            target=target,
            target_ratio=goal,
            importance=imp_name,
            iterative_steps=1 if state.heads else (self._steps or iterative_steps),
            trials=state.trials,
            seconds=time.perf_counter() - start,
            layer_widths={n: (w, widths_after.get(n, 0)) for n, w in self.widths_before.items()},
            heads={
                n: (h, pruned.get_submodule(n).out_features // (state.model.get_submodule(n).out_features // h))
                for n, h in state.heads.items()
            },
        )
        return pruned, report
