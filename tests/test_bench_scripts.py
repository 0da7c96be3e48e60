"""The benchmark scripts run: ``bench/gpu_check.py --dry-run`` (the GPU script's small CPU
version, so the script a GPU machine runs is known to work) and the JPEG decode bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    s = res["sections"]
    assert set(s) == {"quickstart", "qat_steps", "torchrun_smoke", "decode"}
    assert s["quickstart"]["exit"] == 0 and s["quickstart"]["teacher_acc"] > 0.5
    configs = [r["config"] for r in s["qat_steps"]["rows"]]
    assert len(configs) == 7 and {"W8A8 fp32", "W4A4 fp32", "float fp32"} <= set(configs)
    assert all(r["step_ms"] > 0 for r in s["qat_steps"]["rows"])
    assert all(0 <= r["top1_agreement_vs_fp32"] <= 1 for r in s["qat_steps"]["rows"] if "W" in r["config"] and "autocast" in r["config"])
    assert s["torchrun_smoke"]["exit"] == 0 and 0 <= s["torchrun_smoke"]["student_acc"] <= 1
    assert s["decode"]["train"]["1"]["images_per_s"] > 0


def test_gpu_check_refuses_without_cuda_unless_dry_run(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "x.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_ort_int8_speedup_runs_and_the_int8_file_is_exact_for_this_cpu(tmp_path: Path) -> None:
    """One round: the JSON has both batches and every op type; the deployed int8 session
    agrees with its own graph (the promise of the detected target, on any CPU class)."""
    out = tmp_path / "ort.json"
    proc = subprocess.run([sys.executable, "bench/ort_int8_speedup.py", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["latency"]) == {"b1", "b64"}
    assert all(v["float_ms"] > 0 and v["int8_ms"] > 0 for v in res["latency"].values())
    assert "QLinearConv" in res["ms_per_op_type_b64"]["int8"] and "Conv" in res["ms_per_op_type_b64"]["float"]
    assert res["int8_deployed_vs_graph"]["agreement"] >= 0.99
