"""The GPU check script runs end to end at toy sizes on the CPU, so it is ready when a GPU is;
and the arithmetic its verdicts rest on is checked here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape
from moemesh.model.random_init import paper_config, random_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert _spec and _spec.loader
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # dataclasses look their module up (GpuCheckSettings)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow  # a subprocess
def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    run = json.loads((tmp_path / "gpu-check.json").read_text())
    results = run["checks"]
    assert run["not_finished"] == []
    assert list(results)[-1] == "b_nccl_subprocess"  # the one that can hang runs last
    assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v], results
    engine = results["a_engine_fp32_verdict_bf16_information"]
    assert engine["verdict"] == "pass" and "the CPU against itself" in engine["verdict_compares"]
    assert engine["fp32"]["greedy_tokens_equal"] == engine["fp32"]["greedy_tokens_total"]
    assert engine["fp32"]["relative_logit_error"] == 0.0
    bf16 = engine["bf16_for_information"]
    assert bf16["dtype"] == "torch.bfloat16" and bf16["relative_logit_error"] > 0  # really bf16, even on CPU
    assert len(bf16["first_difference_per_prompt"]) == 3
    assert results["b_nccl_subprocess"]["skipped"] == "device is 'cpu', not CUDA"
    assert results["b_nccl_subprocess"]["subprocess"]["exit_code"] == 0
    paper = results["d_paper_model_one_gpu"]
    assert [r["batch"] for r in paper["rows"]] == [4, 8]
    assert [r["decode_steps_timed"] for r in paper["rows"]] == [3, 3]  # 4 new tokens: the first comes from prefill
    assert paper["weight_GB"] > paper["expert_weight_GB"]  # attention and embeddings are counted
    assert (tmp_path / "gpu-check.md").read_text().startswith("# gpu-check (cpu)")


def test_copy_bandwidth_counts_read_and_write():
    assert gpu_check.copy_bandwidth(10**9, 1.0) == 2e9  # a 1 GB copy in 1 s moves 2 GB


def test_roofline_is_the_slower_of_memory_and_compute():
    traffic, flops = gpu_check.swiglu_cost(tokens=128, D=8192, F=32768, element_bytes=2)
    assert traffic == (3 * 8192 * 32768 + 2 * 128 * 8192) * 2
    assert flops == 2 * 128 * 3 * 8192 * 32768
    # H200-ish rates: 4.8 TB/s read+write traffic, 900 TFLOP/s: 128 tokens are memory bound
    seconds, bound = gpu_check.roofline_seconds(traffic, flops, 4.8e12, 900e12)
    assert bound == "memory" and seconds == pytest.approx(traffic / 4.8e12)
    seconds, bound = gpu_check.roofline_seconds(traffic, flops * 100, 4.8e12, 900e12)
    assert bound == "compute" and seconds == pytest.approx(flops * 100 / 900e12)


def test_the_token_budget_prefills_the_whole_batch_in_one_step():
    """The engine's default budget (4096 prompt tokens) admits 256 prompts of 16: a batch of 300
    would prefill over two steps, one of them inside the timed loop."""
    cfg = replace(paper_config(vocab=64), hidden_size=16, expert_intermediate_size=16, head_dim=4, num_heads=2,
                  num_kv_heads=2, num_layers=1)
    model = random_model(cfg, RuntimeShape(max_seqs=300, max_model_len=32))
    default = Engine(model)
    for i in range(300):
        default.add_request(str(i), [i % 64] * 16, SamplingParams(max_new_tokens=2, ignore_eos=True))
    default.step()
    assert default.num_waiting == 300 - 256  # the mislabelling the budget fixes
    assert gpu_check.prefill_budget(300, 16) == 4800
    tpot, steps = gpu_check.decode_tpot(model, 300, 16, 2, "cpu")  # asserts one prefill step itself
    assert steps == 1 and tpot > 0


def test_weight_bytes_count_attention_and_each_tensor_once():
    cfg = replace(paper_config(vocab=64), hidden_size=16, expert_intermediate_size=32, head_dim=4, num_heads=2,
                  num_kv_heads=2, num_layers=2)
    model = random_model(cfg, RuntimeShape(max_seqs=1, max_model_len=8))
    layer = model.dense.layers[0]
    attention = layer.attn.wqkv.nbytes + layer.attn.wo.nbytes
    total = gpu_check.weight_bytes(model.dense, model.moe.experts.layers)
    assert total > model.moe.experts.nbytes + 2 * attention
    assert gpu_check.weight_bytes(model.dense, model.dense) == gpu_check.weight_bytes(model.dense)
    assert gpu_check.weight_bytes((torch.zeros(4), torch.zeros(3))) == 28


@pytest.mark.slow  # a subprocess
def test_a_hung_nccl_subprocess_is_reported_as_not_finished(tmp_path):
    result = gpu_check.check_nccl("cpu", tmp_path, timeout_s=0.01)  # killed long before torch imports
    assert result["subprocess"]["timed_out_after_s"] == 0.01
