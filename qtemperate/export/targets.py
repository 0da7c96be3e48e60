"""Deployment targets: which CPU class runs the int8 graph, and which integer ranges it computes exactly.

An int8 convolution or matrix product on a CPU multiplies 8-bit activations by 8-bit
weights and accumulates. How it accumulates depends on the CPU class, and on one class
the result is not exact:

==============  ===============================================================  ==============
target          onnxruntime's u8 x s8 kernel (MLAS)                              exact weights
==============  ===============================================================  ==============
``x86-avx2``    ``vpmaddubsw``: each pair of adjacent products ``a0*w0 + a1*w1``  7-bit (+-63)
                is summed into **int16 with saturation**, then widened (x86        in every layer
                without VNNI: AVX2, AVX-512BW, SSE4.1 -- every AMD CPU before Zen
                4, every Intel CPU before Cascade Lake / Ice Lake)
``x86-vnni``    ``vpdpbusd`` (AVX-512 VNNI, AVX-VNNI) or AMX-INT8: four products   8-bit
                summed straight into int32
``arm64``       NEON / ``sdot`` / ``udot``: products widened before accumulation   8-bit
``generic``     any of the above (the file must be exact on every CPU)            7-bit
==============  ===============================================================  ==============

The saturation rule is plain arithmetic. onnxruntime runs 8-bit activations as uint8
(on x86 its QDQ optimizer turns int8 activations into uint8 with zero point 128), so an
activation ``a`` lies in ``0..255`` and a pair of same-signed weights ``w0, w1`` gives

    |a0*w0 + a1*w1| <= 255 * (|w0| + |w1|),

which stays inside int16 (``-32768..32767``) for every input exactly when
``255 * (|w0| + |w1|) <= 32767``; with symmetric weights in ``-q..q`` that is
``2 * 255 * q <= 32767``, i.e. ``q <= 64``. Narrow-range symmetric weights of ``b``
bits reach ``q = 2^(b-1) - 1``: 8 bits (127) can saturate, 7 bits (63: 2*255*63 = 32130)
cannot. onnxruntime's own ``quantize_static(reduce_range=True)`` quantizes weights to
``-64..64`` for the same reason. Activations keep their full uint8 range (narrowing them
adds Clip nodes that break onnxruntime's fusion).

:func:`check_int16_saturation` applies the rule to an exported file's integer weights,
so the exactness of a graph for ``x86-avx2`` is checked on any CPU.

This module imports only the standard library at import time (recipes validate
``export.target`` against :data:`TARGET_CHOICES` without loading torch or onnx).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "AUTO",
    "INT16_MAX",
    "INT16_MIN",
    "TARGETS",
    "TARGET_CHOICES",
    "CpuInfo",
    "SaturationReport",
    "Target",
    "check_int16_saturation",
    "cpu_info",
    "detect_target",
    "max_exact_weight_level",
    "resolve_target",
    "target_mismatch",
]

AUTO = "auto"
INT16_MAX = 32767
INT16_MIN = -32768
U8_MAX = 255
"""Largest activation value the uint8 kernels see (int8 activations are shifted by +128)."""


def max_exact_weight_level(act_max: int = U8_MAX) -> int:
    """Largest ``q`` such that weights in ``-q..q`` can never saturate an int16 pair sum.

    ``2 * act_max * q <= 32767`` -> ``q = 32767 // (2 * act_max)`` (64 for uint8).
    """
    return INT16_MAX // (2 * act_max)


def _narrow_bits_within(level: int) -> int:
    """Widest narrow-range symmetric bit width ``b`` (2..8) with ``2^(b-1) - 1 <= level``."""
    return max(b for b in range(2, 9) if 2 ** (b - 1) - 1 <= level)


@dataclass(frozen=True)
class Target:
    """A deployment target: a CPU class and the integer ranges its int8 kernels compute exactly.

    Attributes:
        name: The recipe value (``export.target``).
        description: What the CPU class is and how its kernels accumulate.
        int16_pair_sums: Whether onnxruntime's u8 x s8 kernels sum adjacent products into
            int16 with saturation on this class (``vpmaddubsw``).
        max_weight_bits: Widest narrow-range symmetric weights that are exact here (a QAT
            student trained for this target never has wider weights, first and last
            layers included).
    """

    name: str
    description: str
    int16_pair_sums: bool
    max_weight_bits: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for ``summary.json``)."""
        return asdict(self)


_SATURATING_BITS = _narrow_bits_within(max_exact_weight_level())  # 7

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "x86-avx2",
            "x86 without VNNI (AVX2 / AVX-512BW / SSE4.1): u8 x s8 pairs summed into int16 "
            "with saturation (vpmaddubsw)",
            True,
            _SATURATING_BITS,
        ),
        Target(
            "x86-vnni",
            "x86 with AVX-512 VNNI, AVX-VNNI or AMX-INT8: u8 x s8 products summed into int32",
            False,
            8,
        ),
        Target("arm64", "64-bit ARM: products widened before int32 accumulation", False, 8),
        Target(
            "generic",
            "any CPU: ranges exact on every int8 kernel above (those of x86-avx2)",
            True,
            _SATURATING_BITS,
        ),
    )
}
TARGET_CHOICES: tuple[str, ...] = (AUTO, *TARGETS)
"""Allowed values of ``export.target``: ``auto`` (detect the CPU running the run) or a target name."""


