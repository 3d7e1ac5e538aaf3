"""scripts/bench_trained.py's in-process pieces on a tiny model (the mesh runs are the benchmark's,
not the tests'), and docs/balancing.md's rendering of a made-up record."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from moemesh.model.moe import Routing
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.tokenizer import TOKENIZER_VOCAB_SIZE
from scripts.bench_trained_doc import render

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_trained.py"
_spec = importlib.util.spec_from_file_location("bench_trained", SCRIPT)
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6


def test_routing_log_counts_every_copy_once_and_skips_dropped_ones():
    log = bench.RoutingLog()
    log.routed(0, Routing(torch.tensor([[0, 1], [1, -1]]), torch.ones(2, 2)))
    log.routed(1, Routing(torch.tensor([[2, 3], [3, 2]]), torch.ones(2, 2)))
    log.routed(0, Routing(torch.tensor([[1, 2]]), torch.ones(1, 2)))  # the next step: one token
    log.routed(1, Routing(torch.tensor([[0, 3]]), torch.ones(1, 2)))
    per_token = log.per_token((0, 1), 4)  # (T, L, E)
    assert per_token.shape == (3, 2, 4)
    assert per_token[:, 0].sum(0).tolist() == [1, 3, 1, 0]  # layer 0: the dropped copy counts nowhere
    assert per_token[:, 1].sum(0).tolist() == [1, 0, 2, 3]
    assert log.ids((0, 1))[0].tolist() == [[0, 1], [1, -1], [1, 2]]


def test_local_scoring_with_factors_of_one_is_exact_and_changes_with_damping(tmp_path):
    model = write_tiny_model(tmp_path / "m", TinySpec(arch="mixtral", layers=2, experts=4, top_k=2, hidden=32,
                                                      intermediate=32, heads=2, kv_heads=1, vocab=TOKENIZER_VOCAB_SIZE,
                                                      seed=3, max_position_embeddings=128))
    local = bench.Local(model)
    exact_log, ones_log, damped_log = bench.RoutingLog(), bench.RoutingLog(), bench.RoutingLog()
    exact = local.score(TEXT, log=exact_log)
    ones = local.score(TEXT, {0: (1.0,) * 4, 1: (1.0,) * 4}, ones_log)
    assert exact.tokens == len(TEXT.encode())  # every byte scored once
    assert [lp.logprob for w in exact.per_window for lp in w] == [lp.logprob for w in ones.per_window for lp in w]
    counts = exact_log.per_token(local.layers, 4).sum(0)  # (L, E)
    hot = int(counts[0].argmax())
    damped = local.score(TEXT, {0: tuple(0.0 if e == hot else 1.0 for e in range(4))}, damped_log)
    assert int(damped_log.per_token(local.layers, 4).sum(0)[0, hot]) == 0  # gated away entirely
    assert damped.bits_per_byte != exact.bits_per_byte


def _row(workers: int, label: str, bpb: float, device: float, overflow: str = "dropless") -> dict:
    return {"workers": workers, "label": label, "overflow": overflow, "bits_per_byte": bpb, "token_accuracy": 0.5,
            "agreement": {"matching": 60, "lengths": [32, 32], "first_divergence": [32, 28]},
            "device_max_over_mean": device, "device_worst_layer": device + 0.1, "expert_max_over_mean": 1.5,
            "step_ms": 10.0, "tokens_per_s": 100.0, "epochs": 3}


def test_the_document_has_every_part_and_compares_gating_with_no_policy():
    run = {"settings": {"load_bytes": 1000, "workers": [2, 8], "warm_bytes": 100, "warm_rounds": 2,
                        "eval_bytes": 400, "capacity_factor": 1.2},
           "model": {"name": "m", "layers": 2, "hidden": 32, "experts": 4, "top_k": 2, "context": 128,
                     "moe_layers": [0, 1]},
           "load": {"tokens": 500, "max_over_mean": [1.5, 1.2], "gini": [0.2, 0.1],
                    "share": [[0.4, 0.2, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]],
                    "long": {"prompt_tokens": 9, "new_tokens": 100, "text": "abc",
                             "window_max_over_mean": [[1.1, 1.2], [1.3, 1.4]]}},
           "plan": ["predicted gain over round-robin: x1.00"],
           "reference": {"bits_per_byte": 2.0, "token_accuracy": 0.5, "prompts": 2, "new_tokens": 32},
           "rows": [_row(8, "none", 2.0, 1.5), _row(8, "gating (ours)", 2.1, 1.1),
                    _row(8, "gating (ours)", 2.2, 1.0, "drop")],
           "causes": [{"label": "gating (ours)", "bpb_all": 0.1, "bpb_start": 0.05, "bpb_mesh": 0.1, "epochs": 3,
                       "layers": [{"layer": 0, "min_factor": 0.5, "changed_alone": 0.1, "changed_all": 0.1,
                                   "bpb_alone": 0.08, "damped": [[0, 0.5, 0.4, 0.3]]},
                                  {"layer": 1, "min_factor": 1.0, "changed_alone": 0.0, "changed_all": 0.02,
                                   "bpb_alone": 0.0, "damped": []}]}],
           "minutes": 1.0}
    doc = render(run)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## Is load-aware gating worth"):
        assert heading in doc
    assert "| 8 | gating (ours) | drop | 2.2000 | +0.2000 |" in doc
    assert "max/mean device load 1.50 -> 1.10; bits per byte +0.1000 (+5.00%)" in doc
    assert "layer 0 costs the most (+0.0800 bits per byte" in doc
