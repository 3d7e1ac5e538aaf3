"""The trained model's checkpoint: the engine and transformers load it and compute the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.train.export import HELD_OUT_FILE, TRAINING_FILE, export, held_out_sample
from moemesh.train.recipe import train
from tests.moemesh.model.test_decoder import _all_logits
from tests.moemesh.train.test_recipe import fast_settings

transformers = pytest.importorskip("transformers")
PROMPTS = [[0, 87, 104, 111], [0, 3 + ord("T"), 3 + ord("o"), 3 + ord(" ")], [0]]


@pytest.fixture(scope="module")
def trained(archive, tmp_path_factory):
    s = fast_settings(archive, tmp_path_factory.mktemp("trained") / "model")
    model, corpus, result = train(s, say=lambda _: None)
    return s, model, export(model, s, corpus, result), result


def test_engine_and_transformers_compute_the_trained_models_logits(trained):
    s, model, out, _ = trained
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = {k: v.bfloat16().float() for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)  # the trained weights as the bf16 file holds them
    ours = _all_logits(build_model(out, RuntimeShape(max_seqs=4, max_model_len=s.seq_len + 1)), PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0]  # (n, V)
            trained_logits = model.eval()(torch.tensor([prompt])).logits[0]
        assert torch.equal(theirs, trained_logits)  # the export lost nothing beyond the bf16 rounding
        assert (logits - theirs).abs().max() / theirs.abs().max() <= 1e-4


def test_greedy_output_matches_transformers_generate(trained):
    s, _, out, _ = trained
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    engine = Engine(build_model(out, RuntimeShape(max_seqs=4, max_model_len=s.seq_len + 1)))
    got = generate(engine, PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for prompt, tokens in zip(PROMPTS, got):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert tokens == want[0, len(prompt):].tolist()


def test_checkpoint_records_its_recipe_data_and_metrics(trained, archive):
    s, _, out, result = trained
    record = json.loads((out / TRAINING_FILE).read_text())
    assert record["recipe"]["steps"] == 160 and record["recipe"]["hidden"] == 32
    assert record["data"]["held_out_works"] == ["hamlet", "tempest", "twelfth_night"]
    assert record["metrics"]["held_out_bits_per_byte"] == round(result.held_out_bits_per_byte, 4)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["moemesh.train.data_sha256"] == record["data"]["sha256"]
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == s.seq_len + 1
    sample = record["data"]["held_out_sample"]
    text = (out / HELD_OUT_FILE).read_bytes()
    assert sample["file"] == HELD_OUT_FILE and sample["bytes"] == len(text) > 0


def test_the_held_out_sample_is_whole_lines_from_a_third_of_the_way_in():
    text = b"".join(b"line %03d of the play\n" % i for i in range(300))  # 21 bytes a line
    offset, sample = held_out_sample(text, size=200)
    assert text[offset - 1 : offset] == b"\n" and offset >= len(text) // 3
    assert sample.endswith(b"\n") and len(sample) == 189 and text[offset : offset + len(sample)] == sample
    assert held_out_sample(b"no line end at all", size=5) == (0, b"no li")
