"""Data-plane choice: auto falls back to gloo with a stated reason; bf16 crosses as raw words."""

from __future__ import annotations

import pytest
import torch

from moemesh.errors import ConfigError
from moemesh.mesh.backend import choose_backend, nccl_unavailable_reason
from moemesh.mesh.nccl import raw_words


def test_auto_on_cpu_falls_back_to_gloo_and_says_why():
    choice = choose_backend("auto", "cpu")
    assert choice.name == "gloo"
    assert "falling back to gloo" in choice.reason and "not CUDA" in choice.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks a machine without CUDA")
def test_auto_on_a_cuda_device_without_cuda_names_the_missing_piece():
    choice = choose_backend("auto", "cuda:0")
    assert choice.name == "gloo"
    assert choice.reason == f"auto: falling back to gloo because {nccl_unavailable_reason('cuda:0')}"
    assert "CUDA" in choice.reason or "CuPy" in choice.reason


def test_nccl_requested_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ConfigError, match="transport nccl requested but unavailable: device is 'cpu'"):
        choose_backend("nccl", "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        choose_backend("mpi", "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_payload_round_trips_exactly_as_raw_words(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 33, generator=g) * 1e3).to(dtype)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")]).to(dtype)
    words = raw_words(x)
    assert words.dtype == {2: torch.int16, 4: torch.int32}[x.element_size()]
    back = words.clone().view(dtype)  # what the receiver reinterprets
    assert torch.equal(back.view(torch.uint8), x.view(torch.uint8))
