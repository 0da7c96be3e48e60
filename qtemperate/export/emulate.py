"""Run ONNX files on an emulated CPU class (``qemu-x86_64 -cpu Haswell``).

The int16 saturation of x86 CPUs without VNNI can be observed on a machine that has
VNNI: Debian's ``qemu-user`` runs a Linux process on an emulated CPU model, and
onnxruntime (or OpenVINO) picks its kernels from the CPUID the emulator reports
(Haswell: AVX2, no VNNI, no AVX-512). Only the runtime runs under emulation (this file,
run by path, imports nothing but numpy and the runtime); PyTorch references are
computed natively.

Used by the ``slow`` test that shows the saturation and by ``bench/``. Without
``qemu-x86_64`` (or on a non-x86 host) :func:`emulator_available` is False.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # run by path: this folder's onnx.py / openvino.py must not shadow packages
    sys.path = [p for p in sys.path if p and __file__.rsplit("/", 1)[0] not in (p, p.rstrip("/"))]

import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["EMULATED_CPU", "emulator_available", "run_emulated"]

EMULATED_CPU = "Haswell"
"""QEMU CPU model: AVX2 + FMA, no AVX-512, no VNNI (the ``x86-avx2`` class)."""


def emulator_available() -> bool:
    """Whether ``qemu-x86_64`` exists and the host is x86-64 (so this Python can run under it)."""
    return shutil.which("qemu-x86_64") is not None and platform.machine().lower() in ("x86_64", "amd64")


def run_emulated(
    paths: Sequence[str | Path],
    x: np.ndarray,
    cpu: str = EMULATED_CPU,
    optimized: bool = True,
    timeout: float = 1800.0,
    runtime: str = "onnxruntime",
) -> list[list[np.ndarray]]:
    """Run each model file on ``x`` under ``qemu-x86_64 -cpu <cpu>``.

    Args:
        paths: ONNX files (or OpenVINO IR ``.xml`` for ``runtime="openvino"``).
        x: The float32 input batch.
        cpu: The QEMU CPU model.
        optimized: onnxruntime's default optimized session (fused integer kernels) or
            ``ORT_DISABLE_ALL``.
        timeout: Seconds before the emulated process is killed (emulation is ~50x slower).
        runtime: ``"onnxruntime"`` or ``"openvino"`` (CPU plugin, f32 precision hint, the
            batch of ``x``).

    Returns:
        Per file, its outputs in graph order.

    Raises:
        RuntimeError: when qemu is missing or the emulated process fails.
    """
    if not emulator_available():
        raise RuntimeError("qemu-x86_64 not found (Debian: apt-get install qemu-user)")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, x=np.ascontiguousarray(x, dtype=np.float32))
        if runtime not in ("onnxruntime", "openvino"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', got {runtime!r}")
        mode = "ov" if runtime == "openvino" else ("1" if optimized else "0")
        cmd = ["qemu-x86_64", "-cpu", cpu, sys.executable, str(Path(__file__).resolve()),
               str(inp), str(out), mode, *map(str, paths)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if res.returncode != 0:
            tail = "\n".join(line for line in res.stderr.splitlines() if "TCG doesn't support" not in line)
            raise RuntimeError(f"emulated onnxruntime failed ({cpu}): {tail[-2000:]}")
        data = np.load(out)
        return [[data[f"{i}_{k}"] for k in range(int(data[f"{i}_n"]))] for i in range(len(paths))]


def _run_openvino(paths: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    import openvino as ov

    core = ov.Core()
    res: dict[str, np.ndarray] = {}
    for i, p in enumerate(paths):
        model = core.read_model(p)
        model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": 1})
        outs = compiled.create_infer_request().infer({0: x})
        res[f"{i}_n"] = np.array(len(compiled.outputs))
        for k, o in enumerate(compiled.outputs):
            res[f"{i}_{k}"] = np.asarray(outs[o])
    return res


def _main(argv: list[str]) -> None:
    inp, out, mode, *paths = argv
    x = np.load(inp)["x"]
    if mode == "ov":
        np.savez(out, **_run_openvino(paths, x))
        return
    import onnxruntime as ort

    optimized = mode
    res: dict[str, np.ndarray] = {}
    for i, p in enumerate(paths):
        so = ort.SessionOptions()
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized == "1"
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
        res[f"{i}_n"] = np.array(len(outs))
        for k, o in enumerate(outs):
            res[f"{i}_{k}"] = o
    np.savez(out, **res)


if __name__ == "__main__":
    _main(sys.argv[1:])
