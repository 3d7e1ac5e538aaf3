"""The GPU check script runs end to end at toy sizes on the CPU, so it is ready when a GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "gpu-check.json").read_text())["checks"]
    assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v], results
    assert results["a_engine_bf16_vs_cpu_fp32"]["greedy_tokens_equal"] == results["a_engine_bf16_vs_cpu_fp32"]["greedy_tokens_total"]
    assert results["b_nccl_world_of_one"] == {"skipped": "device is 'cpu', not CUDA"}
    assert [r["batch"] for r in results["d_paper_model_one_gpu"]["rows"]] == [4, 8]
    assert (tmp_path / "gpu-check.md").read_text().startswith("# gpu-check (cpu)")
