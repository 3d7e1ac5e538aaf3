"""`moemesh eval` on the shipped model: the mesh's figures are the single process's, token by token,
far better than a unigram model of the same text; and the mesh's greedy text is transformers'.

The shipped checkpoint (moemesh/assets/shakespeare-moe) is the one `moemesh up` serves by default;
its held-out.txt is an excerpt of plays it never saw in training."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from moemesh.client import Client
from moemesh.engine.sampling import SamplingParams
from moemesh.launcher import DEFAULT_MODEL
from moemesh.scoring import largest_difference, score_local, score_remote, unigram_bits_per_byte
from moemesh.train.export import HELD_OUT_FILE

pytestmark = pytest.mark.slow  # starts a mesh of real processes

EVAL_BYTES = 4096  # 9 windows of the held-out excerpt
TIMEOUT_S = 120.0  # hang bound of every call


@pytest.fixture(scope="module")
def mesh(mesh_factory):
    return mesh_factory(DEFAULT_MODEL, 2, "--max-model-len", "512")


@pytest.fixture(scope="module")
def text() -> str:
    return (DEFAULT_MODEL / HELD_OUT_FILE).read_bytes()[:EVAL_BYTES].decode("ascii")


@pytest.fixture(scope="module")
def alone(text):
    """The single process's score of the same text: the reference."""
    return score_local(DEFAULT_MODEL, text, batch=4)


def test_the_mesh_scores_held_out_text_as_the_single_process_does(mesh, text, alone):
    async def remote():
        async with Client(mesh.gateway, timeout=TIMEOUT_S) as client:
            return await score_remote(client, text, max_context=512, concurrency=4, timeout_s=TIMEOUT_S)

    served = asyncio.run(remote())
    same_tokens, worst = largest_difference(served, alone)
    print(f"held-out {served.bits_per_byte:.4f} bits/byte through the mesh, {alone.bits_per_byte:.4f} alone "
          f"(largest per-token difference {worst:.2e}); unigram {unigram_bits_per_byte(text.encode()):.4f}; "
          f"token accuracy {served.token_accuracy:.3f}")
    assert same_tokens and served.tokens == len(text.encode())  # every byte scored, by the same tokens
    assert worst <= 1e-4
    assert abs(served.bits_per_byte - alone.bits_per_byte) <= 1e-4
    # A trained model, not a random one: well under what any context-free byte model reaches on this text.
    assert served.bits_per_byte < unigram_bits_per_byte(text.encode()) - 1.5


def test_the_eval_command_reports_the_same_figures(mesh, tmp_path, text, alone):
    path = tmp_path / "held-out.txt"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "moemesh.cli", "eval", "--target", mesh.gateway, "--text", str(path),
                          "--json"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["bits_per_byte"] == pytest.approx(alone.bits_per_byte, abs=1e-4)
    assert report["token_accuracy"] == pytest.approx(alone.token_accuracy, abs=1e-3)
    assert (report["bytes"], report["tokens"], report["windows"]) == (len(text), len(text), 9)
    bad = subprocess.run([sys.executable, "-m", "moemesh.cli", "eval", "--target", mesh.gateway, "--text",
                          str(tmp_path / "absent.txt")], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert bad.returncode != 0 and "cannot read --text" in bad.stderr


def test_greedy_text_through_the_mesh_is_transformers_generate(mesh):
    from transformers import AutoModelForCausalLM

    from moemesh.model.config import load_config
    from moemesh.text import TextCodec

    prompts = ["HAMLET. To be, or not to be", "Enter the KING and QUEEN", "O Romeo, Romeo!"]
    codec = TextCodec(DEFAULT_MODEL, load_config(DEFAULT_MODEL))
    ref = AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL), dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)

    async def served(prompt: str):
        async with Client(mesh.gateway, timeout=TIMEOUT_S) as client:
            return await client.generate_text(prompt, params=params)

    for prompt in prompts:
        ids = codec.encode(prompt)
        want = ref.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, len(ids):]
        got = asyncio.run(served(prompt))
        assert list(got.token_ids) == want.tolist()
        print(f"{prompt!r} -> {got.text!r}")