# ----------------------------------------------------------------------------- the CPU
_VNNI_FLAGS = frozenset({"avx512vnni", "avxvnni", "amxint8", "avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_ARM64 = frozenset({"aarch64", "arm64", "armv8", "armv8l", "arm64e"})


@dataclass(frozen=True)
class CpuInfo:
    """What is known about the CPU running this process.

    Attributes:
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``, ...).
        model: The CPU model name, when it could be read.
        flags: Lower-case feature flags (``avx2``, ``avx512_vnni``, ...); empty when unknown.
        source: Where the flags came from (``/proc/cpuinfo``, ``lscpu``, ``sysctl`` or
            ``none``).
    """

    machine: str
    model: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)
    source: str = "none"

    @property
    def has_vnni(self) -> bool:
        """AVX-512 VNNI, AVX-VNNI or AMX-INT8 (int8 products summed into int32)."""
        return bool(self.flags & _VNNI_FLAGS)

    def to_dict(self) -> dict[str, Any]:
        """The facts ``summary.json`` records (the int8-relevant flags, not all of them)."""
        relevant = sorted(
            f for f in self.flags
            if f in _VNNI_FLAGS or f in {"avx2", "avx512f", "avx512bw", "sse4_1", "asimd", "asimddp"}
        )
        return {"machine": self.machine, "model": self.model, "int8_flags": relevant,
                "vnni": self.has_vnni, "flags_source": self.source}


def _parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.lower().split())
    return model, frozenset(flags)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read the CPU's model and feature flags (``/proc/cpuinfo``, else ``lscpu``, else ``sysctl``)."""
    machine = platform.machine().lower()
    proc = Path("/proc/cpuinfo")
    if proc.is_file():
        model, flags = _parse_cpuinfo(proc.read_text(errors="replace"))
        if flags:
            return CpuInfo(machine, model, flags, "/proc/cpuinfo")
    out = _run(["lscpu"])
    if out:
        model, flags = _parse_cpuinfo(out)
        if flags:
            return CpuInfo(machine, model, flags, "lscpu")
    out = _run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                "machdep.cpu.leaf7_features"])
    if out:
        lines = out.splitlines()
        flags = frozenset(f.lower() for line in lines[1:] for f in line.split())
        return CpuInfo(machine, lines[0].strip() if lines else "", flags, "sysctl")
    return CpuInfo(machine or "unknown", platform.processor())


def detect_target(info: CpuInfo | None = None) -> str:
    """The target of the CPU running this process (or of ``info``).

    ``QTEMPERATE_TARGET`` (a target name) overrides the detection, e.g. inside an emulator
    whose ``/proc/cpuinfo`` is the host's.

    Returns:
        ``arm64`` on 64-bit ARM; on x86 ``x86-vnni`` when the flags show VNNI / AMX-INT8,
        ``x86-avx2`` otherwise; ``generic`` when the flags cannot be read or the machine
        is neither.
    """
    forced = os.environ.get("QTEMPERATE_TARGET")
    if forced:
        return _check_name(forced, "QTEMPERATE_TARGET")
    info = info or cpu_info()
    if info.machine in _ARM64:
        return "arm64"
    if info.machine in _X86 and info.flags:
        return "x86-vnni" if info.has_vnni else "x86-avx2"
    return "generic"


def _check_name(name: str, field_name: str) -> str:
    if name not in TARGETS:
        raise ValueError(
            f"{field_name}: unknown target {name!r}; allowed: {', '.join(TARGET_CHOICES)}"
        )
    return name


def resolve_target(target: str | None, field_name: str = "target") -> str | None:
    """``auto`` -> :func:`detect_target`; a target name -> itself; ``None`` -> ``None``.

    Raises:
        ValueError: naming ``field_name`` and the allowed values, for an unknown name.
    """
    if target is None:
        return None
    if target == AUTO:
        return detect_target()
    return _check_name(target, field_name)


def target_mismatch(trained: str | None, host: str) -> str | None:
    """A warning when a student trained for ``trained`` is deployed on a ``host`` CPU, else ``None``.

    Deploying on a CPU whose kernels saturate with ranges the student was not trained
    for is a loud warning (agreement is not guaranteed there); a student trained for a
    saturating class deployed on an exact one is still exact, and only gave up a bit.
    """
    if trained == host:
        return None
    host_t = TARGETS.get(host)
    if trained is None:
        if host_t is not None and host_t.int16_pair_sums:
            return (
                f"the student was quantized without a deployment target and this CPU is "
                f"{host}: 8-bit weights can saturate its int16 pair sums, so the deployed "
                f"onnxruntime graph may disagree with PyTorch; retrain with export.target: {host}"
            )
        return None
    tr = TARGETS[trained]
    if host_t is not None and host_t.int16_pair_sums and not tr.int16_pair_sums:
        return (
            f"WARNING: the student was trained for {trained} ({tr.max_weight_bits}-bit weights) "
            f"but this CPU is {host}: its int8 kernels sum u8 x s8 pairs into int16 and can "
            f"saturate, so the deployed agreement holds for {trained} CPUs only; retrain with "
            f"export.target: {host} (or generic) for an exact graph here"
        )
    return (
        f"the student was trained for {trained} and this CPU is {host}: the graph is exact "
        f"here too, but the numbers measured on this CPU are not those of a {trained} CPU"
    )


