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
        heads: ``attention_heads`` layer name -> (heads before, after).
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
        heads: dict[str, int] | None = None,
    ) -> None:
        self.model = model  # unpruned working copy, eval mode
        self.round_to = round_to
        self.heads = dict(heads or {})
        self.inputs = example_inputs
        self.ignored_names = ignored_names
        self.target = target
        self.max_layer_ratio = max_layer_ratio
        self.params0, self.macs0 = count_params_macs(model, example_inputs)
        self.trials = 0
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
        return max(0.0, bound - 1e-9)

    def run(self, ratio: float, importance: tp.importance.Importance, steps: int) -> nn.Module:
        """Prune a fresh copy of the working model to channel ratio ``ratio``."""
        model = copy.deepcopy(self.model)
        if ratio <= 0.0:
            return model
        heads = {model.get_submodule(n): h for n, h in self.heads.items()}
        if heads:
            # torch-pruning applies each step's cumulative head ratio to the heads that are
            # left, so iterative steps would remove all heads: heads go in one step
            steps = 1
        elif steps == 1:
            self._trial_pruner()  # decides whether groups can be replayed
            if self._replayable:
                return self._replay(model, ratio, importance)
        pruner = tp.pruner.BasePruner(
            model,
            self.inputs,
            importance=importance,
            pruning_ratio=ratio,
            max_pruning_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            iterative_steps=steps,
            iterative_pruning_ratio_scheduler=_tp_scheduler,
            ignored_layers=self._ignored(model),
            # fresh dicts: torch-pruning's defaults are shared mutable dicts that would keep
            # every trial copy alive and leak its channel groups into the next pruner
            in_channel_groups={},
            out_channel_groups={},
            num_heads=heads,
            prune_num_heads=bool(heads),
            prune_head_dims=not heads,
            head_pruning_ratio=ratio if heads else 0.0,
        )
        try:
            for _ in range(steps):
                pruner.step()
        except (IndexError, RuntimeError, KeyError) as exc:  # torch-pruning lost track of a dim
            hint = _HEADS_GIVEN_HINT if heads else _PRUNING_HINT
            raise ValueError(
                f"torch-pruning failed on this model ({type(exc).__name__}: {exc}). {hint}"
            ) from exc
        after = {n: pruner.num_heads[model.get_submodule(n)] for n in self.heads}
        _write_head_counts(model, self.heads, after)
        return model

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
        names_by_module = {m: n for n, m in self.model.named_modules()}
        pruner.importance, random_importance = importance, pruner.importance
        try:
            for group in self._select(ratio):
                for dep, idxs in group:
                    if dep.target.module not in names_by_module:
                        continue  # an element-wise or reshape node: nothing to prune
                    node, original = dep.target, dep.target.module
                    node.module = model.get_submodule(names_by_module[original])
                    try:
                        dep(idxs)  # the dependency's own call: pruning dim, index mapping, handler
                    finally:
                        node.module = original
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
        self.trials += 1
        if self._counts_widths:
            params = self.trial_params(ratio)
            if params is not None:
                return params / self.params0
            self._counts_widths = False  # a layer whose parameters the widths do not give
        return self.measure(self.run(ratio, tp.importance.RandomImportance(), 1))

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


_HEAD_ATTRS = ("num_heads", "n_heads", "heads", "num_attention_heads")


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


def _write_head_counts(model: nn.Module, before: dict[str, int], after: dict[str, int]) -> None:
    """Give each attention module its new head count (``num_heads`` & co.) after head pruning.

    The parent of the q/k/v (or fused qkv) layers usually reshapes with ``self.num_heads``;
    with whole heads removed the head size is unchanged and the count must follow.
    """
    for name, h0 in before.items():
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for attr in _HEAD_ATTRS:
            if getattr(parent, attr, None) == h0 and not isinstance(getattr(parent, attr), bool):
                setattr(parent, attr, after[name])


def _check_heads(model: nn.Module, attention_heads: Mapping[nn.Module, int] | None) -> dict[str, int]:
    """``{layer name: heads}`` of ``attention_heads`` (validated)."""
    if not attention_heads:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, int] = {}
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
        out[names[id(layer)]] = h
    return out


_PRUNING_HINT = (
    "A forward that reshapes with a fixed head count or width (hand-written attention) "
    "needs attention_heads={q_layer: heads, k_layer: heads, v_layer: heads} (or "
    "{qkv_layer: heads}) so whole heads are removed, and must reshape with -1 rather than a "
    "width captured before pruning; otherwise add the layers whose width must not change "
    "to ignored_layers"
)


