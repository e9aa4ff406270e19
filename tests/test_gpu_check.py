"""The one-shot GPU check starts and runs what this machine allows (CI proves it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_the_host_parts_and_skips_the_rest(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(tmp_path),
                           "--quick", "--no-build"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert steps["kernels"]["ok"] and steps["kernels"]["cases"] > 0
    assert steps["engine_world1"]["kv_exact"] and steps["engine_world1"]["weights_exact"]
    assert steps["engine_world1"]["old_released"]
    if not torch.cuda.is_available():
        assert all(steps[s]["skipped"] == "no GPU"
                   for s in ("build", "kernel_bench", "two_ranks_one_gpu"))
    assert (tmp_path / "gpu_check.txt").read_text().startswith("gpu_check on")