# ----------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class SaturationReport:
    """Whether any integer conv/gemm of an ONNX graph can saturate int16 pair sums.

    Attributes:
        target: The target checked.
        applies: Whether the target's kernels sum pairs into int16 at all (if not, every
            graph is exact there and ``ok`` is True).
        ok: No layer can saturate, for any input.
        worst_pair_sum: ``max over layers and output channels of 255 * (|w0| + |w1|)``
            for the two largest same-signed weights of a channel.
        limit: ``32767``.
        layers: Per integer conv/gemm: ``node`` (its name, else its output tensor), ``op``,
            ``weight_shape``, ``max_abs_weight``, ``worst_pair_sum``, ``ok``.
    """

    target: str
    applies: bool
    ok: bool
    worst_pair_sum: int
    limit: int
    layers: list[dict[str, Any]]

    def to_dict(self, with_layers: bool = False) -> dict[str, Any]:
        """Plain-dict view; the per-layer list only when asked (it is long)."""
        d = asdict(self)
        if not with_layers:
            d.pop("layers")
            d["layers_at_risk"] = [
                f"{x['op']} -> {x['node']} {'x'.join(map(str, x['weight_shape']))} (max |w| {x['max_abs_weight']})"
                for x in self.layers if not x["ok"]
            ]
            d["layers_checked"] = len(self.layers)
        return d


def _worst_pair(w: Any, act_max: int) -> int:
    """``act_max * max(top-2 positive sum, top-2 |negative| sum)`` over output rows of ``w``."""
    import numpy as np

    w = w.astype(np.int64)
    if w.shape[1] == 1:  # a single product per output: no pair
        return int(act_max * np.abs(w).max(initial=0))
    pos = -np.sort(-np.clip(w, 0, None), axis=1)[:, :2].sum(axis=1)
    neg = -np.sort(-np.clip(-w, 0, None), axis=1)[:, :2].sum(axis=1)
    return int(act_max * max(pos.max(initial=0), neg.max(initial=0)))


def check_int16_saturation(model: Any, target: str = "x86-avx2") -> SaturationReport:
    """Check from an ONNX graph's integer weights that no conv/gemm can saturate on ``target``.

    For every ``Conv``/``Gemm``/``MatMul`` whose input and weight both come from a
    ``DequantizeLinear`` of integers (the ops onnxruntime fuses into ``QLinearConv`` /
    ``QGemm``), and every output channel, the two largest positive weights and the two
    largest negative ones bound any adjacent pair (whatever order the kernel packs them
    in): ``255 * (|w0| + |w1|) <= 32767`` means no input can saturate (module docstring).

    Args:
        model: An ``onnx.ModelProto`` or a path to one.
        target: A target name; targets without int16 pair sums pass trivially.

    Returns:
        A :class:`SaturationReport`.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    t = TARGETS[_check_name(target, "target")]
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inits = {i.name: i for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    layers: list[dict[str, Any]] = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        x_dq, w_dq = prod.get(n.input[0]), prod.get(n.input[1])
        if x_dq is None or w_dq is None:
            continue
        if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if w_dq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[w_dq.input[0]]).astype(np.int64)
        if len(w_dq.input) > 2 and w_dq.input[2] in inits:
            zp = numpy_helper.to_array(inits[w_dq.input[2]]).astype(np.int64)
            axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if zp.size > 1:
                shape[axis] = zp.size
            w = w - zp.reshape(shape)
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        if n.op_type == "Conv" or (n.op_type == "Gemm" and trans_b):  # one output per row
            rows = w.reshape(w.shape[0], -1)
        else:  # Gemm without transB, MatMul: (K, N), one output per column
            rows = w.reshape(w.shape[0], -1).T
        worst = _worst_pair(rows, U8_MAX)
        layers.append({"node": n.name or n.output[0], "op": n.op_type,
                       "weight_shape": [int(d) for d in w.shape],
                       "max_abs_weight": int(np.abs(rows).max(initial=0)),
                       "worst_pair_sum": worst, "ok": worst <= INT16_MAX})
    worst_all = max((x["worst_pair_sum"] for x in layers), default=0)
    ok = (not t.int16_pair_sums) or all(x["ok"] for x in layers)
    return SaturationReport(t.name, t.int16_pair_sums, ok, worst_all, INT16_MAX, layers)