_HEADS_GIVEN_HINT = (
    "It could not follow the attention even with attention_heads: split q/k/v with "
    "qkv.unbind(0) rather than by indexing, reshape with -1 rather than a width captured "
    "before pruning, or put the attention's layers in ignored_layers"
)


def _check_forward(model: nn.Module, inputs: Any) -> None:
    """Run the pruned model once; a broken forward becomes an error that says what to do."""
    try:
        with torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple | list) else model(inputs)
    except Exception as exc:
        raise ValueError(
            f"the pruned model's forward fails ({type(exc).__name__}: {exc}). {_PRUNING_HINT}"
        ) from exc


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


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The conv/linear layers producing the model's outputs: every head of a multi-output model.

    Found on the FX graph (walking back from each output through non-layer operations);
    an untraceable model falls back to :func:`_default_classifier`.
    """
    from qtemperate.fx_graph import output_layer_names

    names = output_layer_names(model, lambda m: isinstance(m, nn.modules.conv._ConvNd | nn.Linear))
    if names:
        return [model.get_submodule(n) for n in sorted(names)]
    classifier = _default_classifier(model)
    return [] if classifier is None else [classifier]


def _ignored_names(model: nn.Module, ignored_layers: Sequence[nn.Module] | None) -> list[str]:
    """Qualified names of the ignored modules plus the output layers (their widths are the outputs)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[str] = []
    for m in ignored_layers or []:
        if id(m) not in names:
            raise ValueError(f"ignored_layers contains a module that is not part of model: {m!r}")
        out.append(names[id(m)])
    out += [names[id(m)] for m in _output_layers(model) if names[id(m)] not in out]
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
    a model output: the classifier, or each head of a model returning a dict/tuple; the
    last ``nn.Linear``, else the last conv, when the model is not FX-traceable) and every
    module in ``ignored_layers`` keep their output width.

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
            layers of hand-written attention. Their whole heads are removed (at the same
            uniform ratio as channels, at least one head kept) instead of channels inside
            heads, and the parent module's ``num_heads`` (or ``n_heads``/``heads``)
            attribute is set to the new count, so a forward reshaping to
            ``(b, n, self.num_heads, self.head_dim)`` stays valid. ``nn.MultiheadAttention``
            needs no entry (torch-pruning shrinks its head size consistently). With heads the
            pruning runs in one step (torch-pruning's iterative head schedule would remove
            every head).

    Returns:
        ``(pruned_model, report)``; ``report.achieved_ratio`` is within 0.03 of the
        target unless the channel granularity of a tiny model forbids it (then a
        warning is issued).

    Raises:
        ValueError: on a bad argument (both or neither target, a ratio outside
            (0, 1], bad ``iterative_steps``/``max_layer_ratio``/``bn_batches``, a
            module of ``ignored_layers`` not in ``model``) or an unreachable target.
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
    search runs on the same DepGraph (built once) and the same unpruned working copy.

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
        heads = _check_heads(model, attention_heads)
        self.state = _Pruning(work, self.inputs, _ignored_names(model, ignored_layers), target,
                              max_layer_ratio, round_to, heads)
        self.widths_before = _widths(work)
        self._r_max: float | None = None

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
        state, target = self.state, self.target
        state.trials = 0
        if self._r_max is None:
            self._r_max = state.ratio_upper_bound()
        r_max = self._r_max
        ratio, predicted = state.search(goal, r_max)
        pruned = state.run(ratio, imp_factory(), iterative_steps)
        achieved = state.measure(pruned)
        for _ in range(_MAX_REFINES):
            if abs(achieved - goal) <= _ACCEPT_TOL or math.isclose(achieved, predicted):
                break
            # The real run disagreed with the trial: shift the goal by the offset and redo.
            ratio, predicted = state.search(min(1.0, max(1e-6, 2 * goal - achieved)), r_max)
            pruned = state.run(ratio, imp_factory(), iterative_steps)
            achieved = state.measure(pruned)
        if abs(achieved - goal) > _ACCEPT_TOL:
            warnings.warn(
                f"pruning reached {target} ratio {achieved:.4f}, more than {_ACCEPT_TOL} from "
                f"{arg}={goal}: the model's channel granularity is too coarse",
                stacklevel=3,
            )

        _check_forward(pruned, self.inputs)
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
            iterative_steps=1 if state.heads else iterative_steps,
            trials=state.trials,
            seconds=time.perf_counter() - start,
            layer_widths={n: (w, widths_after.get(n, 0)) for n, w in self.widths_before.items()},
            heads={
                n: (h, pruned.get_submodule(n).out_features // (state.model.get_submodule(n).out_features // h))
                for n, h in state.heads.items()
            },
        )
        return pruned, report
