"""Float tolerances derived from the computation, and top-1 agreement that sets near-ties aside.

Two computations of the same quantity (two CPUs' kernels, PyTorch and onnxruntime, a fused
and an unfused formula) round differently: they agree up to a bound, not bit for bit. The
bound used here is the classic one of float summation (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., §3.1): a sum or dot product of ``n`` terms computed in
any order with unit roundoff ``u`` (``2**-24`` in float32) satisfies

    |fl(Σ t_i) - Σ t_i| <= γ_n Σ |t_i|,      γ_n = n u / (1 - n u) ≈ n u,

so two such computations differ by at most ``2 γ_n Σ|t_i|``. A network chains such
reductions; to first order their relative errors add, so a network output is bounded with
``n = L``, its *reduction length*: the summed lengths of every reduction it runs (each
convolution's and matrix product's inner length, each pooled window, each normalised
group, each softmax) plus one rounding per other floating-point operation
(:func:`reduction_length`), and ``Σ|t_i|`` with the magnitude of the output (its largest
``|value|``). That magnitude is the one a test can see; it is exact for sums of terms of one
sign and optimistic where terms cancel, which the worst-case factor ``n`` (the typical
error grows like ``√n``) more than covers in the networks tested here.

A quantizer's ``round`` is no continuous function: the bound holds while no value moves
across a rounding boundary. Where an exact value lies on a boundary (``k + 1/2`` steps:
sums of grid values often do), two implementations may round it apart, a whole level far
above any float bound. Tests that claim an export exact check that none moved (max
|difference| within the float bound); tests of graphs where one may move (onnxruntime's
integer requantization against PyTorch's float one) say so and keep their stated
allowance (:func:`assert_runtime_exact`'s ``bounded_diff`` / ``min_agreement``).

Top-1 agreement: where the reference's two largest logits are closer than the rounding of
either computation, the argmax of the other may legitimately differ (a near-tie, not a
wrong kernel). If ``|got - ref| <= tol`` element-wise, the argmax can change only where the
reference's top-1 margin (largest minus second largest) is at most ``2 tol``;
:func:`top1_agreement` sets those positions aside and says how many it did. The
product's own ``top1_agreement`` counts every sample; :func:`lowest_explained_agreement`
is the lowest figure near-ties alone can explain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "U32",
    "Agreement",
    "RuntimeCheck",
    "assert_accuracy_explained",
    "assert_figures_explained",
    "assert_runtime_exact",
    "compare_runtime",
    "gamma",
    "lowest_explained_agreement",
    "output_tolerance",
    "reduction_length",
    "rounding_bound",
    "runtime_outputs",
    "top1_agreement",
    "top1_margin",
]

U32 = 2.0**-24
"""Unit roundoff of float32 (half the distance from 1 to the next float32)."""

def gamma(n: int, unit: float = U32) -> float:
    """``γ_n = n u / (1 - n u)``: the relative error bound of an ``n``-term float sum.

    Raises:
        ValueError: for ``n < 0`` or ``n u >= 1`` (no bound exists).
    """
    if n < 0:
        raise ValueError(f"a reduction length is >= 0, got {n}")
    if n * unit >= 1:
        raise ValueError(f"n u = {n * unit:g} >= 1: rounding error is unbounded")
    return n * unit / (1 - n * unit)


def rounding_bound(magnitude: float, length: int, *, unit: float = U32, computations: int = 2) -> float:
    """``computations · γ_length · magnitude``: how far float results of one value may differ.

    Args:
        magnitude: ``Σ|t_i|`` of the reduction, or the largest ``|value|`` of a network
            output (module docstring).
        length: the reduction length ``n`` (terms summed; :func:`reduction_length` for a model).
        unit: the unit roundoff (:data:`U32` for float32).
        computations: 2 to compare two roundings of the value with each other, 1 to
            compare one with the exact (e.g. float64) value.
    """
    return computations * gamma(length, unit) * float(magnitude)


# -- the reduction length of a model ------------------------------------------------------
_aten = torch.ops.aten

# Ops that move or select values without arithmetic: no rounding.
_EXACT = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "clone", "contiguous",
    "_to_copy", "copy_", "detach", "alias", "slice", "select", "squeeze", "unsqueeze", "cat", "stack",
    "split", "split_with_sizes", "unbind", "index", "index_select", "gather", "flatten", "max_pool2d",
    "max_pool2d_with_indices", "relu", "relu_", "threshold", "clamp", "clamp_", "clamp_min", "clamp_max",
    "hardtanh", "hardtanh_", "round", "floor", "ceil", "trunc", "sign", "abs", "neg", "max", "min",
    "amax", "amin", "argmax", "argmin", "where", "masked_fill", "zeros_like", "ones_like", "empty_like",
    "new_empty", "new_zeros", "full_like", "fill_", "zero_", "lift_fresh", "pad", "constant_pad_nd",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_and",
    "_unsafe_index", "upsample_nearest2d", "empty", "zeros", "ones", "full", "scalar_tensor", "arange",
    "expand_as", "as_strided", "unfold", "roll", "flip", "repeat", "_reshape_alias", "item",
    "_local_scalar_dense", "sort", "topk", "kthvalue",
}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 1


def _op_length(name: str, args: tuple, kwargs: Mapping[str, Any], out: Any) -> int:
    """The reduction length of one aten op (1 for an element-wise rounding, 0 for none)."""
    first = out[0] if isinstance(out, tuple | list) and out else out
    if name in _EXACT:
        return 0
    if name in ("convolution", "_convolution", "conv2d", "conv1d", "conv3d", "mkldnn_convolution",
                "_slow_conv2d_forward", "thnn_conv2d", "conv_transpose2d", "_nnpack_spatial_convolution"):
        w = _shape(args[1])
        groups = kwargs.get("groups", args[8] if len(args) > 8 and isinstance(args[8], int) else 1)
        transposed = bool(args[6]) if len(args) > 6 and isinstance(args[6], bool) else False
        fan_in = (w[0] // groups if transposed else w[1]) * int(np.prod(w[2:]))
        return fan_in + (args[2] is not None)
    if name in ("mm", "bmm", "matmul", "dot", "vdot", "mv"):
        return _shape(args[0])[-1]
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        return _shape(args[1])[-1] + 1
    if name == "native_layer_norm":
        return 3 * int(np.prod(args[1]))  # mean, variance, then one rounding per element
    if name == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
        return 3 * (int(args[4]) // int(args[6])) * int(args[5])
    if name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"):
        training = args[5] if name == "native_batch_norm" else name == "_native_batch_norm_legit"
        x = args[0]
        return 3 * (_numel(x) // _shape(x)[1]) if training and isinstance(x, torch.Tensor) else 4
    if name in ("_softmax", "_log_softmax", "softmax", "log_softmax"):
        return 2 * _shape(args[0])[args[1]] + 2  # max, exp, sum, divide
    if name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                "scaled_dot_product_attention"):
        head_dim, seq = _shape(args[0])[-1], _shape(args[1])[-2]
        return head_dim + 2 * seq + 2 + seq  # q·k, softmax, weights·v
    if name == "_native_multi_head_attention":
        embed, seq = int(args[3]), _shape(args[1])[-2]
        head_dim = embed // int(args[4])
        return (embed + 1) + head_dim + 2 * seq + 2 + seq + (embed + 1)  # in-proj, attention, out-proj
    if name in ("sum", "mean", "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "avg_pool1d",
                "avg_pool3d", "_adaptive_avg_pool3d", "nansum", "prod", "var", "std", "var_mean",
                "std_mean", "norm", "linalg_vector_norm", "cumsum", "logsumexp"):
        if isinstance(args[0], torch.Tensor) and isinstance(first, torch.Tensor):
            return max(1, args[0].numel() // max(first.numel(), 1)) + 1
        return 1
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        return 1  # an element-wise operation: one rounding
    return 0


class _ReductionCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.length += _op_length(func.overloadpacket.__name__, args, kwargs, out)
        return out


def reduction_length(model: nn.Module, example: torch.Tensor) -> int:
    """``L``: the summed reduction lengths of every op one sample of ``model`` runs.

    Runs ``model(example[:1])`` in eval mode under a dispatch mode that sees every aten op:
    a convolution adds its fan-in (``C_in / groups · kh · kw``, +1 for a bias), a matrix
    product its inner length, a pooling or mean its window, a normalisation three passes
    over its group, a softmax two over its axis; every other floating-point op adds one
    rounding; moving, selecting, comparing and clamping add nothing. Summing over all ops
    (not one path) over-counts branches: conservative.
    """
    was_training = model.training
    counter = _ReductionCounter()
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        model.train(was_training)
    return counter.length


# -- outputs of a model, a runtime, and their agreement ----------------------------------
def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def output_tolerance(model: nn.Module, x: torch.Tensor, ref: Any) -> float:
    """``2 γ_L max|ref|``: the bound on ``|y - ref|`` for any float32 recomputation ``y``.

    ``L`` is :func:`reduction_length` of ``model`` and ``ref`` its output on ``x``.
    """
    return rounding_bound(np.abs(_np(ref)).max(initial=0.0), reduction_length(model, x))


def top1_margin(ref: Any) -> np.ndarray:
    """Largest minus second-largest value along axis 1, per position (``(N, C, ...)`` → ``(N, ...)``)."""
    r = _np(ref)
    if r.ndim < 2 or r.shape[1] < 2:
        raise ValueError(f"top-1 needs (N, C>=2, ...) values, got shape {r.shape}")
    two = np.sort(np.moveaxis(r, 1, -1), axis=-1)[..., -2:]
    return two[..., 1] - two[..., 0]


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of two computations, near-ties of the reference set aside.

    Attributes:
        agree: positions compared whose argmax over axis 1 is the same.
        compared: positions compared (``total - near_ties``).
        near_ties: positions whose reference top-1 margin is at most ``2 tol``.
        tol: the bound on ``|got - ref|`` the near-ties were set aside for.
    """

    agree: int
    compared: int
    near_ties: int
    tol: float

    @property
    def total(self) -> int:
        return self.compared + self.near_ties

    @property
    def rate(self) -> float:
        """``agree / compared`` (1.0 when every position was a near-tie)."""
        return self.agree / self.compared if self.compared else 1.0

    def __str__(self) -> str:
        return (f"top-1 agreement {self.agree}/{self.compared}; {self.near_ties} near-tie(s) of "
                f"{self.total} set aside (reference top-1 margin <= 2 tol = {2 * self.tol:.3g})")


def top1_agreement(got: Any, ref: Any, tol: float) -> Agreement:
    """Agreement of ``argmax(got)`` with ``argmax(ref)`` over axis 1, near-ties set aside.

    Args:
        got: the other computation's values, shape ``(N, C, ...)``.
        ref: the reference values, same shape.
        tol: a bound on ``|got - ref|`` element-wise (e.g. :func:`output_tolerance`);
            positions with reference top-1 margin ``<= 2 tol`` are near-ties.
    """
    g, r = _np(got), _np(ref)
    if g.shape != r.shape:
        raise ValueError(f"shapes differ: {g.shape} vs {r.shape}")
    near = top1_margin(r) <= 2 * tol
    same = g.argmax(1) == r.argmax(1)
    return Agreement(int((same & ~near).sum()), int((~near).sum()), int(near.sum()), float(tol))


def lowest_explained_agreement(ref: Any, tol: float) -> float:
    """``1 - near_ties / N``: the lowest top-1 agreement rounding within ``tol`` can explain.

    For a product figure (e.g. ``VerifyReport.top1_agreement``) counted over every sample.
    """
    near = top1_margin(ref) <= 2 * tol
    return 1.0 - float(near.sum()) / max(near.size, 1)


def runtime_outputs(path: Any, model: nn.Module, x: torch.Tensor, optimized: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{output name: (onnxruntime values, PyTorch values)}`` for one batch ``x``.

    ``optimized``: onnxruntime's deployed session (``ORT_ENABLE_ALL``, its fused integer
    kernels) or the graph as written (``ORT_DISABLE_ALL``), as in ``verify_onnx``.
    """
    from qtemperate.export.onnx import flatten_outputs
    from qtemperate.export.runtime import ort_runner

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            names, refs = flatten_outputs(model(x))
    finally:
        model.train(was_training)
    got = ort_runner(path, optimized=optimized)(x.detach().float().numpy())
    return {n: (np.asarray(g), r.detach().float().numpy()) for n, g, r in zip(names, got, refs)}


@dataclass(frozen=True)
class RuntimeCheck:
    """One output of a runtime against PyTorch, judged by the float bound.

    Attributes:
        max_abs_diff: ``max |got - ref|``.
        tol: ``2 γ_L max|ref|`` (:func:`output_tolerance`).
        agreement: near-tie-aware top-1 agreement, ``None`` for a non-class output.
        lowest_explained: :func:`lowest_explained_agreement` of ``ref`` (1.0 for a
            non-class output): the lowest product figure near-ties alone explain.
    """

    max_abs_diff: float
    tol: float
    agreement: Agreement | None
    lowest_explained: float

    @property
    def exact(self) -> bool:
        """Float rounding only: ``max |Δ| <= tol`` and every non-near-tie argmax agrees."""
        return self.max_abs_diff <= self.tol and (self.agreement is None or self.agreement.rate == 1.0)

    def __str__(self) -> str:
        head = f"max |Δ| {self.max_abs_diff:.3g} (bound 2 γ_L max|ref| = {self.tol:.3g})"
        return head if self.agreement is None else f"{head}, {self.agreement}"


def compare_runtime(
    path: Any, model: nn.Module, x: torch.Tensor, optimized: bool = True, classes: tuple[str, ...] | None = None
) -> dict[str, RuntimeCheck]:
    """Each output of the ONNX file in onnxruntime against ``model`` on ``x`` (:class:`RuntimeCheck`).

    ``classes``: the outputs to take top-1 agreement of (default: those ``verify_onnx``
    takes, ``qtemperate.export.runtime.is_classification_output``).
    """
    from qtemperate.export.runtime import is_classification_output

    outs = runtime_outputs(path, model, x, optimized)
    length = reduction_length(model, x)
    checks = {}
    for name, (got, ref) in outs.items():
        tol = rounding_bound(np.abs(ref.astype(np.float64)).max(initial=0.0), length)
        is_class = name in classes if classes is not None else is_classification_output(name, ref.shape, len(outs))
        diff = float(np.abs(got.astype(np.float64) - ref).max(initial=0.0))
        checks[name] = RuntimeCheck(
            diff, tol, top1_agreement(got, ref, tol) if is_class else None,
            lowest_explained_agreement(ref, tol) if is_class else 1.0,
        )
    return checks


def assert_runtime_exact(
    path: Any,
    model: nn.Module,
    x: torch.Tensor,
    report: Any = None,
    classes: tuple[str, ...] | None = None,
    *,
    sessions: tuple[str, ...] = ("deployed", "graph"),
    bounded_diff: bool = True,
    min_agreement: float = 1.0,
) -> dict[str, dict[str, RuntimeCheck]]:
    """onnxruntime equals ``model`` on ``x`` up to float rounding, per session and output.

    Every top-1 that is no near-tie agrees; with ``bounded_diff`` each output's
    ``max |Δ|`` is within ``2 γ_L max|ref|`` too (:class:`RuntimeCheck`: no quantization
    level flipped). With ``report`` (a ``VerifyReport`` on the same inputs) its figures
    must be ones rounding explains: agreement at least :func:`lowest_explained_agreement`
    (less ``1 - min_agreement``), ``max_abs_diff`` within the bound (if ``bounded_diff``).

    Quantized graphs: where an exact value lies on a rounding boundary (``k + 1/2`` steps,
    common when sums of grid values are requantized), onnxruntime's integer requantization
    and PyTorch's float one may round it apart: one whole level, not float rounding, and
    no float bound covers it. A caller that allows such flips passes ``bounded_diff=False``
    and the fraction of non-near-tie positions whose top-1 must agree (``min_agreement``),
    and says why.

    Args:
        sessions: ``"deployed"`` (``ORT_ENABLE_ALL``, the fused integer kernels) and/or
            ``"graph"`` (``ORT_DISABLE_ALL``, the graph as written).
        bounded_diff: claim ``max |Δ| <= 2 γ_L max|ref|`` (no level flipped).
        min_agreement: lowest near-tie-aware agreement accepted (1.0: all of it).

    Returns:
        ``{session: {output name: RuntimeCheck}}`` (printed too: ``pytest -s`` shows them).
    """
    checks = {}
    for session in sessions:
        optimized = {"deployed": True, "graph": False}[session]
        checks[session] = compare_runtime(path, model, x, optimized, classes)
        for name, c in checks[session].items():
            print(f"onnxruntime {session} session, output {name!r} vs PyTorch: {c}")
            if bounded_diff:
                assert c.max_abs_diff <= c.tol, f"{session} {name}: {c}"
            assert c.agreement is None or c.agreement.rate >= min_agreement, f"{session} {name}: {c}"
            if report is None:
                continue
            figures = getattr(report.outputs[name], session)
            if bounded_diff:
                assert figures.max_abs_diff <= c.tol, (
                    f"{session} {name}: reported max |Δ| {figures.max_abs_diff:.3g} > {c.tol:.3g}")
            if c.agreement is not None:
                assert figures.agreement >= c.lowest_explained - (1 - min_agreement), (
                    f"{session} {name}: reported agreement {figures.agreement} < {c.lowest_explained} "
                    f"(1 - near-ties / N; {c.agreement})")
    return checks


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def assert_accuracy_explained(
    reported: float, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, output: str | None = None, what: str = ""
) -> int:
    """A reported accuracy equals one recomputed from ``model(x)``, but for near-ties.

    The product scores in its own batches (other kernels, other rounding): a sample whose
    logits' top-1 margin is at most ``2 tol`` (``tol = 2 γ_L max|logit|``) may be counted
    either way where that changes its verdict: a correct near-tie may turn wrong, a wrong
    one right if its label's logit is within ``2 tol`` of the largest. The reported count
    ``reported · N`` must lie in the range those allow (counts, not floats).

    Returns:
        The number of near-ties.
    """
    logits = _forward(model, x)
    logits = (logits[output] if output is not None else logits).double()
    tol = output_tolerance(model, x, logits)
    near = torch.from_numpy(top1_margin(logits) <= 2 * tol)
    correct = logits.argmax(1) == y
    label_close = logits.gather(1, y[:, None])[:, 0] >= logits.max(1).values - 2 * tol
    lo = int(correct.sum()) - int((near & correct).sum())
    hi = int(correct.sum()) + int((near & ~correct & label_close).sum())
    n = len(y)
    print(f"{what}: reported accuracy {reported} ({reported * n:.6g}/{n}), recomputed {int(correct.sum())}/{n}, "
          f"{int(near.sum())} near-tie(s) (top-1 margin <= {2 * tol:.3g}): {lo}..{hi} explained")
    assert lo - 1e-6 * n <= reported * n <= hi + 1e-6 * n, (
        f"{what}: reported {reported} ({reported * n:.6g}/{n}) outside {lo}..{hi}/{n}, what the "
        f"{int(near.sum())} near-tie(s) of the recomputed logits explain")
    return int(near.sum())


def assert_figures_explained(
    agreement: float | None, max_abs_diff: float | None, model: nn.Module, x: torch.Tensor,
    *, bounded_diff: bool = True, min_agreement: float = 1.0, output: str | None = None, what: str = "",
) -> float:
    """A product's reported top-1 agreement / max |Δ| for ``model`` on ``x`` is float rounding.

    For figures the product computed itself (``summary.json``, ``export_and_check``): the
    agreement must be at least :func:`lowest_explained_agreement` of ``model(x)`` (1 -
    near-ties / N; less ``1 - min_agreement`` where the caller allows flipped quantization
    levels, :func:`assert_runtime_exact`) and, with ``bounded_diff``, ``max_abs_diff``
    within ``2 γ_L max|ref|``.

    ``output`` names the head of a model that returns a dict.

    Returns:
        The bound ``tol`` used.
    """
    ref = _forward(model, x)
    ref = ref[output] if output is not None else ref
    tol = output_tolerance(model, x, ref)
    lowest = lowest_explained_agreement(ref, tol) - (1 - min_agreement) if agreement is not None else 1.0
    print(f"{what}: reported agreement {agreement}, max |Δ| {max_abs_diff}; explained: "
          f">= {lowest:.4g} (near-ties of {len(ref)} with margin <= {2 * tol:.3g}), |Δ| <= {tol:.3g}")
    if agreement is not None:
        assert agreement >= lowest, f"{what}: agreement {agreement} < {lowest} (1 - near-ties / N, tol {tol:.3g})"
    if bounded_diff and max_abs_diff is not None:
        assert max_abs_diff <= tol, f"{what}: max |Δ| {max_abs_diff:.3g} > 2 γ_L max|ref| = {tol:.3g}"
    return tol
